"""`hovle train` / `python -m jobs.train`: the HoVLE stages on Ray Train + DeepSpeed, tracked in MLflow.

    python -m jobs.train --config tiny --stage all --run-name nightly \\
        --set train.data.distill=data/distill --set train.data.align=data/align \\
        --set train.data.instruct=data/instruct

`all` runs distill -> align -> instruct, each starting from the previous stage's export (for the
compositional model, `model.architecture: compositional`: align -> instruct; it has no distill stage).
One stage at a time: `--stage align --init <distill export> --data <prepared dataset>`; `--init` also takes
a model folder from `hovle import` (of the `model:` section's model: extend its model.yaml), copied once to
<storage_path>/<run_name>/init-<key> as the export the first stage starts from. Rerunning the same
command with the same run name resumes: finished stages (a complete export) are skipped, an interrupted
one continues from its last checkpoint, and MLflow logging goes on in the same runs.

Where things go (storage_path: a folder or s3://):
    <storage_path>/<run_name>-train/checkpoint_<stage>_<step>/   Ray Train checkpoints (the last K kept)
    <output or storage_path/run_name/exports>/<stage>/     the stage's Hugging Face export

The last line of output is one JSON object: run_name, the exports per stage, the MLflow parent run id.
A bad config, a stage the model does not have, a missing dataset or distill teacher fails here, before any
worker starts (exit 2). A compositional distill teacher given as an MLflow model
(`teacher: compositional:models:/name@alias`) is downloaded here and put on the run's storage
(<storage_path>/<run_name>/teacher), where every worker can read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from jobs import environ_set
from jobs.cli import FAILED, parse_overrides, run_command
from jobs.hooks import Hooks, from_env
from jobs.logging_setup import is_verbose, setup_logging
from jobs.run_config import RunConfig, add_config_arguments, load_run_config
from jobs.train_config import TrainConfig
from model.config import ConfigError
from model.stages import STAGE_NAMES
from pipelines import storage

DEFAULT_START_TIMEOUT_S = 60.0  # Ray Train's default worker-group start timeout (ray.train.v2 constants)
logger = logging.getLogger("jobs.train")


class StageFailed(RuntimeError):
    """Ray Train gave up on a run (its workers failed more often than max_failures allows)."""


def resolve_storage(path: str) -> str:
    """Local storage paths absolute (Ray Train requires it); URIs unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def stage_plan(
    config: TrainConfig,
    stage: str,
    data: str | None,
    init: str | None,
    output: str | None,
    model_type: str = "hovle",
):
    """([(stage, data URI, export URI, manifest)] in order, the first stage's init), local paths made
    absolute (the workers run elsewhere). `stage`: `all` (the stages of `model_type`) or a comma-separated
    list in training order.

    Raises:
        ConfigError: a stage the model does not have, a stage without data, data not a prepared dataset.
    """
    from model import stage_spec, stages_for
    from pipelines.manifest import DatasetNotFound, ManifestError, read_manifest

    if stage == "all":
        stages = [name for name in STAGE_NAMES if name in stages_for(model_type)]
    else:
        stages = stage.split(",")
        for name in stages:
            stage_spec(model_type, name)  # raises for a stage this architecture does not have
        if stages != [name for name in STAGE_NAMES if name in stages]:
            raise ConfigError(f"--stage {stage}: name stages once each, in training order {STAGE_NAMES}")
    if data is not None and len(stages) > 1:
        raise ConfigError("--data names one dataset: use it with one --stage, or set train.data.<stage>")
    exports = resolve_storage(output or storage.join(config.storage_path, config.run_name, "exports"))
    if init is not None and Path(init).exists():
        init = str(Path(init).resolve())  # the workers do not run in this folder
    plan = []
    for name in stages:
        uri = data if data is not None else getattr(config.data, name)
        if uri is None:
            raise ConfigError(f"train.data.{name}: no prepared dataset for stage {name} (or pass --data)")
        uri = resolve_storage(uri)
        try:
            manifest = read_manifest(uri)
        except (DatasetNotFound, ManifestError) as err:
            raise ConfigError(f"train.data.{name}: {err}") from None
        if manifest.stage != name:
            raise ConfigError(
                f"train.data.{name}: {uri} was prepared for stage {manifest.stage!r}, not {name!r}"
            )
        plan.append((name, uri, storage.join(exports, name), manifest))
    return plan, init


