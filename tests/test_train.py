"""Ray Train + DeepSpeed end to end on the tiny preset: 2 CPU workers over gloo, real MLflow and S3 (moto).

Each test prepares nothing itself: a module fixture writes small synthetic corpora for the three stages
and prepares them once with `hovle prepare`. Steps are few; what is checked is behaviour (exports load and
generate, frozen weights stay, resumed weights equal uninterrupted ones), never speed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import main as train_main
from model import build_model, load_preset
from pipelines.corpora.synthetic import generate
from pipelines.prepare import prepare
from pipelines.settings import PrepareSettings
from tests import faults
from tests.conftest import REPO_ROOT
from tests.helpers import preset_processor

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

STAGES = ("distill", "align", "instruct")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_session) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-data")
    settings = PrepareSettings(max_tokens=256, val_fraction=0.0)
    data = {}
    for stage in STAGES:
        jsonl = generate(stage, 24, seed=0, output_dir=root / "corpus" / stage, image_size=56)
        inputs = [str(jsonl)] + ([str(jsonl.parent / "text.jsonl")] if stage == "distill" else [])
        prepare(preset_processor("tiny"), stage, inputs, str(root / stage), settings)
        data[stage] = str(root / stage)
    return data


def train(*args: str, data: dict[str, str] | None = None, expect: int = 0) -> dict | None:
    """`hovle train --config tiny ...` in this process; returns its final JSON line (None on failure)."""
    argv = ["--config", "tiny", *args]
    for stage, uri in (data or {}).items():
        argv += ["--set", f"train.data.{stage}={uri}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = train_main(argv)
    assert status == expect
    return json.loads(out.getvalue().strip().splitlines()[-1]) if status == 0 else None


def export_weights(uri: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(uri) / "model.safetensors"))


def mlflow_client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


# ---- three stages, ZeRO-2 -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_stages(prepared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("three-stages")
    # the datasets as relative paths, the way a person types them: the workers do not run in this folder
    relative = {stage: os.path.relpath(uri, workdir) for stage, uri in prepared.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        report = train("--stage", "all", "--run-name", "e2e", data=relative)
    return workdir, report


def test_three_stages_end_in_an_export_that_loads_and_generates_without_ray(three_stages):
    workdir, report = three_stages
    assert set(report["exports"]) == set(STAGES)
    script = (
        "import sys, torch\n"
        "from model import HoVLEForConditionalGeneration, HoVLEProcessor\n"
        f"model = HoVLEForConditionalGeneration.from_pretrained({report['exports']['instruct']!r})\n"
        f"processor = HoVLEProcessor.from_pretrained({report['exports']['instruct']!r})\n"
        "inputs = processor([{'role': 'user', 'content': 'hello'}], add_generation_prompt=True)\n"
        "out = model.generate(input_ids=inputs['input_ids'], attention_mask=inputs['attention_mask'], "
        "max_new_tokens=4, min_new_tokens=4)\n"
        "assert out.shape[1] == inputs['input_ids'].shape[1] + 4\n"
        "assert not {m.split('.')[0] for m in sys.modules} & {'ray', 'deepspeed'}, 'ray/deepspeed imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_align_leaves_the_llm_bit_identical_and_trains_the_embedding(three_stages):
    _, report = three_stages
    torch.manual_seed(0)  # the workers build the preset's random weights from train.seed
    base = build_model(load_preset("tiny")).state_dict()
    distill, align = export_weights(report["exports"]["distill"]), export_weights(report["exports"]["align"])
    llm = [k for k in base if k.startswith("language_model.") and k in align]
    assert llm
    for key in llm:
        assert torch.equal(align[key], base[key]), key
        assert torch.equal(distill[key], base[key]), key
    embedding = [k for k in align if k.startswith("embedding.")]
    assert any(not torch.equal(align[k], distill[k]) for k in embedding)
    instruct = export_weights(report["exports"]["instruct"])
    assert any(not torch.equal(instruct[k], align[k]) for k in llm)  # instruct trains the LLM


def test_mlflow_holds_one_parent_with_three_stage_runs(three_stages):
    workdir, report = three_stages
    client = mlflow_client(workdir)
    experiment = client.get_experiment_by_name("hovle")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hovle.kind") == "pipeline"]
    assert [p.info.run_id for p in parents] == [report["mlflow_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == report["mlflow_run_id"]]
    assert sorted(r.data.tags["hovle.stage"] for r in children) == sorted(STAGES)
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_fraction"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert [m.step for m in history] == [2, 4], metric
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "data_manifest.json"} <= artifacts
    assert parents[0].data.params["stages.align.lr"] == "0.001"
    logged = {k for c in children for k in client.get_run(c.info.run_id).data.metrics}
    assert "system/cpu_utilization_percentage" in logged


# ---- resume ---------------------------------------------------------------------------------------------
RESUME = (
    "--stage", "align", "--set", "train.stages.align.steps=6", "--set", "train.checkpoint.every_n_steps=2",
)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        report = train(*RESUME, "--data", prepared["align"], "--run-name", "straight")
    return export_weights(report["exports"]["align"])


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= 1e-5, worst
    assert any(k.startswith("embedding.") for k in want)


def test_a_killed_worker_resumes_from_the_last_checkpoint_to_the_same_weights(
    prepared, uninterrupted, tmp_workdir, monkeypatch
):
    monkeypatch.setenv("HOVLE_HOOKS", faults.spec("kill_last_rank_at_step_3"))
    report = train(*RESUME, "--data", prepared["align"], "--run-name", "killed")
    info = json.loads((Path(report["exports"]["align"]) / "export.json").read_text())
    assert info["resumed_from_step"] == 2  # the restarted workers took the step-2 checkpoint
    assert_same_weights(export_weights(report["exports"]["align"]), uninterrupted)
    checkpoints = sorted(p.name for p in (tmp_workdir / "runs" / "killed-align").glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_0000004", "checkpoint_0000006"]  # keep_last 2


def test_rerunning_after_the_whole_job_died_resumes_into_the_same_mlflow_run(
    prepared, uninterrupted, tmp_workdir, monkeypatch
):
    monkeypatch.setenv("HOVLE_HOOKS", faults.spec("kill_last_rank_at_step_3"))
    args = (*RESUME, "--data", prepared["align"], "--run-name", "rerun")
    assert train(*args, "--set", "train.max_failures=0", expect=1) is None  # the job dies with its worker
    client = mlflow_client(tmp_workdir)
    [stage_run] = client.search_runs(
        [client.get_experiment_by_name("hovle").experiment_id], "tags.`hovle.stage` = 'align'"
    )
    assert stage_run.info.status == "FAILED"

    monkeypatch.delenv("HOVLE_HOOKS")
    report = train(*args)
    info = json.loads((Path(report["exports"]["align"]) / "export.json").read_text())
    assert info["resumed_from_step"] == 2
    assert_same_weights(export_weights(report["exports"]["align"]), uninterrupted)
    runs = client.search_runs([client.get_experiment_by_name("hovle").experiment_id])
    assert len(runs) == 2  # the same parent and stage run, no duplicates
    resumed = client.get_run(stage_run.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")][-1] == 6


# ---- ZeRO-3 on S3 -----------------------------------------------------------------------------------------
def test_zero3_checkpoints_and_exports_to_s3_with_consolidated_weights(prepared, s3_bucket, tmp_workdir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from jobs.export import load_export
    from pipelines import storage

    storage_path = f"{s3_bucket}/runs"
    report = train(
        "--stage", "align", "--data", prepared["align"], "--run-name", "z3",
        "--set", "train.deepspeed.zero_stage=3", "--set", f"train.storage_path={storage_path}",
    )  # fmt: skip
    export = report["exports"]["align"]
    assert export.startswith("s3://")
    model, _ = load_export(export)
    exported = {k: v for k, v in model.state_dict().items()}

    # the engine's own fp32 partitions from its last checkpoint, merged by DeepSpeed's offline tool
    last = storage.join(storage_path, "z3-align", "checkpoint_0000004")
    local = tmp_workdir / "checkpoint"
    storage.get_directory(last, str(local))
    engine = get_fp32_state_dict_from_zero_checkpoint(str(local), tag="state")
    engine = {k.removeprefix("model."): v for k, v in engine.items() if k.startswith("model.")}
    compared = [k for k in engine if k in exported]
    assert len(compared) == len(engine) > 0
    for key in compared:
        assert torch.equal(exported[key], engine[key]), key


# ---- bf16 on CPU, ZeRO-1 --------------------------------------------------------------------------------
def test_bf16_on_cpu_when_asked_trains_and_exports(prepared, tmp_workdir):
    report = train(
        "--stage", "instruct", "--data", prepared["instruct"], "--run-name", "bf16",
        "--set", "train.deepspeed.precision=bf16", "--set", "train.deepspeed.zero_stage=1",
        "--set", "train.stages.instruct.steps=2",
    )  # fmt: skip
    weights = export_weights(report["exports"]["instruct"])
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    client = mlflow_client(tmp_workdir)
    experiment = client.get_experiment_by_name("hovle").experiment_id
    [run] = client.search_runs([experiment], "tags.`hovle.stage` = 'instruct'")
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert loss and all(torch.isfinite(torch.tensor(m.value)) for m in loss)
