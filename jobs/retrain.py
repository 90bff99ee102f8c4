"""`hovle retrain` / `python -m jobs.retrain --config C`: the scheduled pipeline, one cycle per call.

    lock -> prepare new raw data (incremental) -> nothing new? exit 0 -> train (all stages, or instruct from
    the champion) -> evaluate -> log + register -> the promotion gate -> record the cycle -> unlock

Run it from cron, a Kubernetes CronJob or a RayCronJob (`ray job submit ... -- python -m jobs.retrain ...`).
A cycle is keyed by the data version (a hash of the prepared manifests' contents): its training run is
named `retrain-<version>`, so a cycle that crashed part-way continues when rerun (prepared data stays,
finished stages are skipped, the interrupted one resumes from its checkpoint, and evaluation and
registration are done once, recorded in `<storage_path>/retrain/state.json`).

The run config's `retrain:` section names the raw inputs per stage, where prepared datasets live and which
stages train; `eval:` the held-out set; `registry:` the model name and the gate (jobs.registry.GateSettings);
`train:` and `data:` as for `hovle train` / `hovle prepare` (jobs.run_config).

Exit codes (for schedulers):
    0  the cycle finished (promoted or not: see `promoted` in the JSON line), or nothing new to train on
    2  a bad config or missing input
    3  another retrain holds the lock (not an error: the next schedule tick retries)
    1  the cycle failed (a stage failed beyond max_failures, or anything unexpected); rerun to continue
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from jobs.cli import parse_overrides
from jobs.lock import LockHeld, StorageLock
from jobs.logging_setup import setup_logging
from jobs.run_config import EvalSettings, RetrainSettings, RunConfig, add_config_arguments, load_run_config
from jobs.train import StageFailed, resolve_storage
from jobs.train_config import STAGE_ORDER
from model.config import ConfigError
from pipelines import storage

logger = logging.getLogger("jobs.retrain")

LOCKED = 3


def load_settings(run: RunConfig, source: str) -> tuple[RetrainSettings, EvalSettings]:
    """The run config's `retrain:` and `eval:` sections, which a cycle needs."""
    if run.retrain is None:
        raise ConfigError(f"{source}: no `retrain:` section (raw inputs per stage, the prepared root)")
    if run.eval is None:
        raise ConfigError(f"{source}: no `eval:` section (the held-out set the cycle is evaluated on)")
    return run.retrain, run.eval


def data_version(datasets: dict[str, str]) -> str:
    """A hash of what the prepared datasets hold (their units and shards), not of when they were written."""
    from pipelines.manifest import read_manifest

    content = {}
    for stage, uri in sorted(datasets.items()):
        manifest = read_manifest(uri)
        content[stage] = sorted((u.key, [s.sha256 for s in u.shards]) for u in manifest.units)
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]


class CycleState:
    """What the last cycles did, in `<storage_path>/retrain/state.json` (one entry per data version)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.cycles: dict[str, dict[str, Any]] = (
            json.loads(storage.read_text(uri)).get("cycles", {}) if storage.exists(uri) else {}
        )

    def get(self, version: str) -> dict[str, Any]:
        return self.cycles.setdefault(version, {})

    def save(self) -> None:
        storage.write_text_atomic(self.uri, json.dumps({"cycles": self.cycles}, indent=2, sort_keys=True))


def champion_export(name: str, tracking_uri: str, scratch: str) -> str | None:
    """The champion's Hugging Face folder, downloaded into `scratch` (None when there is no champion)."""
    from mlflow import MlflowClient

    from jobs.registry import champion_version, download_hf_folder

    if champion_version(MlflowClient(tracking_uri), name) is None:
        return None
    return str(download_hf_folder(f"models:/{name}@champion", tracking_uri, scratch))


