"""`hovle train` / `python -m jobs.train`: the HoVLE stages on Ray Train + DeepSpeed, tracked in MLflow.

    python -m jobs.train --config configs/tiny.yaml --stage all --run-name nightly \\
        --set data.distill=data/distill --set data.align=data/align --set data.instruct=data/instruct

`all` runs distill -> align -> instruct, each starting from the previous stage's export. One stage at a
time: `--stage align --init <distill export> --data <prepared dataset>`. Rerunning the same command with
the same run name resumes: finished stages (a complete export) are skipped, an interrupted one continues
from its last checkpoint, and MLflow logging goes on in the same runs.

Where things go (storage_path: a folder or s3://):
    <storage_path>/<run_name>-<stage>/checkpoint_<step>/   Ray Train checkpoints (the last K kept)
    <output or storage_path/run_name/exports>/<stage>/     the stage's Hugging Face export

The last line of output is one JSON object: run_name, the exports per stage, the MLflow parent run id.
A bad config or a missing dataset fails here, before any worker starts (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jobs.cli import parse_overrides
from jobs.logging_setup import setup_logging
from jobs.train_config import STAGE_ORDER, TrainConfig, load_train_config
from model.config import ConfigError
from pipelines import storage

logger = logging.getLogger("jobs.train")

CRASH_ENV = "HOVLE_TRAIN_CRASH_AT_STEP"  # fault injection (tests): the last rank SIGKILLs itself once


class StageFailed(RuntimeError):
    """Ray Train gave up on a stage (its workers failed more often than max_failures allows)."""


def resolve_storage(path: str) -> str:
    """Local storage paths absolute (Ray Train requires it); URIs unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def stage_plan(config: TrainConfig, stage: str, data: str | None, init: str | None, output: str | None):
    """[(stage, data URI, export URI, manifest)] in order, and the first stage's init; checks the datasets.

    Raises:
        ConfigError: a stage without data, or data that is not a prepared dataset.
    """
    from pipelines.manifest import DatasetNotFound, ManifestError, read_manifest

    stages = list(STAGE_ORDER) if stage == "all" else [stage]
    if data is not None and len(stages) > 1:
        raise ConfigError("--data names one dataset: use it with one --stage, or set train.data.<stage>")
    exports = output or storage.join(resolve_storage(config.storage_path), config.run_name, "exports")
    plan = []
    for name in stages:
        uri = data if data is not None else getattr(config.data, name)
        if uri is None:
            raise ConfigError(f"train.data.{name}: no prepared dataset for stage {name} (or pass --data)")
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


def run_stage(job, config: TrainConfig) -> None:
    """One stage as the Ray Train run <run_name>-<stage>: a rerun of that name resumes from its checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_loop import train_stage

    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_stage,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend=config.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.stage_run_name(job.stage),
            storage_path=resolve_storage(config.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep_last),
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps the worker's error; the stage failed for good
        raise StageFailed(f"stage {job.stage} failed: {err}") from err


def train(
    config_source: str,
    config: TrainConfig,
    stage: str,
    data: str | None = None,
    init: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Run `stage` (or all) and return {"run_name", "exports": {stage: URI}, "mlflow_run_id"}."""
    import ray

    from jobs.export import is_export
    from jobs.tracking import RunTracker
    from jobs.train_loop import StageJob

    plan, init = stage_plan(config, stage, data, init, output)
    if init is None:
        from model import load_preset

        load_preset(config_source)  # a bad model: section fails here, not in every worker
    elif not is_export(init):
        raise ConfigError(f"--init {init}: not a complete stage export (no export.json)")
    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=True)
    tracker = RunTracker(config.tracking_uri, config.tracking.experiment)
    parent = tracker.pipeline_run(config.run_name, config.flat(), {"hovle.config": config_source})
    crash = os.environ.get(CRASH_ENV)
    exports: dict[str, str] = {}
    for name, data_uri, export_uri, manifest in plan:
        if is_export(export_uri):
            logger.info("%s: already exported at %s, skipped", name, export_uri)
        else:
            child = tracker.stage_run(
                parent, name, {"stage": name, "data": data_uri, "init": init or "preset"}
            )
            tracker.log_dict(child, config.model_dump(mode="json"), "config.json")
            tracker.log_dict(child, json.loads(manifest.to_json()), "data_manifest.json")
            job = StageJob(
                config=config.model_dump(mode="json"),
                config_source=config_source,
                stage=name,
                data_uri=data_uri,
                export_uri=export_uri,
                init_uri=init,
                run_id=child,
                tracking_uri=config.tracking_uri,
                crash_at_step=int(crash) if crash else None,
            )
            try:
                run_stage(job, config)
            except StageFailed:
                tracker.finish(child, "FAILED")
                tracker.finish(parent, "FAILED")
                raise
            tracker.finish(child)
        exports[name] = init = export_uri
    tracker.finish(parent)
    return {"run_name": config.run_name, "exports": exports, "mlflow_run_id": parent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hovle train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="run config YAML or preset name (model: + train:)")
    parser.add_argument("--stage", required=True, choices=(*STAGE_ORDER, "all"))
    parser.add_argument("--init", default=None, help="export to start from (default: the preset's model)")
    parser.add_argument("--data", default=None, help="prepared dataset URI for a single --stage")
    parser.add_argument(
        "--output", default=None, help="exports root (default <storage_path>/<run_name>/exports)"
    )
    parser.add_argument("--run-name", default=None, help="names the run; the same name resumes it")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a train: field, e.g. seed=1"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    overrides = parse_overrides(parser, args.set)
    if args.run_name:
        overrides["run_name"] = args.run_name
    try:
        config = load_train_config(args.config, overrides)
        report = train(args.config, config, args.stage, args.data, args.init, args.output)
    except (ConfigError, FileNotFoundError) as err:
        print(f"hovle train: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"hovle train: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
