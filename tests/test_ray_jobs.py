"""`hovle submit` (`python -m jobs.submit`, a retrain cycle as a Ray job) against a real local Ray head
(`ray start --head`), as a scheduler runs it: the job's outcome as one JSON line, an exit code, a webhook.

The head runs in its own process group with its own temp folder and ports, one for the module; the module
stops exactly that group (never `ray stop`, which would kill every Ray process on the machine, the test
session's too). The outcomes without Ray (every status, a failing webhook) are tests/test_submit.py's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from model.config_files import CONFIG_DIR
from pipelines.corpora.synthetic import generate
from tests.conftest import REPO_ROOT
from tests.test_submit import Webhook

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head --block` process group; yields the dashboard (jobs API) address."""
    dashboard, gcs = free_port(), free_port()
    # every port of its own: the test session's Ray runtime already holds the defaults (the dashboard
    # agent's 52365 among them, and a head whose agent cannot listen accepts no jobs)
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        )
    ]  # fmt: skip
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # the head's `python` is this virtualenv's, as a cluster node's is its image's
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--temp-dir", temp, "--disable-usage-stats", *ports],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # it answers (401 without the cluster's token): it is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
                time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # `ray start --block` often outlives SIGTERM: the group is killed then
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


@pytest.fixture(scope="module")
def job_config(tmp_path_factory) -> Path:
    """A one-stage retrain config (instruct, from the preset's model: there is no champion yet), which
    keeps the job short; the three-stage cycle is tests/test_retrain.py's."""
    root = tmp_path_factory.mktemp("ray-jobs")
    raw = {"instruct": [str(generate("instruct", 12, seed=0, output_dir=root / "raw", image_size=56))]}
    held_out = generate("instruct", 4, seed=5, output_dir=root / "heldout", image_size=56)
    document = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    document["data"] = {"max_tokens": 256, "val_fraction": 0.0}
    document["train"]["storage_path"] = str(root / "runs")
    document["train"]["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    for stage in document["train"]["stages"].values():
        stage["steps"] = 2
    document["retrain"] = {"raw": raw, "prepared": str(root / "prepared"), "stages": "instruct"}
    document["eval"] = {"data": str(held_out), "max_samples": 2}
    # the tiny random model has no language nor skills: the gate's floors are lowered for this job test
    document["registry"] = {"name": "hovle-job", "floor": 0.0, "min_text_retained": None}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def submit(address: str, config: Path, webhook_url: str) -> tuple[int, dict, str]:
    """`python -m jobs.submit` as a scheduler runs it: (exit code, its one stdout line, its stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", HOVLE_WEBHOOK_URL=webhook_url)  # the token: ~/.ray/auth_token
    done = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", address, "--config", str(config),
         "--working-dir", ".", "--runtime-env", "platform/ray/runtime_env.yaml", "--poll-s", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, json.loads(lines[0]), done.stderr


def test_a_retrain_job_locked_out_is_reported_locked(ray_head, job_config, webhook):
    from jobs.lock import StorageLock

    lock = job_config.parent / "runs" / "retrain" / "lock.json"
    with StorageLock(str(lock), ttl_s=600):  # a cycle that is still running elsewhere
        code, line, stderr = submit(ray_head, job_config, webhook.url)
    assert code == 3, stderr[-3000:]
    assert line["status"] == "locked" and "another run holds" in line["reason"]
    assert line["job_id"].startswith("raysubmit_") and line["job_status"] == "FAILED"  # Ray's one status
    assert webhook.received == [line]


def test_a_submitted_retrain_job_runs_end_to_end(ray_head, job_config, webhook):
    code, line, stderr = submit(ray_head, job_config, webhook.url)
    assert code == 0, stderr[-3000:]
    assert line["status"] == "promoted" and line["promoted"] is True and line["job_status"] == "SUCCEEDED"
    assert webhook.received == [line]
    assert '"status": "promoted"' in stderr  # the job's own logs were followed onto stderr

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{job_config.parent / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("hovle-job", "champion").version) == line["version"]
