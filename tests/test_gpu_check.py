"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without a GPU: it says so, writes its JSON and
exits 0; its per-stage step runner (the CPU reference of the GPU run) trains every stage of the tiny preset
to finite losses; a section that fails is recorded and the next one still runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_writes_the_json_and_exits_0(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(output)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "no GPU found" in result.stdout
    report = json.loads(output.read_text())
    assert report["gpu"] is False and "no GPU found" in report["reason"]


@pytest.mark.parametrize("stage", gpu_check.STAGES)
def test_every_stage_trains_a_few_steps_on_the_cpu_to_finite_losses(stage):
    run = gpu_check.run_stage_steps(gpu_check.model_spec("tiny"), stage, "cpu", steps=2, seq_len=48)

    assert run.stage == stage and len(run.losses) == 2
    assert run.finite and all(loss > 0 for loss in run.losses)
    assert run.tokens_per_s > 0 and run.flops_per_token > 0


def test_the_same_seed_gives_the_same_weights_and_batch_so_runs_compare():
    """What the CPU/GPU comparison stands on: two runs from one seed are the same run."""
    first = gpu_check.run_stage_steps(gpu_check.model_spec("tiny"), "align", "cpu", steps=2, seq_len=48)
    second = gpu_check.run_stage_steps(gpu_check.model_spec("tiny"), "align", "cpu", steps=2, seq_len=48)

    assert first.losses == second.losses
    assert gpu_check.losses_agree(first.losses, [x * 1.01 for x in first.losses])
    assert not gpu_check.losses_agree(first.losses, [x * 1.2 for x in first.losses])


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    check = gpu_check.Check(tmp_path / "out.json", deadline=math.inf)

    def missing_op() -> dict:
        raise NotImplementedError("no kernel for this op")

    check.section("broken", missing_op, budget_s=30)
    check.section("fine", lambda: {"value": 1}, budget_s=30)

    sections = json.loads((tmp_path / "out.json").read_text())["sections"]
    assert sections["broken"]["status"] == "error"
    assert "NotImplementedError: no kernel for this op" in sections["broken"]["error"]
    assert sections["fine"]["status"] == "ok" and sections["fine"]["result"] == {"value": 1}


def test_a_section_past_its_budget_is_stopped_and_recorded_as_a_timeout(tmp_path):
    check = gpu_check.Check(tmp_path / "out.json", deadline=math.inf)

    def hangs() -> dict:
        while True:
            pass

    record = check.section("slow", hangs, budget_s=5)

    assert record["status"] == "timeout" and record["seconds"] < 15
