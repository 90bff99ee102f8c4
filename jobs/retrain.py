"""`hovle retrain` / `python -m jobs.retrain --config C`: the scheduled pipeline, one cycle per call.

    lock -> prepare new raw data (incremental) -> nothing new? exit 0 -> train (all stages, or instruct from
    the champion) -> evaluate -> log + register -> the promotion gate -> record the cycle -> unlock

With `retrain.stages: instruct` and no champion yet, instruct starts from `retrain.init` when set: a model
folder (`hovle import`'s output, whose model.yaml the run config extends) or a stage export, copied once
into the shared storage with an export.json naming it as the base (jobs/init_model.py, which `hovle train
--init` uses too); else from the `model:` section's model.

Run it from cron, a Kubernetes CronJob or a RayCronJob; on a Ray cluster through `hovle submit` (jobs.submit),
which submits it as a Ray job and turns its final line back into an exit code and a webhook post.
A cycle is keyed by the data version (a hash of the prepared manifests' contents): its training run is
named `retrain-<version>`, so a cycle that crashed part-way continues when rerun (prepared data stays,
finished stages are skipped, the interrupted one resumes from its checkpoint, and evaluation and
registration are done once, recorded in `<storage_path>/retrain/state.json`).

The run config's `retrain:` section names the raw inputs per stage, where prepared datasets live and which
stages train; `eval:` the held-out set; `registry:` the model name and the gate (jobs.registry.GateSettings);
`train:` and `data:` as for `hovle train` / `hovle prepare` (jobs.run_config).

Every outcome ends with one JSON line on stdout, `{"status": ..., ...}` (its last line; a failure's
traceback goes to stderr before it), so a scheduler that only sees the job's logs (`ray job submit`
reports every non-zero exit as FAILED; `hovle submit` reads this line) still tells the outcomes apart:

    status         exit  the line also has
    promoted       0     data_version, model, version, promoted, reason (the gate's), scores, run_name, ...
    not_promoted   0     the same; the gate kept the champion (reason says why)
    nothing_to_do  0     data_version, and the summary of the cycle that already trained on it
    bad_config     2     reason: a bad config or a missing input (or storage it cannot reach)
    locked         3     reason: who holds the lock (not an error: the next schedule tick retries)
    failed         1     reason (one line): a stage failed beyond max_failures, this run lost its lock to
                         another because it was paused past the lock's TTL, or anything unexpected;
                         rerun to continue
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import tempfile
import traceback
from typing import Any

from jobs.cli import FAILED, USAGE_ERROR, job_parser, parse_job_args, parse_overrides, run_command
from jobs.init_model import init_export, model_folder
from jobs.lock import LockHeld, LockLost, StorageLock
from jobs.run_config import RetrainSettings, RunConfig, add_config_arguments, load_run_config
from jobs.train import StageFailed, resolve_storage
from model.config import ConfigError
from model.stages import STAGE_NAMES
from pipelines import storage
from pipelines.units import SourceError

logger = logging.getLogger("jobs.retrain")

LOCKED = 3


def load_settings(run: RunConfig, source: str) -> RetrainSettings:
    """The run config's `retrain:` section, checked with the `eval:` section a cycle needs."""
    if run.retrain is None:
        raise ConfigError(f"{source}: no `retrain:` section (raw inputs per stage, the prepared root)")
    if run.eval is None:
        raise ConfigError(f"{source}: no `eval:` section (the held-out set the cycle is evaluated on)")
    if run.retrain.init is not None and run.retrain.stages != "instruct":
        raise ConfigError(
            f"{source}: retrain.init: a model to fine-tune goes with retrain.stages: instruct (stages: all "
            "trains every stage from the `model:` section's model)"
        )
    return run.retrain


def data_version(datasets: dict[str, str]) -> str:
    """A hash of what the prepared datasets hold (their units and shards), not of when they were written."""
    from pipelines.manifest import read_manifest

    content = {
        stage: sorted((u.key, [s.sha256 for s in u.shards]) for u in read_manifest(uri).units)
        for stage, uri in sorted(datasets.items())
    }
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


COPIED_MARKER = "_COPIED"  # written after the champion's files: the copy is complete


def champion_export(name: str, tracking_uri: str, shared_root: str) -> str | None:
    """The champion's export copied from the registry to `<shared_root>/champion-v<version>` (None when
    there is no champion). Every training worker, on any node, reads it from there: a folder downloaded on
    the driver exists on the driver's node only. A copy already complete (its marker written last) is
    reused, so a resumed cycle does not download it again."""
    from mlflow import MlflowClient

    from jobs.registry import champion_version, download_hf_folder

    champion = champion_version(MlflowClient(tracking_uri), name)
    if champion is None:
        return None
    target = storage.join(shared_root, f"champion-v{champion.version}")
    marker = storage.join(target, COPIED_MARKER)
    if storage.exists(marker):
        return target
    with tempfile.TemporaryDirectory(prefix="hovle-champion-") as scratch:
        folder = download_hf_folder(f"models:/{name}/{champion.version}", tracking_uri, scratch)
        storage.put_directory(str(folder), target)
    storage.write_text_atomic(marker, f"models:/{name}/{champion.version}\n")
    return target