def plan_run(run: RunConfig, stage: str, data: str | None, init: str | None, output: str | None):
    """`stage_plan` for `run`: (plan, the first stage's init URI, the config dict of the model the run
    starts from). `--init` (a stage export, or an imported model folder of the `model:` section's model,
    whose tokens and tiling prepared the data) is checked, then copied once to
    `<storage_path>/<run_name>/init-<key>` as an export (jobs/init_model.py): nothing is copied before
    everything is checked.

    Raises:
        ConfigError: a bad `--init` (named so), or what `stage_plan` refuses.
    """
    from jobs.init_model import init_export, model_folder
    from model.presets import config_from_spec, parse_model_spec

    config = run.train
    if init is None:
        start = config_from_spec(parse_model_spec(run.model.model_dump(mode="json"))).to_dict()
    else:
        init = model_folder(init, run.model, "--init")
        start = json.loads(storage.read_text(storage.join(init, "config.json")))
    plan, init = stage_plan(config, stage, data, init, output, start.get("model_type", "hovle"))
    if init is not None:
        init = init_export(init, storage.join(resolve_storage(config.storage_path), config.run_name))
    return plan, init, start


def run_stages(jobs: list, config: TrainConfig) -> None:
    """The stages `jobs` (in order) as one Ray Train run, `<run_name>-train`: one worker group trains them
    all (jobs.train_loop.train_stages), so a later stage costs no new controller, workers or process group
    (a tiny three-stage run: ~100 s -> ~55 s on 2 cores). `max_failures` counts the whole run's restarts;
    `wait_for_workers_s` bounds its waits for the workers' resources in all (`start_limits`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_loop import train_stages

    start_timeout, start_failures = start_limits(config.wait_for_workers_s)
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_stages,
        train_loop_config={"stages": [dataclasses.asdict(job) for job in jobs]},
        torch_config=TorchConfig(backend=config.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.train_run_name,
            storage_path=resolve_storage(config.storage_path),
            failure_config=ray.train.FailureConfig(
                max_failures=config.max_failures, controller_failure_limit=start_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
            # Ray Train's own lines (resources requested, worker group started) only with --verbose
            logging_config=ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
        ),
    )
    # Ray Train passes the driver's value of this variable to its controller, which times each start by it
    with environ_set("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(start_timeout)):
        trainer.fit()


def start_limits(wait_s: float | None) -> tuple[float, int]:
    """(seconds one start of the worker group waits for its resources, starts that may fail after the
    first) so that a run waits about `wait_s` in all; None waits forever. Ray Train counts a start that
    timed out as a controller failure and tries again until `controller_failure_limit` is passed."""
    if wait_s is None:
        return DEFAULT_START_TIMEOUT_S, -1
    timeout = min(DEFAULT_START_TIMEOUT_S, wait_s)
    return timeout, math.ceil(wait_s / timeout) - 1


def train(
    run: RunConfig,
    stage: str,
    data: str | None = None,
    init: str | None = None,
    output: str | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Run `stage` (or all) of `run`; returns {"run_name", "exports": {stage: URI}, "mlflow_run_id"}.
    `source` names the run config (tagged on the MLflow run). Each stage logs into its own MLflow child
    run, made here SCHEDULED (rank 0 marks it RUNNING, then FINISHED once its export is written).

    Raises:
        StageFailed: Ray Train gave up; names the first stage without an export.
    """
    import ray

    from jobs.export import is_export
    from jobs.tracking import RunTracker, require_shared_tracking
    from jobs.train_loop import StageJob

    hooks = Hooks(from_env()).specs  # loaded here too: a bad hook fails before Ray, MLflow or any worker
    config, model = run.train, run.model.model_dump(mode="json")
    plan, init, start = plan_run(run, stage, data, init, output)
    # what the workers get: `config` with the distill teacher where they can read it (MLflow logs `config`)
    job_config = config
    if any(name == "distill" for name, *_ in plan):
        job_config = resolve_teacher(config, (start.get("text_config") or {}).get("hidden_size"))
    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=True)
    require_shared_tracking(config.tracking_uri, sum(node["Alive"] for node in ray.nodes()))
    tracker = RunTracker(config.tracking_uri, config.tracking.experiment)
    parent = tracker.pipeline_run(config.run_name, config.flat(), {"hovle.config": source})
    exports: dict[str, str] = {}
    jobs: list[StageJob] = []
    for name, data_uri, export_uri, manifest in plan:
        if is_export(export_uri):
            logger.info("%s: already exported at %s, skipped", name, export_uri)
        else:
            child = tracker.stage_run(
                parent, name, {"stage": name, "data": data_uri, "init": init or "preset"}
            )
            tracker.log_dict(child, config.model_dump(mode="json"), "config.json")
            tracker.log_dict(child, json.loads(manifest.to_json()), "data_manifest.json")
            tracker.schedule(child)
            jobs.append(
                StageJob(
                    config=job_config.model_dump(mode="json"),
                    model=model,
                    stage=name,
                    data_uri=data_uri,
                    export_uri=export_uri,
                    init_uri=init,
                    run_id=child,
                    tracking_uri=config.tracking_uri,
                    hooks=hooks,
                )
            )
        exports[name] = init = export_uri
    if jobs:
        try:
            run_stages(jobs, config)
        except Exception as err:  # Ray wraps the worker's error; the run failed for good
            unfinished = [job for job in jobs if not is_export(job.export_uri)]
            for job in unfinished:
                tracker.finish(job.run_id, "FAILED" if job is unfinished[0] else "KILLED")
            failed = unfinished[0].stage if unfinished else jobs[-1].stage
            tracker.finish(parent, "FAILED")
            reason = str(err)
            failure = getattr(err, "controller_failure", None)  # a ControllerError's cause
            if type(failure).__name__.startswith("WorkerGroupStartup"):  # its workers did not start
                reason = (
                    f"its {config.scaling.num_workers} workers did not start within "
                    f"train.wait_for_workers_s={config.wait_for_workers_s} (a lost node not replaced, or "
                    f"a cluster smaller than train.scaling asks): {failure}"
                )
            raise StageFailed(
                f"stage {failed} failed: {reason}; rerun to continue from its last checkpoint"
            ) from err
        for job in jobs:  # rank 0 finished each; a run it could not reach is finished here
            tracker.finish_if_open(job.run_id)
    tracker.finish(parent)
    return {"run_name": config.run_name, "exports": exports, "mlflow_run_id": parent}


