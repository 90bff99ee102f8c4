"""Shared test set-up: the same offline, quiet environment `make test` exports."""

import os
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# the Makefile's machine-wide caches, shared by every clone (compiled ops per torch version)
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hovle"
_TORCH = version("torch").split("+")[0]

# setdefault: a value the caller exported (the Makefile, CI) wins.
for _name, _value in {
    "TORCH_EXTENSIONS_DIR": str(_CACHE / "torch_extensions" / f"torch-{_TORCH}"),
    "HOVLE_CACHE_DIR": str(_CACHE),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # One intra-op thread for the test process and what it starts (a demo, a served model, a Ray head):
    # the suite's models are tiny, and on 2 cores shared with Ray's daemons two OpenMP threads wait out
    # each other's time slices at every small op (a tiny model's 72 answers: 107 s at 2 threads under
    # load, 0.8 s at 1). Training workers set their own count (train.scaling.threads_per_worker).
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The slowest files (minutes each: a README walk-through, a multi-service stack, whole training cycles)
# first, so that under `make test`'s two processes (pytest-xdist, a file per process at a time) the quick
# files fill in around them at the end instead of leaving one process alone with a long file.
SLOWEST_FIRST = (
    "test_readme.py", "test_stack.py", "test_train.py", "test_reproduce.py",
    "test_retrain.py", "test_compositional.py", "test_platform_image.py", "test_llm_families.py",
    "test_cpu_budget.py", "test_import_finetune.py", "test_prepare.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


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

    # the workers load tests/worker_plugins (an image format that segfaults its decoder: a fault from
    # outside for the crash-quarantine test)
    plugins = str(REPO_ROOT / "tests" / "worker_plugins")
    path = os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH", "")) if p)
    # address="local": a runtime of its own even where `ray start` left a cluster on this machine
    # (/tmp/ray/ray_current_cluster), which a bare ray.init() would join
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )  # fmt: skip
    yield
    ray.shutdown()
