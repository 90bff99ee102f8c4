"""`prepare`: raw corpora -> validated, tokenized Parquet shards + rejects + manifest, with Ray Data.

    work units (input files) --from_items--> read (tasks) --repartition (64 rows)--> preprocess (actors:
        validate, decode, tile, tokenize) --> this process: exact-duplicate removal, shards per unit,
        rejects, per-unit completion records --> manifest.json last (the commit)

The driver builds the processor once (its hash keys the dataset) and ships it to the actors pickled.

Incremental and atomic: a unit whose key (URI + fingerprint + processing settings) is already in the
manifest is skipped; a unit finished by a run that was killed is taken from its completion record; only
the rest is processed. Nothing a reader sees changes until manifest.json is replaced in one write.
Ray Data keeps the units' order (preserve_order), so a unit is complete when the next one's rows arrive,
and duplicates are resolved first-come in input order: the same inputs give the same dataset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from model.processor import HoVLEProcessor
from pipelines import storage
from pipelines.manifest import (
    REJECTS_DIR,
    SHARDS_DIR,
    WORK_DIR,
    ManifestMismatch,
    ShardManifest,
    UnitRecord,
    read_manifest,
    stable_hash,
    tally,
    write_manifest,
)
from pipelines.preprocess import PrepareContext
from pipelines.readers import read_unit_batches
from pipelines.settings import PrepareSettings
from pipelines.sources import discover_units
from pipelines.units import WorkUnit
from pipelines.workers import BATCH_ROWS, Preprocessor, isolated_unit, worker_died
from pipelines.writer import UnitWriter

logger = logging.getLogger(__name__)

_CRASH_RETRIES = 2  # retries of a batch whose worker died, before its unit is run record by record


# ---- orchestration -----------------------------------------------------------------------------------
def unit_key(unit: WorkUnit, processing_hash: str, processor_hash: str) -> str:
    return stable_hash([unit.key, unit.uri, unit.fingerprint, processing_hash, processor_hash])[:24]


def prepare(
    processor: HoVLEProcessor,
    stage: str,
    inputs: list[str],
    output: str,
    settings: PrepareSettings | None = None,
    num_actors: int | None = None,
    actor_cpus: float = 0.5,
    on_unit_done: Callable[[int, int], None] | None = None,
    config_hash: str = "",
) -> dict[str, Any]:
    """Prepare `inputs` for `stage` into the dataset at `output` with `processor` (built by the caller from
    the run config's model section); return this run's report. `config_hash` names that model config in
    the manifest (model.presets.config_hash).

    `on_unit_done(done, total)` is called after each unit of this run is written and recorded.

    The report has read / written / rejected / rejected_by_reason for this run (zeros when there was
    nothing to do), the dataset's totals after it, and `output`.
    """
    settings = settings or PrepareSettings()
    started = time.perf_counter()
    ctx = PrepareContext(stage, settings, processor, config_hash)
    forms = [{"stage": stage, "settings": form} for form in settings.hashed_forms()]
    processor_hash = ctx.processor_hash
    existing = _existing_manifest(output, stage, {stable_hash(f): f for f in forms}, processor_hash)
    # a dataset already there keeps the form its manifest was hashed with: its units are keyed by it
    processing = next((f for f in forms if existing and stable_hash(f) == existing.processing_hash), forms[0])
    processing_hash = stable_hash(processing)
    units = [unit for uri in inputs for unit in discover_units(uri)]  # raises SourceError on an empty input
    keys = {unit_key(u, processing_hash, processor_hash): u for u in units}
    done = {u.key: u for u in existing.units} if existing else {}
    resumed = _completed_units(output, set(keys) - set(done))
    todo = [(k, u) for k, u in keys.items() if k not in done and k not in resumed]
    logger.info(
        "%d units: %d already in the manifest, %d finished by an earlier run, %d to process",
        len(keys),
        len(set(keys) & set(done)),
        len(resumed),
        len(todo),
    )

    if existing is not None and not todo and not resumed and set(keys) == set(done):
        logger.info("nothing to do: %s is up to date", output)
        return _report(existing, {}, output, started, changed=False)

    seen = _dedup_keys(output, [done[k] for k in keys if k in done] + list(resumed.values()))
    fresh = _process(todo, ctx, settings, output, seen, num_actors, actor_cpus, on_unit_done) if todo else {}

    records = {**{k: done[k] for k in keys if k in done}, **resumed, **fresh}
    manifest = ShardManifest(
        stage=stage,
        config_hash=ctx.config_hash,
        processing=processing,
        processing_hash=processing_hash,
        processor_hash=processor_hash,
        sources=sorted({u.source for u in units}),
        units=[records[k] for k in keys],
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    write_manifest(output, manifest)  # the commit
    _clean_up(output, manifest)
    return _report(manifest, {**resumed, **fresh}, output, started, changed=True, resumed=len(resumed))


def _existing_manifest(output: str, stage: str, processing: dict[str, dict], processor_hash: str):
    """The dataset's manifest at `output` (None if there is none), if it was prepared for `stage` with one
    of the `processing` forms' hashes and `processor_hash`."""
    if not storage.exists(storage.join(output, "manifest.json")):
        return None
    manifest = read_manifest(output)
    mismatch = [
        name
        for name, same in (
            ("stage", stage == manifest.stage),
            ("data settings", manifest.processing_hash in processing),
            ("model processor/tokenizer", processor_hash == manifest.processor_hash),
        )
        if not same
    ]
    if mismatch:
        raise ManifestMismatch(
            f"{output} holds a dataset prepared with a different {', '.join(mismatch)}: "
            "give another --output (or remove that dataset) to prepare with these settings"
        )
    return manifest


def _completed_units(output: str, candidates: set[str]) -> dict[str, UnitRecord]:
    """Units a killed run finished: completion record present and every shard intact."""
    found: dict[str, UnitRecord] = {}
    for key in candidates:
        uri = storage.join(output, WORK_DIR, f"{key}.json")
        if not storage.exists(uri):
            continue
        record = UnitRecord.from_dict(json.loads(storage.read_text(uri)))
        intact = all(
            storage.exists(storage.join(output, s.path))
            and hashlib.sha256(storage.read_bytes(storage.join(output, s.path))).hexdigest() == s.sha256
            for s in record.shards
        )
        if intact:
            found[key] = record
    return found


def _dedup_keys(output: str, records: list[UnitRecord]) -> set[str]:
    seen: set[str] = set()
    for record in records:
        for shard in record.shards:
            fs, path = storage.filesystem(storage.join(output, shard.path))
            with fs.open(path, "rb") as f:
                seen.update(pq.read_table(f, columns=["dedup_key"]).column("dedup_key").to_pylist())
    return seen


def _process(
    todo, ctx, settings, output, seen, num_actors, actor_cpus, on_unit_done=None
) -> dict[str, UnitRecord]:
    """Preprocess and write the `todo` units; a record that kills its worker process is quarantined.

    The units stream through an actor pool. When a worker dies outright (a segfault in a decoder, the
    kernel's OOM killer) the batch is retried on a restarted actor a few times, then the stream stops: the
    first unit it had not finished is run again record batch by record batch in tasks of their own,
    halving any batch whose worker dies until the record that kills it is alone (reject `worker_crashed`),
    and the stream resumes with the units after it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = ray.cluster_resources().get("CPU", 1)
    # One actor per core; each reserves a fraction of a CPU so that readers (and Ray Data's own tasks)
    # always find room: with whole-CPU actors a 2-core machine deadlocks.
    num_actors = num_actors or max(1, int(cpus))
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    progress = _Progress(len(todo), on_unit_done)
    records: dict[str, UnitRecord] = {}
    seen_before = set(seen)
    try:
        remaining = list(todo)
        while remaining:
            try:
                _stream(remaining, ctx, settings, output, seen, num_actors, actor_cpus, progress, records)
                break
            except Exception as err:  # noqa: BLE001 (only a dead worker is handled: the rest re-raised)
                if not worker_died(err):
                    raise
                key, unit = next((k, u) for k, u in remaining if k not in records)
                logger.warning("a preprocessing worker died (%s); running %s record by record", err, unit.uri)
                # the interrupted unit's rows may be in `seen`: start again from what finished units hold
                seen.clear()
                seen.update(seen_before, _dedup_keys(output, list(records.values())))
                records[key] = progress.unit_done(
                    isolated_unit(key, unit, ctx, settings, output, seen, actor_cpus)
                )
                remaining = [(k, u) for k, u in remaining if k not in records]
    finally:
        context.execution_options.preserve_order = saved
    for key, unit in todo:  # units without a single record (an empty file)
        if key not in records:
            records[key] = progress.unit_done(UnitWriter(output, unit, key, settings).finish())
    return records


def _stream(todo, ctx, settings, output, seen, num_actors, actor_cpus, progress, records) -> None:
    """The units through Ray Data (readers -> preprocessing actors), each unit's rows to its writer."""
    import ray

    items = [{"unit_key": k, "unit": json.dumps(u.to_dict())} for k, u in todo]
    units = dict(todo)
    writer: UnitWriter | None = None
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_unit_batches,
            fn_kwargs={"rows_per_batch": BATCH_ROWS, "settings": settings},
            batch_size=1,
            num_cpus=actor_cpus / 2,
        )
        # 64-row blocks, so both actors share even one big file (without it single-node prepare ran 1.7x
        # slower on 2 cores). Its tasks ask for a whole CPU and Ray 2.60 takes no resources here: a Ray node
        # with less than one CPU free beside its actor waits forever (platform/README.md)
        .repartition(target_num_rows_per_block=BATCH_ROWS)
        .map_batches(
            Preprocessor,
            fn_constructor_kwargs={"ctx": ctx},
            batch_size=BATCH_ROWS,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=actor_cpus,
            # a restarted actor retries a batch a few times (Ray Data's default is forever: one record
            # that kills its worker would hang the run), then the stream stops and `_process` isolates it
            max_restarts=_CRASH_RETRIES,
            max_task_retries=_CRASH_RETRIES,
        )
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        start = 0
        for key, run in itertools.groupby(batch.column("unit_key").to_pylist()):  # rows come in input order
            count = len(list(run))
            if writer is None or writer.key != key:
                if writer is not None:
                    records[writer.key] = progress.unit_done(writer.finish())
                writer = UnitWriter(output, units[key], key, settings)
            writer.add(batch.slice(start, count), seen)
            progress.rows(count)
            start += count
    if writer is not None:
        records[writer.key] = progress.unit_done(writer.finish())


