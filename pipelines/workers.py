"""What runs in Ray workers for `pipelines.prepare`, and how a record that kills its worker is found.

Preprocessor (actor)      a batch of raw rows -> one result row each (RESULT_SCHEMA): a shard row or
                          a reject row; a batch that killed its worker CRASH_RETRIES + 1 times stops the
                          stream (WorkerKeepsDying), as counted by a CrashLedger actor
unit_batches(blocks)      the actors' result blocks -> (unit key, batch) in BATCH_ROWS-row batches
                          counted from each unit's first row (the writer's input, whatever the blocks)
isolated_unit(...)        a unit read here and preprocessed in single tasks without retries, halving
                          any batch whose worker process dies until the record that kills it is alone
                          (reject `worker_crashed`)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa

from pipelines.manifest import UnitRecord
from pipelines.preprocess import PrepareContext, preprocess_row
from pipelines.readers import read_unit_batches
from pipelines.schema import SHARD_SCHEMA
from pipelines.writer import UnitWriter

logger = logging.getLogger(__name__)

BATCH_ROWS = 64  # records per preprocessing call
CRASH_RETRIES = 2  # retries of a batch whose worker died, before its unit is run record by record


# ---- the Ray Data side ----------------------------------------------------------------------------
# What the preprocessing actors return: one row per raw record, a shard row or a reject row.
RESULT_SCHEMA = pa.schema(
    [
        ("unit_key", pa.string()),
        ("ok", pa.bool_()),
        ("unit", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
    + [SHARD_SCHEMA.field(name) for name in SHARD_SCHEMA.names]
)
EMPTY_SHARD = {
    "split": "",
    "input_ids": [],
    "labels": [],
    "num_tokens": 0,
    "tiles": [],
    "tiles_per_image": [],
    "truncated": False,
    "dedup_key": "",
}


class WorkerKeepsDying(RuntimeError):
    """A batch killed its worker process on every try: `prepare` runs its unit record by record."""


class CrashLedger:
    """Actor (no CPU): the batches a preprocessing actor started and did not finish, and how often.

    Ray Data restarts a dead actor and retries its batch forever (one record that kills its worker would
    hang the run); the retry asks here how many workers that batch has killed already."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.deaths: Counter[str] = Counter()
        self.given_up: str | None = None

    def start(self, batch: str) -> int:
        """Record `batch` as started; return how many earlier starts of it never finished."""
        if batch in self.running:
            self.deaths[batch] += 1
            if self.deaths[batch] > CRASH_RETRIES:
                self.given_up = batch
        self.running.add(batch)
        return self.deaths[batch]

    def finish(self, batch: str) -> None:
        self.running.discard(batch)

    def gave_up(self) -> str | None:
        """The batch that killed its worker more than CRASH_RETRIES times, if one did."""
        return self.given_up


class Preprocessor:
    """Actor: holds the driver's context and turns raw records into shard or reject rows."""

    def __init__(self, ctx: PrepareContext, ledger=None):
        # The driver's context, pickled: its tokenizer unpickles in ~0.1 s and needs only model.processor
        # (no torch: ~0.5 s of imports), where building the processor again from the model config would
        # import the network's modules in every actor (~3 s on 2 cores).
        self.ctx = ctx
        self.ledger = ledger  # a CrashLedger handle in the stream; None in isolated_unit's single tasks

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.ledger is None:
            return self._preprocess(batch)
        import ray

        ids = batch.column("id")
        name = f"{batch.column('unit_key')[0]}:{ids[0]}..{ids[-1]}:{batch.num_rows}"
        deaths = ray.get(self.ledger.start.remote(name))
        if deaths > CRASH_RETRIES:
            raise WorkerKeepsDying(f"batch {name} killed its worker process {deaths} times")
        results = self._preprocess(batch)
        ray.get(self.ledger.finish.remote(name))
        return results

    def _preprocess(self, batch: pa.Table) -> pa.Table:
        rows = []
        for raw in batch.to_pylist():
            shard, reject = preprocess_row(raw, self.ctx)
            if shard is not None:
                rows.append(
                    {
                        "unit_key": raw["unit_key"],
                        "ok": True,
                        "unit": raw["unit"],
                        "reason": "",
                        "detail": "",
                        **shard,
                    }
                )
            else:
                rows.append({"unit_key": raw["unit_key"], "ok": False, **EMPTY_SHARD, **reject})
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def unit_batches(blocks: Iterable[pa.Table], rows: int) -> Iterator[tuple[str, pa.Table]]:
    """Result blocks in input order -> (unit key, table) with `rows` rows each, counted from the unit's
    first row (its last batch shorter): the writer cuts shards the same however Ray Data sized the blocks.
    """
    key, pending, count = None, [], 0
    for block in blocks:
        keys = block.column("unit_key").to_pylist()
        start = 0
        for end in range(1, len(keys) + 1):  # runs of one unit
            if end < len(keys) and keys[end] == keys[start]:
                continue
            if keys[start] != key:
                if count:
                    yield key, _one_chunk(pending)
                key, pending, count = keys[start], [], 0
            run = block.slice(start, end - start)
            while count + run.num_rows >= rows:
                yield key, _one_chunk([*pending, run.slice(0, rows - count)])
                run, pending, count = run.slice(rows - count), [], 0
            if run.num_rows:
                pending.append(run)
                count += run.num_rows
            start = end
    if count:
        yield key, _one_chunk(pending)


def _one_chunk(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks()


def worker_died(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says a worker process died, not that Python code raised (but for
    WorkerKeepsDying: the ledger's word that it did)."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (RayActorError, WorkerCrashedError, WorkerKeepsDying)):
            return True
        err = err.__cause__ or err.__context__
    return False


def isolated_unit(key, unit, ctx, settings, output, seen, actor_cpus) -> UnitRecord:
    """One unit read here and preprocessed in single tasks (no retries), bisecting batches whose worker
    dies until the record that kills it is alone."""
    import ray

    task = ray.remote(max_retries=0, num_cpus=actor_cpus)(_preprocess_alone)
    ctx_ref = ray.put(ctx)
    writer = UnitWriter(output, unit, key, settings)
    items = {"unit": [json.dumps(unit.to_dict())], "unit_key": [key]}
    for raw in read_unit_batches(items, BATCH_ROWS, settings):
        for results in _bisect(raw, task, ctx_ref):
            writer.add(results, seen)
    return writer.finish()


def _bisect(raw: pa.Table, task, ctx_ref) -> list[pa.Table]:
    import ray

    try:
        return [ray.get(task.remote(ctx_ref, raw))]
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError):
        if raw.num_rows == 1:
            [row] = raw.to_pylist()
            logger.warning("record %s of %s killed its worker: quarantined", row["id"], row["unit"])
            reject = {field: row[field] for field in ("unit_key", "id", "source", "unit")}
            detail = "its worker process died preprocessing it, in the stream and alone"
            rows = [{**EMPTY_SHARD, **reject, "ok": False, "reason": "worker_crashed", "detail": detail}]
            return [pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)]
        half = raw.num_rows // 2
        return _bisect(raw.slice(0, half), task, ctx_ref) + _bisect(raw.slice(half), task, ctx_ref)


def _preprocess_alone(ctx: PrepareContext, raw: pa.Table) -> pa.Table:
    return Preprocessor(ctx)(raw)
