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
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.train import main as train_main
from pipelines.corpora.synthetic import generate
from pipelines.prepare import prepare
from pipelines.settings import PrepareSettings
from tests import faults
from tests.helpers import preset_processor
from tests.tcp_proxy import ProxyProcess, command

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


# ---- resume ---------------------------------------------------------------------------------------------
# All three stages in one Ray Train run (one worker group); the kill comes at align's step 3, between its
# step-2 and step-4 checkpoints.
RESUME = (
    "--stage", "all", "--set", "train.stages.distill.steps=2", "--set", "train.stages.align.steps=6",
    "--set", "train.stages.instruct.steps=2", "--set", "train.checkpoint.every_n_steps=2",
)  # fmt: skip


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory) -> dict:
    """The report of the uninterrupted three-stage run everything here compares with."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        return train(*RESUME, "--run-name", "straight", data=prepared)


@pytest.fixture(scope="module")
def uninterrupted(straight) -> dict[str, dict[str, torch.Tensor]]:
    return {stage: export_weights(uri) for stage, uri in straight["exports"].items()}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst <= 1e-5, worst
    assert any(k.startswith("embedding.") for k in want)


def export_info(report: dict, stage: str) -> dict:
    return json.loads((Path(report["exports"][stage]) / "export.json").read_text())


def logged_steps(client, stage: str, run_name: str) -> list[int]:
    experiment = client.get_experiment_by_name("hovle").experiment_id
    query = f"tags.`hovle.stage` = '{stage}' and tags.`mlflow.runName` = '{run_name}-{stage}'"
    [run] = client.search_runs([experiment], query)
    return [m.step for m in client.get_metric_history(run.info.run_id, "loss")]


def test_a_killed_worker_resumes_its_stage_from_the_last_checkpoint_to_the_same_weights(
    prepared, uninterrupted, tmp_workdir, monkeypatch
):
    monkeypatch.setenv("HOVLE_HOOKS", faults.spec("kill_last_rank_at_step_3"))
    report = train(*RESUME, "--run-name", "killed", data=prepared)
    assert export_info(report, "align")["resumed_from_step"] == 2  # the restarted workers took align's step 2
    assert export_info(report, "instruct")["resumed_from_step"] is None  # a fresh start, in the same group
    for stage in STAGES:
        assert_same_weights(export_weights(report["exports"][stage]), uninterrupted[stage])
    # the restarted group skipped the finished distill stage: its steps were logged once
    client = mlflow_client(tmp_workdir)
    assert logged_steps(client, "distill", "killed") == [2]  # tiny logs every 2 steps
    assert logged_steps(client, "align", "killed")[-1] == 6
    run = tmp_workdir / "runs" / "killed-train"
    checkpoints = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_align_0000006", "checkpoint_instruct_0000002"]  # keep_last 2


def test_rerunning_after_the_whole_job_died_resumes_into_the_same_mlflow_run(
    prepared, uninterrupted, tmp_workdir, monkeypatch
):
    monkeypatch.setenv("HOVLE_HOOKS", faults.spec("kill_last_rank_at_step_3"))
    args = (*RESUME, "--run-name", "rerun")
    assert (
        train(*args, "--set", "train.max_failures=0", data=prepared, expect=1) is None
    )  # dies with its worker
    client = mlflow_client(tmp_workdir)
    experiment = client.get_experiment_by_name("hovle").experiment_id
    status = {run.data.tags["hovle.stage"]: run.info.status
              for run in client.search_runs([experiment], "tags.`hovle.kind` = 'stage'")}  # fmt: skip
    assert status == {"distill": "FINISHED", "align": "FAILED", "instruct": "KILLED"}

    monkeypatch.delenv("HOVLE_HOOKS")
    report = train(*args, data=prepared)
    assert export_info(report, "align")["resumed_from_step"] == 2
    for stage in STAGES:
        assert_same_weights(export_weights(report["exports"][stage]), uninterrupted[stage])
    runs = client.search_runs([experiment])
    assert len(runs) == 4  # the same parent and stage runs, no duplicates
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert logged_steps(client, "distill", "rerun") == [2]  # exported before the crash: not trained again
    assert logged_steps(client, "align", "rerun")[-1] == 6


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
    last = storage.join(storage_path, "z3-train", "checkpoint_align_0000004")
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


# ---- workers that find no resources ---------------------------------------------------------------------
def test_a_run_whose_workers_find_no_resources_fails_after_wait_for_workers_s_naming_it(
    prepared, tmp_workdir, capsys
):
    """A cluster smaller than train.scaling asks (the session's Ray has 2 CPUs; one worker asks for 3), as
    after a node is lost and not replaced: Ray Train would retry the start forever; the run fails after
    train.wait_for_workers_s (one 6 s start here) with that field named and the stage marked FAILED."""
    train(
        "--stage", "instruct", "--data", prepared["instruct"], "--run-name", "no-room",
        "--set", "train.scaling.num_workers=1", "--set", "train.scaling.cpus_per_worker=3",
        "--set", "train.wait_for_workers_s=6",
        expect=1,
    )  # fmt: skip
    error = capsys.readouterr().err
    assert "stage instruct failed: its 1 workers did not start within train.wait_for_workers_s=6.0" in error
    client = mlflow_client(tmp_workdir)
    experiment = client.get_experiment_by_name("hovle").experiment_id
    [run] = client.search_runs([experiment], "tags.`hovle.stage` = 'instruct'")
    assert run.info.status == "FAILED"
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in os.environ  # the driver's environment restored


# ---- the S3 endpoint going away during checkpoint uploads -------------------------------------------------
# Align (from the uninterrupted run's distill export) on s3:// storage whose traffic goes through
# a real TCP proxy (tests/tcp_proxy.py) in front of the session's moto server, made to reset every connection
# by a hook at a chosen step (tests/faults.py), the way an unreachable endpoint answers.
#
# A brief cut mid-upload of the step-2 checkpoint is retried through (the checkpoint
# is committed, no restart); a cut at step 4 outlasts every retry, the upload fails, the worker group
# restarts and resumes from the last complete checkpoint (step 2), never from the half-written step-4
# folder; the final weights equal the uninterrupted run's align. Restarted workers read the checkpoint while
# the cut may still be on: jobs.checkpoints.checkpoint_folder checks and retries that read.
#
# Without jobs.checkpoints.upload_checkpoint's check this fails: pyarrow's S3 upload returns success with
# files missing after such a cut, Ray Train commits the half-written checkpoint, and the restarted workers
# die loading it (FileNotFoundError for a rank's optimizer states) until the stage gives up.
#
# Ray Train's storage is pyarrow's S3 filesystem, which takes its endpoint from the storage URI's query
# (`?endpoint_override=host:port&scheme=http`): only this run's checkpoint traffic goes through the proxy.
ALIGN_FROM_DISTILL = (
    "--stage", "align", "--set", "train.stages.align.steps=6", "--set", "train.checkpoint.every_n_steps=2",
)  # fmt: skip


@pytest.fixture
def proxy(s3_server):
    host, _, port = s3_server.removeprefix("http://").partition(":")
    proxy = ProxyProcess.start(host, int(port))
    try:
        yield proxy
    finally:
        proxy.stop()


def checkpoint_files(uri: str) -> dict[str, list[str]]:
    """{checkpoint folder: its files} under a run's folder, read straight from the store."""
    from pipelines import storage

    fs, root = storage.filesystem(uri)
    fs.invalidate_cache()
    folders: dict[str, list[str]] = {}
    for path in fs.find(root):
        folder, _, name = path[len(root) :].strip("/").partition("/")
        if folder.startswith("checkpoint_") and name and not name.endswith("/"):
            folders.setdefault(folder, []).append(name)
    return {folder: sorted(names) for folder, names in folders.items()}


def test_an_s3_outage_during_checkpoint_uploads_is_retried_then_resumed_from_the_last_complete_checkpoint(
    prepared,
    straight,
    uninterrupted,
    proxy,
    s3_bucket,
    tmp_workdir,
    monkeypatch,
):
    run = f"outage-{uuid.uuid4().hex[:8]}"
    storage_path = f"{s3_bucket}/runs"
    checkpoints = f"{storage_path}/{run}-train"
    report_file = tmp_workdir / "resume.json"
    control = faults.outage_control(f"{run}-train")
    control.parent.mkdir(parents=True, exist_ok=True)
    control.write_text(
        json.dumps({"control": proxy.control, "checkpoints": checkpoints, "resume_report": str(report_file)})
    )
    hooks = ("s3_cut_briefly_at_step_2", "s3_cut_for_long_at_step_4", "list_checkpoints_on_resume")
    monkeypatch.setenv("HOVLE_HOOKS", ",".join(faults.spec(name) for name in hooks))
    try:
        report = train(
            *ALIGN_FROM_DISTILL, "--init", straight["exports"]["distill"], "--data", prepared["align"],
            "--run-name", run, "--output", str(tmp_workdir / "exports"),
            "--set", f"train.storage_path={storage_path}?endpoint_override={proxy.address}&scheme=http",
            "--set", "train.max_failures=3",
        )  # fmt: skip
    finally:
        control.unlink()
    stats = command(proxy.control, "stats")

    # both outages happened, mid-upload, through the proxy: every connection reset
    assert [o["kind"] for o in stats["outages"]] == ["cut", "cut"]
    assert stats["reset"] > 0
    # step 2's upload was retried through the brief cut and committed; step 4's failed for good, and the
    # restarted workers took the step-2 checkpoint while the step-4 folder was half-written
    info = json.loads((Path(report["exports"]["align"]) / "export.json").read_text())
    assert info["resumed_from_step"] == 2
    at_resume = json.loads(report_file.read_text())
    assert at_resume["resumed_from_step"] == 2
    final = checkpoint_files(checkpoints)
    assert sorted(final) == ["checkpoint_align_0000004", "checkpoint_align_0000006"]  # keep_last 2
    complete = final["checkpoint_align_0000004"]  # rewritten by the resumed workers
    assert final["checkpoint_align_0000006"] == complete
    assert sorted(at_resume["checkpoints"]["checkpoint_align_0000002"]) == complete
    half_written = at_resume["checkpoints"].get("checkpoint_align_0000004", [])
    assert set(half_written) < set(complete), half_written
    # and the weights are an uninterrupted run's
    assert_same_weights(export_weights(report["exports"]["align"]), uninterrupted["align"])