class _Progress:
    """Progress lines a person can follow: records/s and units done, at most one line every few seconds."""

    def __init__(self, total_units: int, on_unit_done: Callable[[int, int], None] | None, every: float = 5.0):
        self.total_units, self.on_unit_done, self.every = total_units, on_unit_done, every
        self.started = self.last = time.perf_counter()
        self.records = self.units = 0

    def rows(self, count: int) -> None:
        self.records += count
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            logger.info(
                "prepare: %d records (%.1f/s), %d/%d units done",
                self.records,
                self.records / (now - self.started),
                self.units,
                self.total_units,
            )

    def unit_done(self, record: UnitRecord) -> UnitRecord:
        self.units += 1
        logger.info(
            "unit %d/%d %s: read %d, written %d, rejected %d",
            self.units,
            self.total_units,
            record.uri,
            record.read,
            record.written,
            record.rejected,
        )
        if self.on_unit_done is not None:
            self.on_unit_done(self.units, self.total_units)
        return record


def _clean_up(output: str, manifest: ShardManifest) -> None:
    """After the commit: drop completion records and files no manifest entry refers to."""
    storage.remove(storage.join(output, WORK_DIR), recursive=True)
    referenced = {s.path for s in manifest.shards} | {u.rejects for u in manifest.units if u.rejects}
    for folder in (SHARDS_DIR, REJECTS_DIR):
        fs, path = storage.filesystem(storage.join(output, folder))
        if not fs.exists(path):
            continue
        for file in fs.ls(path, detail=False):
            if f"{folder}/{file.rstrip('/').rsplit('/', 1)[-1]}" not in referenced:
                fs.rm(file)


def _report(
    manifest: ShardManifest,
    records: dict[str, UnitRecord],
    output: str,
    started: float,
    changed: bool,
    resumed: int = 0,
) -> dict[str, Any]:
    return {
        **tally(records.values()),
        "units_processed": len(records),
        "units_resumed": resumed,
        "changed": changed,
        "dataset": manifest.totals(),
        "output": output,
        "seconds": round(time.perf_counter() - started, 2),
    }