def resolve_teacher(config: TrainConfig, student_hidden: int | None = None) -> TrainConfig:
    """`config` with a `compositional:` distill teacher checked and readable by every worker: an MLflow
    model (`models:/...`, `runs:/...`) is copied to <storage_path>/<run_name>/teacher; a local folder or
    s3:// export stays; other teachers come back unchanged.

    Raises:
        ConfigError: the teacher cannot be downloaded, is not a compositional model, or its image tokens
            are not `student_hidden` wide (another LLM's input space).
    """
    from model.compositional import MODEL_TYPE
    from model.teachers import COMPOSITIONAL_PREFIX

    settings = config.stages["distill"]
    if not settings.teacher.startswith(COMPOSITIONAL_PREFIX):
        return config
    field, uri = "train.stages.distill.teacher", settings.teacher.removeprefix(COMPOSITIONAL_PREFIX)
    if uri.startswith(("models:/", "runs:/")):
        from mlflow.exceptions import MlflowException

        from jobs.registry import download_hf_folder

        target = storage.join(resolve_storage(config.storage_path), config.run_name, "teacher")
        with tempfile.TemporaryDirectory(prefix="hovle-teacher-") as scratch:
            try:
                folder = download_hf_folder(uri, config.tracking_uri, scratch)
            except (MlflowException, OSError) as err:
                raise ConfigError(f"{field}: cannot download {uri}: {err}") from None
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{field}: {uri} holds no Hugging Face model folder")
            storage.put_directory(str(folder), target)
        logger.info("distill teacher %s copied to %s", uri, target)
        uri = target
    try:
        teacher = json.loads(storage.read_text(storage.join(uri, "config.json")))
    except FileNotFoundError:
        raise ConfigError(
            f"{field}: no model at {uri} (no config.json); expected {COMPOSITIONAL_PREFIX}<a compositional "
            "export, save_pretrained folder or MLflow model URI>"
        ) from None
    if (kind := teacher.get("model_type")) != MODEL_TYPE:
        raise ConfigError(f"{field}: {uri} holds a {kind!r} model, not a {MODEL_TYPE!r} one")
    width = (teacher.get("text_config") or {}).get("hidden_size")
    if None not in (width, student_hidden) and width != student_hidden:
        raise ConfigError(
            f"{field}: the teacher's image tokens are {width} wide, the student's LLM takes "
            f"{student_hidden}: train the compositional teacher on the student's LLM"
        )
    distill = settings.model_copy(update={"teacher": COMPOSITIONAL_PREFIX + uri})
    return config.model_copy(update={"stages": {**config.stages, "distill": distill}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hovle train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", required=True, choices=(*STAGE_NAMES, "all"))
    parser.add_argument(
        "--init",
        default=None,
        help="a stage export or an imported model folder (`hovle import`) to start from "
        "(default: the `model:` section's model)",
    )
    parser.add_argument("--data", default=None, help="prepared dataset URI for a single --stage")
    parser.add_argument(
        "--output", default=None, help="exports root (default <storage_path>/<run_name>/exports)"
    )
    parser.add_argument("--run-name", default=None, help="names the run; the same name resumes it")
    add_config_arguments(parser)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    overrides = parse_overrides(parser, args.set)
    if args.run_name:
        overrides["train.run_name"] = args.run_name

    def body() -> int:
        run = load_run_config(args.config, overrides)
        report = train(run, args.stage, args.data, args.init, args.output, args.config)
        print(json.dumps(report))
        return 0

    return run_command("hovle train", body, {StageFailed: FAILED})


if __name__ == "__main__":
    raise SystemExit(main())
