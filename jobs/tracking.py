"""MLflow tracking: one parent run per pipeline run, one child run per stage, found again on resume.

    driver:  runs = RunTracker(uri, experiment)
             parent = runs.pipeline_run("nightly", params, tags)    # the same id on every rerun
             child = runs.stage_run(parent, "align", params)        # likewise, per stage
    rank 0:  with StageLogger(uri, child) as log: log.metrics({...}, step)

Runs are found by tags (`hovle.run_name`, `hovle.stage`, `mlflow.parentRunId`), so a restarted stage (worker
failure, or the whole job rerun with the same run name) logs into the run it started, and metrics at steps
it already logged are simply logged again at the same step (MLflow keeps both points; charts show one line).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "hovle.run_name"
KIND_TAG = "hovle.kind"
STAGE_TAG = "hovle.stage"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI as MLflow's own tools read it, else `configured`, else a SQLite file in the
    working folder (absolute, so Ray workers started elsewhere write to the same file)."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or configured
        or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    )


def node_local_store(uri: str) -> bool:
    """Whether `uri` is a store on this machine's disk (a SQLite file, a folder), which workers on other
    nodes cannot reach."""
    if uri == "databricks" or uri.startswith("databricks:"):  # MLflow's name for a hosted server
        return False
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme in ("", "sqlite", "file") or len(scheme) == 1  # "" or "C": a plain path


def require_shared_tracking(uri: str, nodes: int) -> None:
    """Refuse a node-local tracking store on a cluster of more than one node: each stage's rank-0 worker
    logs from whichever node it runs on, and would write its own file there, out of the driver's sight.

    Raises:
        ConfigError: `nodes` > 1 and `uri` is a local file or folder.
    """
    from model.config import ConfigError

    if nodes > 1 and node_local_store(uri):
        raise ConfigError(
            f"the MLflow tracking store {uri} is a file on this node, but the Ray cluster has {nodes} nodes: "
            "workers elsewhere could not log to it. Run an MLflow tracking server (platform/README.md) and "
            "set MLFLOW_TRACKING_URI=http://... (or train.tracking.uri)"
        )


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class RunTracker:
    """Creates or finds the pipeline's parent run and its stage runs (driver side)."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.experiment_id = experiment_id(self.client, experiment)

    def _run(self, query: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The oldest run matching `query` (marked RUNNING again), else a new one with `tags` and `params`."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time ASC"]
        )
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            logger.info("MLflow: resuming run %s (%s)", run_name, found[0].info.run_id)
            return found[0].info.run_id
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        log_params(self.client, run_id, params)
        logger.info("MLflow: run %s (%s) at %s", run_name, run_id, self.uri)
        return run_id

    def pipeline_run(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """The parent run of pipeline `run_name`: the existing one, else a new one with `params`."""
        query = f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{KIND_TAG}` = 'pipeline'"
        tags = {RUN_NAME_TAG: run_name, KIND_TAG: "pipeline", **(tags or {})}
        return self._run(query, run_name, tags, params)

    def stage_run(self, parent_id: str, stage: str, params: dict[str, Any]) -> str:
        """The child run of `stage` under `parent_id`: the existing one, else a new one with `params`."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{STAGE_TAG}` = '{stage}'"
        run_name = f"{self.client.get_run(parent_id).data.tags.get(RUN_NAME_TAG, 'hovle')}-{stage}"
        tags = {PARENT_TAG: parent_id, STAGE_TAG: stage, KIND_TAG: "stage"}
        return self._run(query, run_name, tags, params)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def finish_if_open(self, run_id: str) -> None:
        """FINISHED, unless the run already ended (rank 0 ends a stage's run when its export is written)."""
        if self.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            self.finish(run_id)

    def schedule(self, run_id: str) -> None:
        """Mark a stage's run as waiting for its turn (jobs.train makes every stage's run up front)."""
        self.client.update_run(run_id, status="SCHEDULED")

    def log_dict(self, run_id: str, payload: dict[str, Any], name: str) -> None:
        self.client.log_dict(run_id, payload, name)


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when it does not exist yet."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def log_results(client, run_id: str, params: dict[str, Any], metrics: dict[str, float], files: list) -> None:
    """Params, metrics (step 0) and files as artifacts into the run `run_id`; a run that already holds
    other values for the params keeps them (a model evaluated again with other inputs)."""
    from mlflow.exceptions import MlflowException

    try:
        log_params(client, run_id, params)
    except MlflowException as err:
        logger.warning("MLflow run %s already has other params; keeping them (%s)", run_id, err.message)
    log_metrics(client, run_id, metrics, 0)
    for path in files:
        client.log_artifact(run_id, str(path))


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step`, one batch, all stamped now."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log flat params in batches (MLflow takes at most 100 per call); long values are cut."""
    from mlflow.entities import Param

    items = [
        Param(key, (json.dumps(value) if not isinstance(value, str) else value)[:_MAX_PARAM_LENGTH])
        for key, value in sorted(params.items())
    ]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


class StageLogger:
    """Rank 0's handle on a stage's run: metrics, text artifacts and MLflow's system metrics.

    Used as a context manager: entering marks the run RUNNING; leaving stops the system-metrics thread
    but keeps the run open (a restarted worker group logs into the same run); `finish` ends it once the
    stage's export is written.
    """

    def __init__(self, uri: str, run_id: str, system_metrics: bool = True, sampling_s: float = 5.0) -> None:
        self.uri, self.run_id = uri, run_id
        self.system_metrics, self.sampling_s = system_metrics, sampling_s
        self.client = _client(uri)
        self._monitor = None

    def __enter__(self) -> StageLogger:
        self.client.update_run(self.run_id, status="RUNNING")
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a restarted stage continues the run's system-metric steps
            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.sampling_s, samples_before_logging=1, resume_logging=True,
                tracking_uri=self.uri,
            )  # fmt: skip
            self._monitor.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")

    def metrics(self, values: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, values, step)


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, load_model) on `uri` inside the block only.

    `mlflow.set_tracking_uri` is process-global and also exports MLFLOW_TRACKING_URI (for subprocesses), so
    a job that called it would leave every later MLflow use in the process pointing at its store. The
    previous URI and environment are restored on exit.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, exported = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported
