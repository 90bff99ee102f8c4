"""`make stack` (platform/stack/stack.py) and a retraining cycle submitted to it as a scheduler submits one.

The stack is the compose file's services without Docker, on loopback: moto's S3 server, PostgreSQL behind
MLflow's server (artifacts in the bucket, basic auth), a Ray head and a second Ray node. The cycle is
`hovle submit` (`ray job submit` underneath) with every path an `s3://` URI and tracking on the server;
the stack gets fake AWS and MLflow secrets from the environment, and afterwards the server's database, the
bucket and the Ray logs are scanned for them. A training stage with one worker per node loses the second
node mid-stage (SIGKILL of its process group), waits, and resumes on a replacement node (`stack.py node`).
One stack for the module; `stack.py down` stops exactly its process groups (never `ray stop`, which would
stop the test session's Ray too).
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from model.config_files import CONFIG_DIR
from pipelines.corpora.synthetic import generate
from tests.conftest import REPO_ROOT
from tests.helpers import shapes_image
from tests.test_submit import Webhook

pytestmark = pytest.mark.slow

STACK = REPO_ROOT / "platform" / "stack" / "stack.py"
# what the stack is given, and what must never surface in what it stores or logs
SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIAFAKE{secrets.token_hex(6).upper()}",
    "AWS_SECRET_ACCESS_KEY": f"fake-aws-secret-{secrets.token_hex(12)}",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": f"fake-mlflow-password-{secrets.token_hex(12)}",
}
NEVER_STORED = [SECRETS["AWS_SECRET_ACCESS_KEY"], SECRETS["MLFLOW_TRACKING_PASSWORD"]]


def read_env_file(path: Path) -> dict[str, str]:
    return dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in path.read_text().splitlines()
    )


@pytest.fixture(scope="module")
def stack():
    """`stack.py up --free-ports` in a folder of its own (short: Ray's socket paths are limited); yields
    (folder, the client environment it wrote, its state)."""
    folder = Path(tempfile.mkdtemp(prefix="stack-", dir="/tmp"))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING", "RAY_ADDRESS"))
    }
    env.update(SECRETS)
    up = subprocess.run(
        [sys.executable, str(STACK), "up", "--dir", str(folder), "--free-ports"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    state = json.loads((folder / "stack.json").read_text()) if (folder / "stack.json").exists() else {}
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield folder, read_env_file(folder / "env.sh"), state
    finally:
        down = subprocess.run([sys.executable, str(STACK), "down", "--dir", str(folder)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert down.returncode == 0, down.stderr
        for pgid in state.get("groups", {}).values():  # exactly its processes, and all of them, gone
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)


def s3fs_for(client: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(
        key=client["AWS_ACCESS_KEY_ID"], secret=client["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": client["AWS_ENDPOINT_URL"]},
    )  # fmt: skip


@pytest.fixture(scope="module")
def job_config(stack, tmp_path_factory) -> Path:
    """A one-stage retrain config (instruct from the preset's weights: no champion yet) whose every path is
    in the stack's bucket, tracking on its MLflow server; the raw corpora uploaded there first."""
    _, client, _ = stack
    local = tmp_path_factory.mktemp("stack-data")
    raw = generate("instruct", 12, seed=0, output_dir=local / "raw", image_size=56)
    held_out = generate("instruct", 4, seed=5, output_dir=local / "heldout", image_size=56)
    fs = s3fs_for(client)
    fs.put(str(raw.parent), "hovle/data/raw", recursive=True)
    fs.put(str(held_out.parent), "hovle/data/heldout", recursive=True)
    document = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    document["data"] = {"max_tokens": 256, "val_fraction": 0.0}
    document["train"]["storage_path"] = "s3://hovle/runs"
    document["train"]["tracking"]["uri"] = client["MLFLOW_TRACKING_URI"]
    for stage in document["train"]["stages"].values():
        stage["steps"] = 2
    document["retrain"] = {
        "raw": {"instruct": [f"s3://hovle/data/raw/{raw.name}"]},
        "prepared": "s3://hovle/prepared",
        "stages": "instruct",
    }
    document["eval"] = {"data": f"s3://hovle/data/heldout/{held_out.name}", "max_samples": 2}
    # the tiny random model has no language nor skills: the gate's floors are lowered for this job test
    document["registry"] = {"name": "hovle-stack", "floor": 0.0, "min_text_retained": None}
    config = local / "config.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def submit(client: dict[str, str], config: Path, webhook_url: str) -> tuple[int, dict, str]:
    """`python -m jobs.submit` as the scheduler runs it, with the client environment `make stack` wrote
    (the token from ~/.ray/auth_token): (exit code, its one stdout line, its stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING", "RAY_"))}
    env.update(client, HOVLE_WEBHOOK_URL=webhook_url)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", client["RAY_ADDRESS"], "--config", str(config),
         "--working-dir", ".", "--runtime-env", "platform/ray/runtime_env.yaml", "--poll-s", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, json.loads(lines[0]), done.stderr


@pytest.fixture(scope="module")
def cycle(stack, job_config):
    """The cycle as submitted, after a first submission that a held lock turned away."""
    from jobs.lock import StorageLock

    _, client, _ = stack
    webhook = Webhook()
    try:
        # a cycle still running elsewhere holds the lock in the bucket
        with pytest.MonkeyPatch.context() as patch:
            for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                patch.setenv(name, client[name])
            with StorageLock("s3://hovle/runs/retrain/lock.json", ttl_s=600):
                locked = submit(client, job_config, webhook.url)
        done = submit(client, job_config, webhook.url)
        return locked, done, list(webhook.received)
    finally:
        webhook.close()


def test_a_cycle_locked_out_on_the_stack_is_reported_locked(cycle):
    (code, line, stderr), _, received = cycle
    assert code == 3, stderr[-3000:]
    assert line["status"] == "locked" and "another run holds" in line["reason"]
    assert line["job_id"].startswith("raysubmit_") and line["job_status"] == "FAILED"  # Ray's one status
    assert received[0] == line


def test_a_submitted_cycle_on_the_stack_crowns_a_champion_served_from_the_bucket(stack, cycle, tmp_path):
    folder, client, _ = stack
    _, (code, line, stderr), received = cycle
    assert code == 0, stderr[-3000:]
    assert line["status"] == "promoted" and line["job_status"] == "SUCCEEDED" and received[1] == line
    assert '"status": "promoted"' in stderr  # the job's own logs were followed onto stderr
    # two nodes: the job driver (a head's process) evaluated and logged the model in Ray tasks
    assert "run_evaluation in a Ray task" in stderr and "log_and_register in a Ray task" in stderr

    # the champion is in the server's registry (PostgreSQL), its files in the bucket under the server's
    # artifact root
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            patch.setenv(name, client[name])
        registry = MlflowClient(client["MLFLOW_TRACKING_URI"])
        champion = registry.get_model_version_by_alias("hovle-stack", "champion")
    assert str(champion.version) == line["version"]
    stored = s3fs_for(client).find("hovle/mlflow")
    assert any(path.endswith("/MLmodel") for path in stored), stored[:20]
    assert any(path.endswith("model.safetensors") for path in stored)
    assert s3fs_for(client).find("hovle/prepared") and s3fs_for(client).find("hovle/runs/retrain")

    # a process with only the tracking URI and the MLflow credentials (no AWS keys, no endpoint) loads and
    # asks it: the server serves the artifacts
    buffer = io.BytesIO()
    shapes_image().save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    script = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/hovle-stack@champion')\n"
        f"question = {{'prompt': 'What is it?', 'image': {image!r}}}\n"
        "out = model.predict([question], params={'max_new_tokens': 2})\n"
        "print(json.dumps(list(out['answer'])))\n"
    )
    keep = ("PATH", "HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "HOVLE_CACHE_DIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        {
            k: client[k]
            for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        }
    )
    asked = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert asked.returncode == 0, asked.stderr[-3000:]
    [answer] = json.loads(asked.stdout.strip().splitlines()[-1])
    assert isinstance(answer, str)


# ---- a node lost mid-stage ---------------------------------------------------------------------------------
def jobs_api(client: dict[str, str], path: str) -> dict:
    """GET the Ray Jobs REST API of the stack, with the token `make stack`'s head wrote."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(
        f"{client['RAY_ADDRESS']}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def submit_training(client: dict[str, str], config: Path, run_name: str, hooks: str = "") -> str:
    """`ray job submit --no-wait` of `hovle train --stage instruct` on the stack; returns the job's id."""
    runtime_env = yaml.safe_load((REPO_ROOT / "platform" / "ray" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["HOVLE_HOOKS"] = hooks
    env_file = config.parent / f"{run_name}-runtime-env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING", "RAY_"))}
    env.update(client)
    job_id = f"train-{run_name}-{secrets.token_hex(4)}"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", client["RAY_ADDRESS"],
         "--submission-id", job_id, "--no-wait", "--working-dir", ".", "--runtime-env", str(env_file),
         "--", "python", "-m", "jobs.train", "--config", str(config), "--stage", "instruct",
         "--run-name", run_name],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return job_id


