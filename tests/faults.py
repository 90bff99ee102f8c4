"""Faults the tests inject from outside the jobs, through the jobs' hooks (jobs/hooks.py): name one in
HOVLE_HOOKS, e.g. `HOVLE_HOOKS=/path/to/tests/faults.py:kill_last_rank_at_step_3`. Most SIGKILL their own
process at a point a test can rely on, the way a real crash (OOM, a lost node) arrives; the S3 outages
make a test's TCP proxy (tests/tcp_proxy.py) in front of the store reset every connection mid-upload."""

import json
import logging
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("tests.faults")
FILE = Path(__file__).resolve()


def spec(name: str) -> str:
    """The HOVLE_HOOKS entry of the fault `name` of this file."""
    return f"{FILE}:{name}"


class KillLastRank:
    """Training: the last rank SIGKILLs itself after optimizer step `step`, only in a worker group that
    started fresh (the restarted group, resumed from a checkpoint, runs on)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step(self, at) -> None:
        if at.step == self.step and at.resumed_from_step is None and at.rank == at.world_size - 1:
            logger.warning("fault: SIGKILL rank %d of %s at step %d", at.rank, at.stage, at.step)
            os.kill(os.getpid(), signal.SIGKILL)


class PauseAtStep:
    """Training: at optimizer step `step` of a worker group that started fresh, rank 0 writes
    `pause_marker(<Ray Train run>)` and every rank stands still for `seconds`: the checkpoints before that
    step are committed, and a test can take a node away from a run that is mid-stage."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_train_step(self, at) -> None:
        import ray.train

        if at.step != self.step or at.resumed_from_step is not None:
            return
        if at.rank == 0:
            marker = pause_marker(ray.train.get_context().get_experiment_name())
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"stage": at.stage, "step": at.step}))
        logger.warning("fault: rank %d of %s pauses at step %d", at.rank, at.stage, at.step)
        time.sleep(self.seconds)


def pause_marker(run: str) -> Path:
    """Where `PauseAtStep` tells a test that the Ray Train run `run` (`<run_name>-train`) stands still."""
    return Path(tempfile.gettempdir()) / "hovle-faults" / f"{run}.paused"


class KillAfterUnits:
    """Prepare: the driver SIGKILLs itself once `units` input units are written (its Ray processes go
    with it)."""

    def __init__(self, units: int) -> None:
        self.units = units

    def on_prepare_unit(self, done: int, total: int) -> None:
        if done >= self.units:
            os.kill(os.getpid(), signal.SIGKILL)


def outage_control(run: str) -> Path:
    """The file through which a test tells the S3 outage hooks of the Ray Train run `run`
    (`<run_name>-train`) where its proxy (tests/tcp_proxy.py) is: {"control": [host, port], "checkpoints":
    the run's folder URI, "resume_report": a path}."""
    return Path(tempfile.gettempdir()) / "hovle-faults" / f"{run}.json"


def _run_control() -> dict:
    import ray.train

    return json.loads(outage_control(ray.train.get_context().get_experiment_name()).read_text())


class S3Outage:
    """Training on S3 through the test's proxy: at optimizer step `step` of a fresh worker group (before
    that step's checkpoint is saved), rank 0 arms the proxy: once `after_bytes` more bytes of the upload
    have passed, the endpoint is gone for `seconds` (every connection reset, every new one too)."""

    kind = "cut"

    def __init__(self, step: int, seconds: float, after_bytes: int) -> None:
        self.step, self.seconds, self.after_bytes = step, seconds, after_bytes

    def on_train_step(self, at) -> None:
        if at.step != self.step or at.resumed_from_step is not None or at.rank != 0:
            return
        control = _run_control()["control"]
        with socket.create_connection(tuple(control), timeout=30) as sock:
            sock.sendall(f"{self.kind} {self.seconds} {self.after_bytes}\n".encode())
            answer = sock.makefile("rb").readline().decode()
        logger.warning(
            "fault: S3 %s for %ss at step %d of %s: %s", self.kind, self.seconds, at.step, at.stage, answer
        )


class ListCheckpointsOnResume:
    """At the first step of a resumed worker group, rank 0 writes which files each checkpoint folder of the
    run held then (straight from the store, not through the proxy) to the run's `resume_report`."""

    def on_train_step(self, at) -> None:
        if at.resumed_from_step is None or at.step != at.resumed_from_step + 1 or at.rank != 0:
            return
        from pipelines import storage

        settings = _run_control()
        fs, root = storage.filesystem(settings["checkpoints"])
        fs.invalidate_cache()
        folders: dict[str, list[str]] = {}
        for path in fs.find(root):
            relative = path[len(root) :].strip("/")
            if relative.startswith("checkpoint_"):
                folder, _, name = relative.partition("/")
                if name and not name.endswith("/"):  # not a folder's marker object
                    folders.setdefault(folder, []).append(name)
        report = {"resumed_from_step": at.resumed_from_step, "checkpoints": folders}
        Path(settings["resume_report"]).write_text(json.dumps(report))


kill_last_rank_at_step_2 = KillLastRank(2)
kill_last_rank_at_step_3 = KillLastRank(3)
kill_after_two_units = KillAfterUnits(2)
# a few seconds without S3 mid-upload of the step-2 checkpoint (retried through), and at step 4 a cut
# longer than every retry (the upload fails, the worker group restarts)
s3_cut_briefly_at_step_2 = S3Outage(2, 4, 400_000)
s3_cut_for_long_at_step_4 = S3Outage(4, 60, 400_000)
list_checkpoints_on_resume = ListCheckpointsOnResume()
pause_at_step_3 = PauseAtStep(3, 300)