def retrain(config_path: str, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """One cycle (see the module docstring); returns the JSON summary."""
    from jobs.cycle import prepare_cycle, run_cycle

    run = load_run_config(config_path, overrides)
    settings = load_settings(run, config_path)
    stages = list(STAGE_NAMES) if settings.stages == "all" else ["instruct"]
    base = None
    if settings.init is not None:  # jobs/init_model.py: a stage export or a model folder of this model
        base = model_folder(settings.init, run.model, f"{config_path}: retrain.init")
    missing = [s for s in stages if not settings.raw.get(s)]
    if missing:
        raise ConfigError(f"{config_path}: retrain.raw has no inputs for stage(s) {', '.join(missing)}")
    root = storage.join(resolve_storage(run.train.storage_path), "retrain")
    with StorageLock(storage.join(root, "lock.json"), settings.lock_ttl_s) as lock:
        reports = prepare_cycle(run, {stage: settings.raw[stage] for stage in stages}, settings.prepared)
        datasets = {stage: report["output"] for stage, report in reports.items()}
        version = data_version(datasets)
        state = CycleState(storage.join(root, "state.json"))
        cycle = state.get(version)
        if cycle.get("done"):
            logger.info("nothing new since data version %s (cycle done): nothing to do", version)
            return {"status": "nothing_to_do", "data_version": version, **cycle.get("summary", {})}
        lock.check()
        named = run.model_copy(
            update={"train": run.train.model_copy(update={"run_name": f"retrain-{version}"})}
        )
        init = None
        if settings.stages == "instruct":
            init = champion_export(run.registry.name, run.train.tracking_uri, root)
            if init is None and base is not None:
                init = init_export(base, root)
                logger.info("no champion yet: instruct starts from %s (retrain.init)", settings.init)
            elif init is None:
                logger.info("no champion yet: instruct starts from the preset's model")

        def save() -> None:  # after each step: the state, only while this run still holds the lock
            lock.check()
            state.save()

        summary = run_cycle(
            named, datasets, cycle, save, fence=lock.check, stage=settings.stages, init=init,
            source=config_path, tags={"hovle.data_version": version},
        )  # fmt: skip
        status = "promoted" if summary["promoted"] else "not_promoted"
        if settings.retention.keep_cycles is not None:
            lock.check()
            removed = clean_finished_cycles(run, settings, state, version, root)
            summary = {**summary, "retention_removed": removed}
        return {"status": status, "data_version": version, **summary}


def clean_finished_cycles(run: RunConfig, settings, state: CycleState, version: str, root: str) -> list[str]:
    """`retrain.retention`: remove older finished cycles' files, keeping the champion's lineage
    (jobs/retention.py); returns the folders removed."""
    from mlflow import MlflowClient

    from jobs import retention
    from jobs.registry import champion_version

    champion = champion_version(MlflowClient(run.train.tracking_uri), run.registry.name)
    champion_export = champion_copy = None
    if champion is not None:
        champion_copy = storage.join(root, f"champion-v{champion.version}")
        held = [c for c in state.cycles.values() if str(c.get("model_version")) == str(champion.version)]
        champion_export = (held[0].get("summary") or {}).get("export") if held else None
    storage_root = resolve_storage(run.train.storage_path)
    keep = settings.retention.keep_cycles
    doomed = retention.plan(state.cycles, version, keep, storage_root, root, champion_export, champion_copy)
    return retention.remove(doomed)


# an exit code that is not 0 -> the final line's status
STATUS_OF_EXIT = {USAGE_ERROR: "bad_config", LOCKED: "locked", FAILED: "failed"}
REASON_MAX_CHARS = 1000


def one_line(err: BaseException) -> str:
    """An error as one bounded line (a webhook message, a scheduler's log column)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (LockHeld, LockLost, StageFailed, ConfigError, SourceError)):
        text = f"{type(err).__name__}: {text}"  # unexpected: its type says most
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as null (a score can be NaN; strict JSON parsers refuse it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("hovle retrain", __doc__)
    add_config_arguments(parser)
    args = parse_job_args(parser, argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    overrides = parse_overrides(parser, args.set)
    final: dict[str, Any] = {}

    def body() -> int:
        try:
            final.update(retrain(args.config, overrides))
        except Exception as err:
            final["reason"] = one_line(err)
            raise
        return 0

    errors = {LockHeld: LOCKED, (StageFailed, LockLost): FAILED, SourceError: USAGE_ERROR}
    try:
        code = run_command("hovle retrain", body, errors)
    except Exception:  # unexpected: the traceback is for a person, the final line for the scheduler
        traceback.print_exc()
        code = FAILED
    if code:
        final = {"status": STATUS_OF_EXIT[code], "reason": final.get("reason", "")}
    sys.stderr.flush()  # the line must come last in a log that interleaves both streams
    print(json.dumps(strict_json(final)), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
