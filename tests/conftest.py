"""Shared test set-up: the same offline, quiet environment `make test` exports."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# setdefault: a value the caller exported (the Makefile, CI) wins.
for _name, _value in {
    "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".cache" / "torch_extensions"),
    "HOVLE_CACHE_DIR": str(REPO_ROOT / ".cache" / "hovle"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture
def tmp_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh empty directory made the current working directory for the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# S3 on loopback (moto's server) for every module; see tests/s3_fixtures.py.
from tests.s3_fixtures import s3_bucket, s3_server  # noqa: E402, F401  (pytest fixtures)


@pytest.fixture(scope="session")
def ray_session(s3_server):  # noqa: F811
    """One local Ray runtime (2 CPUs) for the test session, stopped at its end; only what it started.

    It starts after the S3 server, so its worker processes inherit the endpoint and test credentials
    (s3_server puts them in the environment), as a cluster's nodes would have them.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
