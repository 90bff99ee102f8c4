"""Writing one work unit's results: bounded Parquet shards, its rejects table, its completion record.

    writer = UnitWriter(output, unit, key, settings)
    writer.add(results, seen)      a batch of preprocess results: exact duplicates of `seen` are rejects
    record = writer.finish()       the last shard, the rejects, `<output>/_work/<key>.json` (a rerun of a
                                   killed prepare takes finished units from there); read = written + rejected

Every file is written atomically; nothing here is visible to readers until the manifest names it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.manifest import REJECTS_DIR, SHARDS_DIR, WORK_DIR, ShardInfo, UnitRecord
from pipelines.schema import REJECT_SCHEMA, SHARD_SCHEMA
from pipelines.settings import PrepareSettings
from pipelines.units import WorkUnit


@dataclass
class UnitWriter:
    """Collects one unit's result rows and writes its shards (bounded) and rejects table."""

    output: str
    unit: WorkUnit
    key: str
    settings: PrepareSettings
    read: int = 0
    rejects: list[pa.Table] = field(default_factory=list)
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    pending_bytes: int = 0
    shards: list[ShardInfo] = field(default_factory=list)

    def add(self, results: pa.Table, seen: set[str]) -> None:
        """Take a batch of this unit's results; drop exact duplicates of anything `seen` (and add to it)."""
        self.read += results.num_rows
        keep, duplicate = [], []
        ok, dedup_keys = results.column("ok").to_pylist(), results.column("dedup_key").to_pylist()
        for index, (is_ok, dedup_key) in enumerate(zip(ok, dedup_keys)):
            if is_ok:
                (duplicate if dedup_key in seen else keep).append(index)
                seen.add(dedup_key)
        rejected = results.filter(pc.invert(results.column("ok")))
        if rejected.num_rows:
            self.rejects.append(rejected.select(REJECT_SCHEMA.names))
        if duplicate:
            rows = results.take(duplicate).select(["id", "source", "unit", "dedup_key"]).to_pylist()
            for row in rows:
                key = row.pop("dedup_key")[:16]
                row.update(
                    reason="duplicate",
                    detail=f"same image bytes and text (dedup_key {key}) as an earlier sample",
                )
            self.rejects.append(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA))
        if keep:
            kept = results.take(keep).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
            self.pending.append(kept)
            self.pending_rows += kept.num_rows
            self.pending_bytes += kept.nbytes
            while (
                self.pending_rows >= self.settings.shard_max_rows
                or self.pending_bytes >= self.settings.shard_max_bytes
            ):
                self._flush()

    def _flush(self) -> None:
        """Write one shard from the pending rows: at most shard_max_rows rows and about shard_max_bytes."""
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending)
        row_bytes = max(1, table.nbytes // table.num_rows)
        take = min(
            table.num_rows, self.settings.shard_max_rows, max(1, self.settings.shard_max_bytes // row_bytes)
        )
        shard, rest = table.slice(0, take), table.slice(take)
        relative = f"{SHARDS_DIR}/{self.key}-{len(self.shards):05d}.parquet"
        data = parquet_bytes(shard)
        storage.write_bytes_atomic(storage.join(self.output, relative), data)
        splits = dict(sorted(Counter(shard.column("split").to_pylist()).items()))
        self.shards.append(
            ShardInfo(relative, shard.num_rows, len(data), hashlib.sha256(data).hexdigest(), splits)
        )
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.pending_bytes = rest.nbytes if rest.num_rows else 0

    def finish(self) -> UnitRecord:
        while self.pending_rows:
            self._flush()
        rejects_path = None
        reasons: Counter[str] = Counter()
        if self.rejects:
            table = pa.concat_tables(self.rejects)
            reasons.update(table.column("reason").to_pylist())
            rejects_path = f"{REJECTS_DIR}/{self.key}.parquet"
            storage.write_bytes_atomic(storage.join(self.output, rejects_path), parquet_bytes(table))
        written = sum(s.rows for s in self.shards)
        record = UnitRecord(
            key=self.key,
            uri=self.unit.uri,
            source=self.unit.source,
            fingerprint=self.unit.fingerprint,
            read=self.read,
            written=written,
            rejected=sum(reasons.values()),
            rejected_by_reason=dict(sorted(reasons.items())),
            shards=self.shards,
            rejects=rejects_path,
        )
        if record.read != record.written + record.rejected:
            raise RuntimeError(f"accounting broken for {self.unit.key}: {record}")
        # the unit's completion record: a killed run's rerun takes finished units from here
        storage.write_text_atomic(
            storage.join(self.output, WORK_DIR, f"{self.key}.json"), json.dumps(asdict(record))
        )
        return record


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a zstd-compressed Parquet file (how shards and rejects are written)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
