"""The S3 endpoint going away during checkpoint uploads: a stage on s3:// storage whose traffic goes through
a real TCP proxy (tests/tcp_proxy.py) in front of the session's moto server, made to reset every connection
by a hook at a chosen step (tests/faults.py), the way an unreachable endpoint answers.

One Ray Train stage run: a brief cut mid-upload of the step-2 checkpoint is retried through (the checkpoint
is committed, no restart); a cut at step 4 outlasts every retry, the upload fails, the worker group
restarts and resumes from the last complete checkpoint (step 2), never from the half-written step-4
folder; the final weights equal an uninterrupted run's.

Without jobs.checkpoints.upload_checkpoint's check this fails: pyarrow's S3 upload returns success with
files missing after such a cut, Ray Train commits the half-written checkpoint, and the restarted workers
die loading it (FileNotFoundError for a rank's optimizer states) until the stage gives up.

Ray Train's storage is pyarrow's S3 filesystem, which takes its endpoint from the storage URI's query
(`?endpoint_override=host:port&scheme=http`): only this run's checkpoint traffic goes through the proxy.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests import faults
from tests.tcp_proxy import ProxyProcess, command
from tests.test_train import assert_same_weights, export_weights, prepared, train  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

RESUME = (
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


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        report = train(*RESUME, "--data", prepared["align"], "--run-name", "straight")
    return export_weights(report["exports"]["align"])


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
    prepared,  # noqa: F811
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
            *RESUME, "--data", prepared["align"], "--run-name", run, "--output", str(tmp_workdir / "exports"),
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
    assert_same_weights(export_weights(report["exports"]["align"]), uninterrupted)