def wait_for_job(client: dict[str, str], job_id: str, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := jobs_api(client, job_id)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"{job_id} still {status} after {timeout_s} s"
        time.sleep(2)
    return status


def alive_nodes(client: dict[str, str]) -> list[dict]:
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "list", "nodes", "--address", client["RAY_ADDRESS"],
         "--format", "json", "--filter", "state=ALIVE"],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-2000:]
    return json.loads(listed.stdout)


def test_a_stage_that_loses_a_node_waits_for_a_new_one_and_resumes_to_an_uninterrupted_runs_weights(
    stack, cycle, tmp_path
):
    """Two workers, one per node (STRICT_SPREAD); mid-stage the second node's processes are SIGKILLed by
    their process group. The run waits (the job stays RUNNING with one node left) until `stack.py node`
    starts a replacement, then resumes from the last checkpoint to an uninterrupted run's weights."""
    from safetensors.torch import load

    from tests import faults

    folder, client, state = stack
    assert cycle[1][0] == 0  # the cycle prepared s3://hovle/prepared/instruct
    document = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    train = document["train"]
    train["storage_path"] = "s3://hovle/runs"
    train["tracking"]["uri"] = client["MLFLOW_TRACKING_URI"]
    train["scaling"] = {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD"}
    train["stages"]["instruct"]["steps"] = 6
    train["checkpoint"] = {"every_n_steps": 2, "keep_last": 2}
    train["data"] = {**train.get("data", {}), "instruct": "s3://hovle/prepared/instruct"}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(document))

    assert wait_for_job(client, submit_training(client, config, "two-nodes-straight")) == "SUCCEEDED"

    run = f"two-nodes-lost-{secrets.token_hex(3)}"
    marker = faults.pause_marker(f"{run}-train")
    job_id = submit_training(client, config, run, hooks=faults.spec("pause_at_step_3"))
    deadline = time.monotonic() + 300
    while not marker.exists():  # step 2's checkpoint is committed, every rank stands at step 3
        assert time.monotonic() < deadline and jobs_api(client, job_id)["status"] in ("PENDING", "RUNNING")
        time.sleep(1)
    marker.unlink()
    os.killpg(state["groups"]["ray-node-1"], signal.SIGKILL)  # the node's raylet, agents and its worker
    deadline = time.monotonic() + 120
    while len(alive_nodes(client)) > 1:  # the head notices the node is gone
        assert time.monotonic() < deadline, "the killed node is still listed alive"
        time.sleep(2)
    time.sleep(10)
    assert jobs_api(client, job_id)["status"] == "RUNNING"  # waiting for a second node, not failed

    added = subprocess.run([sys.executable, str(STACK), "node", "--dir", str(folder)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert added.returncode == 0, added.stderr[-3000:]
    assert added.stdout.startswith("ray-node-2 joined")
    assert wait_for_job(client, job_id) == "SUCCEEDED", jobs_api(client, f"{job_id}/logs")["logs"][-3000:]

    fs = s3fs_for(client)
    info = json.loads(fs.cat_file(f"hovle/runs/{run}/exports/instruct/export.json"))
    assert info["resumed_from_step"] == 2 and info["steps"] == 6
    resumed = load(fs.cat_file(f"hovle/runs/{run}/exports/instruct/model.safetensors"))
    straight = load(fs.cat_file("hovle/runs/two-nodes-straight/exports/instruct/model.safetensors"))
    assert resumed.keys() == straight.keys()
    worst = max((resumed[k].float() - straight[k].float()).abs().max().item() for k in straight)
    assert worst <= 1e-5, worst  # the data position was exact


def test_no_credential_reaches_the_database_the_bucket_or_the_ray_logs(stack, cycle):
    folder, client, state = stack
    assert cycle[1][0] == 0  # the scan is of a stack that ran a whole cycle
    database = read_env_file(folder / "postgres.env")
    dumped = b""
    for name in ("mlflow", "mlflow_auth"):
        dump = subprocess.run(
            [str(next(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))), "--data-only", name],
            env={**os.environ, **database}, capture_output=True, timeout=120,
        )  # fmt: skip
        assert dump.returncode == 0, dump.stderr[-2000:]
        dumped += dump.stdout
    assert b"hovle-stack" in dumped and b"vqa_accuracy" in dumped  # the dump holds the cycle's records
    fs = s3fs_for(client)
    objects = fs.find("hovle")
    assert len(objects) > 10
    logs = [p for p in Path(state["ray_temp"]).rglob("*") if p.is_file() and "logs" in p.parts]
    assert logs
    for secret in NEVER_STORED:
        needle = secret.encode()
        assert needle not in dumped, "a secret in MLflow's database"
        leaked = [path for path in objects if needle in fs.cat_file(path)]
        assert not leaked, f"a secret in the bucket: {leaked}"
        leaked = [str(path) for path in logs if needle in path.read_bytes()]
        assert not leaked, f"a secret in the Ray logs: {leaked}"