def retrain(config_path: str, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """One cycle (see the module docstring); returns the JSON summary."""
    run = load_run_config(config_path, overrides)
    settings, evaluation = load_settings(run, config_path)
    train_config, data_settings = run.train, run.data
    stages = list(STAGE_ORDER) if settings.stages == "all" else ["instruct"]
    missing = [s for s in stages if not settings.raw.get(s)]
    if missing:
        raise ConfigError(f"{config_path}: retrain.raw has no inputs for stage(s) {', '.join(missing)}")
    root = storage.join(resolve_storage(train_config.storage_path), "retrain")
    with StorageLock(storage.join(root, "lock.json"), settings.lock_ttl_s) as lock:
        datasets = _prepare(config_path, settings, stages, data_settings)
        version = data_version(datasets)
        state = CycleState(storage.join(root, "state.json"))
        cycle = state.get(version)
        if cycle.get("done"):
            logger.info("nothing new since data version %s (cycle done): nothing to do", version)
            return {"status": "nothing_to_do", "data_version": version, **cycle.get("summary", {})}
        lock.refresh()
        return _cycle(run, config_path, evaluation, datasets, version, state, lock)


def _prepare(config_path, settings: RetrainSettings, stages: list[str], data_settings) -> dict[str, str]:
    from pipelines.prepare import prepare

    datasets = {}
    for stage in stages:
        output = storage.join(settings.prepared, stage)
        report = prepare(config_path, stage, settings.raw[stage], output, data_settings)
        logger.info("%s: %d new records written (%s)", stage, report["written"], output)
        datasets[stage] = output
    return datasets


def _cycle(run: RunConfig, config_path: str, evaluation: EvalSettings, datasets, version, state, lock):
    from jobs.evaluate import build_parser
    from jobs.evaluate import evaluate as run_evaluation
    from jobs.registry import log_hovle_model, promote, register, source_commit
    from jobs.train import train

    settings, gate, train_config = run.retrain, run.registry, run.train
    cycle = state.get(version)
    tracking_uri = train_config.tracking_uri
    config = train_config.model_copy(
        update={
            "run_name": f"retrain-{version}",
            "data": train_config.data.model_copy(update=datasets),
        }
    )
    with tempfile.TemporaryDirectory(prefix="hovle-retrain-") as scratch:
        init = champion_export(gate.name, tracking_uri, scratch) if settings.stages == "instruct" else None
        if settings.stages == "instruct" and init is None:
            logger.info("no champion yet: instruct starts from the preset's model")
        stage = "all" if settings.stages == "all" else "instruct"
        report = train(run.model_copy(update={"train": config}), stage, init=init, source=config_path)
    final = report["exports"]["instruct"]
    lock.refresh()

    if "scores" not in cycle:
        argv = ["--model", final, "--data", evaluation.data, "--run-id", report["mlflow_run_id"]]
        argv += ["--tracking-uri", tracking_uri]
        argv += ["--text", evaluation.text] if evaluation.text else []
        argv += ["--base", evaluation.base] if evaluation.base else []
        argv += ["--max-samples", str(evaluation.max_samples)] if evaluation.max_samples else []
        with tempfile.TemporaryDirectory(prefix="hovle-eval-") as out:
            summary = run_evaluation(build_parser().parse_args(argv), Path(out))
        cycle["scores"] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        state.save()
    if "model_version" not in cycle:
        model_uri = log_hovle_model(final, report["mlflow_run_id"], tracking_uri)
        tags = {
            "hovle.data_version": version,
            "hovle.data_manifests": json.dumps(datasets),
            "hovle.config_hash": hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12],
            "hovle.source_commit": source_commit(),
            "hovle.run_name": config.run_name,
        }
        cycle["model_version"] = register(model_uri, gate.name, tags, cycle["scores"], tracking_uri)
        state.save()
    from mlflow import MlflowClient

    decision = promote(MlflowClient(tracking_uri), gate.name, cycle["model_version"], gate)
    cycle["summary"] = {
        "model": gate.name,
        "version": cycle["model_version"],
        "promoted": decision.champion,
        "reason": decision.reason,
        "scores": cycle["scores"],
        "run_name": config.run_name,
        "mlflow_run_id": report["mlflow_run_id"],
    }
    cycle["done"] = True
    state.save()
    return {"status": "trained", "data_version": version, **cycle["summary"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hovle retrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        summary = retrain(args.config, parse_overrides(parser, args.set))
    except LockHeld as err:
        print(f"hovle retrain: {err}", file=sys.stderr)
        return LOCKED
    except (ConfigError, FileNotFoundError) as err:
        print(f"hovle retrain: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"hovle retrain: {err}; rerun to continue from what is done", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
