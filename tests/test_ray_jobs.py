"""`ray job submit ... -- python -m jobs.retrain` against a real local Ray head (`ray start --head`).

The head runs in its own process group with its own temp folder and ports; the test stops exactly that
group (never `ray stop`, which would kill every Ray process on the machine, the test session's too).
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

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
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


def test_a_submitted_retrain_job_runs_end_to_end(ray_head, tmp_path):
    # one stage (instruct, from the preset's model: there is no champion yet) keeps the job short; the
    # three-stage cycle is tests/test_retrain.py's
    raw = {"instruct": [str(generate("instruct", 12, seed=0, output_dir=tmp_path / "raw", image_size=56))]}
    held_out = generate("instruct", 4, seed=5, output_dir=tmp_path / "heldout", image_size=56)
    document = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    document["data"] = {"max_tokens": 256, "val_fraction": 0.0}
    document["train"]["storage_path"] = str(tmp_path / "runs")
    document["train"]["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for stage in document["train"]["stages"].values():
        stage["steps"] = 2
    document["retrain"] = {"raw": raw, "prepared": str(tmp_path / "prepared"), "stages": "instruct"}
    document["eval"] = {"data": str(held_out), "max_samples": 2}
    # the tiny random model has no language nor skills: the gate's floors are lowered for this job test
    document["registry"] = {"name": "hovle-job", "floor": 0.0, "min_text_retained": None}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(document))

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    for _ in range(10):  # the jobs API answers before the head's job agent has registered
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", ray_head, "--working-dir", ".",
             "--runtime-env", "platform/ray/runtime_env.yaml", "--",
             "python", "-m", "jobs.retrain", "--config", str(config)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if "No available agent to submit job" not in submitted.stderr + submitted.stdout:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    summary = json.loads(
        next(line for line in reversed(submitted.stdout.splitlines()) if line.startswith('{"status"'))
    )
    assert summary["status"] == "trained" and summary["promoted"] is True
    assert "succeeded" in submitted.stdout

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("hovle-job", "champion").version) == summary["version"]
