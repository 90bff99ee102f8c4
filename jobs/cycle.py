"""One cycle, the same for `hovle demo` and `hovle retrain`: prepare -> train -> evaluate -> register -> gate.

    datasets = prepare_cycle(run, raw, prepared_root)        Ray Data, incremental (jobs.prepare)
    summary = run_cycle(run, datasets, state)                train (all stages, or instruct from `init`),
                                                             evaluate on `run.eval`, register the instruct
                                                             export under `run.registry.name`, the gate

`state` is a mutable mapping the caller may persist (`save` is called after each step that must not be
repeated): a cycle that crashed after evaluation registers without evaluating again, one that crashed
after registration only applies the gate. `fence` is called before the registry changes (a version, an
alias); a caller that may have lost its lock raises there. Training itself resumes from its checkpoints
when the run name is reused (jobs.train).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from jobs.run_config import RunConfig
from model.config import ConfigError

logger = logging.getLogger(__name__)


def prepare_cycle(run: RunConfig, raw: dict[str, list[str]], prepared_root: str) -> dict[str, dict[str, Any]]:
    """Each stage's raw inputs -> `<prepared_root>/<stage>`; returns each stage's prepare report (its
    dataset URI is the report's `output`)."""
    from jobs.prepare import prepare_stages
    from pipelines import storage

    return prepare_stages(run, raw, {stage: storage.join(prepared_root, stage) for stage in raw})


def run_cycle(
    run: RunConfig,
    datasets: dict[str, str],
    state: MutableMapping[str, Any],
    save: Callable[[], None] = lambda: None,
    *,
    fence: Callable[[], None] = lambda: None,
    stage: str = "all",
    init: str | None = None,
    source: str = "",
    tags: dict[str, str] | None = None,
    eval_output: Path | None = None,
) -> dict[str, Any]:
    """Train `stage` ("all" or "instruct") of `run` on `datasets`, evaluate the instruct export with
    `run.eval`, register it with the scores (and `tags`) and apply `run.registry`'s gate. Returns the
    summary (model, version, promoted, reason, scores, run_name, mlflow_run_id, export, and the seconds
    each step took this call), also kept in `state["summary"]` with `state["done"] = True`.

    Raises:
        ConfigError: the run config has no `eval:` section.
    """
    from mlflow import MlflowClient

    from jobs.evaluate import run_evaluation
    from jobs.registry import promote, source_commit
    from jobs.train import train

    if run.eval is None:
        raise ConfigError(
            f"{source or 'run config'}: no `eval:` section (the held-out set a cycle is evaluated on)"
        )
    config = run.train.model_copy(update={"data": run.train.data.model_copy(update=datasets)})
    tracking_uri, gate = config.tracking_uri, run.registry
    timings, started = {}, time.perf_counter()
    report = train(run.model_copy(update={"train": config}), stage, init=init, source=source)
    export, run_id = report["exports"]["instruct"], report["mlflow_run_id"]
    timings["train"], started = time.perf_counter() - started, time.perf_counter()

    place = placement(run.eval)
    if "scores" not in state:
        summary = place(run_evaluation, export, run.eval, tracking_uri, run_id, eval_output, gpus=True)
        state["scores"] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        save()
        timings["evaluate"], started = time.perf_counter() - started, time.perf_counter()
    if "model_version" not in state:
        all_tags = {
            "hovle.data_manifests": json.dumps(datasets),
            "hovle.config_hash": hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12],
            "hovle.source_commit": source_commit(),
            "hovle.run_name": config.run_name,
            **(tags or {}),
        }
        fence()
        version = place(log_and_register, export, run_id, gate.name, all_tags, state["scores"], tracking_uri)
        state["model_version"] = version
        save()
    fence()
    decision = promote(MlflowClient(tracking_uri), gate.name, state["model_version"], gate)
    timings["register"] = time.perf_counter() - started
    state["summary"] = {
        "model": gate.name,
        "version": state["model_version"],
        "promoted": decision.champion,
        "reason": decision.reason,
        "scores": state["scores"],
        "run_name": config.run_name,
        "mlflow_run_id": run_id,
        "export": export,
    }
    state["done"] = True
    save()
    return {**state["summary"], "timings": timings}


def log_and_register(
    export: str, run_id: str, name: str, tags: dict[str, str], scores: dict[str, float], tracking_uri: str
) -> str:
    """The export logged as an MLflow model in `run_id` and registered as a version of `name`."""
    from jobs.registry import log_hovle_model, register

    return register(log_hovle_model(export, run_id, tracking_uri), name, tags, scores, tracking_uri)


def placement(settings) -> Callable[..., Any]:
    """`place(fn, *args, gpus=False)`: `fn(*args)` in a Ray task reserving `settings.num_cpus` (and
    `num_gpus` when `gpus`), or here. `settings.placement` auto: tasks when the Ray runtime this process
    is connected to has more than one node (the driver then is a head that should not load models)."""
    import ray

    where = settings.placement
    if where == "auto":
        alive = [node for node in ray.nodes() if node.get("Alive")] if ray.is_initialized() else []
        where = "task" if len(alive) > 1 else "driver"
    if where == "task" and not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)

    def place(fn: Callable[..., Any], *args: Any, gpus: bool = False) -> Any:
        if where == "driver":
            return fn(*args)
        resources = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus if gpus else 0}
        logger.info("%s in a Ray task (%s)", fn.__name__, resources)
        return ray.get(ray.remote(**resources)(fn).options(name=fn.__name__).remote(*args))

    return place
