"""`hovle inspect`'s sizing: GPU-hours, wall-clock, nodes and memory per stage at HoVLE's data sizes, and
platform/SIZING.md, whose blocks must be what the command prints now."""

import json
import sys
from pathlib import Path

import pytest

from jobs.inspect import PAPER_DATA, Throughput, cluster_shape, inspect_config, main

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import sizing_doc  # noqa: E402


def test_sizing_doc_blocks_equal_what_inspect_prints_now():
    text = sizing_doc.DOC.read_text()
    written = sizing_doc.blocks(text)

    assert set(written) == {"hovle-2.6b --gpus 8", "hovle-2.6b --gpus 64"}
    for args, block in written.items():
        assert block == sizing_doc.inspect_output(args), (
            f"platform/SIZING.md's block for `hovle inspect {args}` is stale: "
            "run python benchmarks/sizing_doc.py"
        )


@pytest.mark.parametrize(
    ("gpus", "per_node", "nodes", "shape"),
    [(8, 8, None, (8, 1)), (64, 8, None, (8, 8)), (4, 8, None, (4, 1)), (16, 8, 4, (4, 4))],
)
def test_gpus_count_all_gpus_and_fill_whole_nodes(gpus, per_node, nodes, shape):
    assert cluster_shape(gpus, per_node, nodes) == shape


def test_gpus_that_fill_no_whole_node_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tiny", "--gpus", "12"])

    assert exit_.value.code == 2
    assert "--gpus 12 is not a whole number of nodes of --gpus-per-node 8" in capsys.readouterr().err


def test_gpu_hours_follow_tokens_flops_and_mfu_and_wall_clock_divides_by_the_gpus():
    """On the tiny preset (seconds): the figures are the stated formula, the same GPU-hours on any
    cluster, half the wall-clock on twice the GPUs, twice the GPU-hours at half the MFU."""
    one_node = inspect_config("tiny", gpus_per_node=8, nodes=1)
    two_nodes = inspect_config("tiny", gpus_per_node=8, nodes=2)
    half_mfu = inspect_config("tiny", gpus_per_node=8, nodes=1, throughput=Throughput(mfu=0.2))

    assert set(one_node.sizing) == {"distill", "align", "instruct"}
    for stage, size in one_node.sizing.items():
        data = PAPER_DATA[stage]
        assert size.tokens == data.samples * data.tokens_per_sample
        assert size.gpu_hours == pytest.approx(size.tokens * size.flops_per_token / (0.4 * 989e12) / 3600)
        assert size.wall_hours == pytest.approx(size.gpu_hours / 8)
        assert two_nodes.sizing[stage].gpu_hours == pytest.approx(size.gpu_hours)
        assert two_nodes.sizing[stage].wall_hours == pytest.approx(size.wall_hours / 2)
        assert two_nodes.sizing[stage].nodes == 2
        assert half_mfu.sizing[stage].gpu_hours == pytest.approx(2 * size.gpu_hours)
    # the stage that trains the whole model holds the most states per GPU
    states = {stage: size.model_states_per_gpu for stage, size in one_node.sizing.items()}
    assert states["instruct"] == max(states.values())


def test_zero3_splits_the_frozen_weights_too():
    zero2 = inspect_config("tiny", gpus_per_node=8, nodes=1, throughput=Throughput(zero_stage=2))
    zero3 = inspect_config("tiny", gpus_per_node=8, nodes=1, throughput=Throughput(zero_stage=3))

    for stage in ("distill", "align", "instruct"):
        assert zero3.sizing[stage].model_states_per_gpu < zero2.sizing[stage].model_states_per_gpu


def test_json_report_carries_the_sizing_and_the_throughput_it_assumes(capsys):
    assert main(["tiny", "--gpus", "16", "--mfu", "0.5", "--peak-tflops", "312", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert (report["gpus"], report["nodes"], report["gpus_per_node"]) == (16, 2, 8)
    assert report["throughput"] == {"mfu": 0.5, "peak_tflops": 312.0, "zero_stage": 2}
    assert report["sizing"]["instruct"]["nodes"] == 2
    assert report["sizing"]["distill"]["gpu_hours"] > 0
