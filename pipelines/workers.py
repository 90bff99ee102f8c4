"""What runs in Ray workers for `pipelines.prepare`: the preprocessing actor (raw rows -> one result row
each, RESULT_SCHEMA: a shard row or a reject row), and `isolated_unit`, which finds a record that kills
its worker process."""

from __future__ import annotations

import json
import logging

import pyarrow as pa

from pipelines.manifest import UnitRecord
from pipelines.preprocess import PrepareContext, preprocess_row
from pipelines.readers import read_unit_batches
from pipelines.schema import SHARD_SCHEMA
from pipelines.writer import UnitWriter

logger = logging.getLogger(__name__)

BATCH_ROWS = 64  # records per preprocessing call


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
EMPTY_SHARD = dict(
    split="",
    input_ids=[],
    labels=[],
    num_tokens=0,
    tiles=[],
    tiles_per_image=[],
    truncated=False,
    dedup_key="",
)


class Preprocessor:
    """Actor: holds the driver's context and turns raw records into shard or reject rows."""

    def __init__(self, ctx: PrepareContext):
        # The driver's context, pickled: its tokenizer unpickles in ~0.1 s and needs only model.processor
        # (no torch: ~0.5 s of imports), where building the processor again from the model config would
        # import the network's modules in every actor (~3 s on 2 cores).
        self.ctx = ctx

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for raw in batch.to_pylist():
            shard, reject = preprocess_row(raw, self.ctx)
            result = {"unit": raw["unit"], "reason": "", "detail": "", **shard} if shard else reject
            rows.append({"unit_key": raw["unit_key"], "ok": shard is not None, **EMPTY_SHARD, **result})
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def worker_died(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says a worker process died, not that Python code raised."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (RayActorError, WorkerCrashedError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def isolated_unit(key, unit, ctx, settings, output, seen, actor_cpus) -> UnitRecord:
    """One unit read here and preprocessed in single tasks (no retries), halving any batch whose worker
    dies until the record that kills it is alone (reject `worker_crashed`)."""
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
