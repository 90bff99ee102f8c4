"""`ShardManifest`: the one file that makes a prepared dataset exist.

Layout of a prepared dataset at URI D:
    D/manifest.json            written last, atomically: a dataset without it does not exist
    D/shards/<unit>-<n>.parquet   training rows (SHARD_SCHEMA), bounded in rows and bytes
    D/rejects/<unit>.parquet      quarantined records with their reason (REJECT_SCHEMA)
    D/_work/<unit>.json           per-unit completion records of a run in progress (resume)

A unit is one input file (or one group of files); its key hashes the file's URI and fingerprint, so a
changed or new file is new work and an unchanged one is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines import storage
from pipelines.schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
REJECTS_DIR = "rejects"
WORK_DIR = "_work"


class DatasetNotFound(FileNotFoundError):
    """No manifest.json at the given location: nothing was prepared there (or a run never finished)."""


class ManifestError(ValueError):
    """manifest.json is malformed or of another schema version: prepare the dataset again."""


class ManifestMismatch(ValueError):
    """The output already holds a dataset prepared for another stage, config or processor."""


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str
    split_rows: dict[str, int]


@dataclass
class UnitRecord:
    """What one work unit contributed: its accounting, shards and rejects table."""

    key: str
    uri: str
    source: str
    fingerprint: str
    read: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    shards: list[ShardInfo]
    rejects: str | None  # relative path of its rejects table, None when nothing was rejected

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UnitRecord:
        return cls(**{**raw, "shards": [ShardInfo(**s) for s in raw["shards"]]})


def tally(records: Iterable[UnitRecord]) -> dict[str, Any]:
    """read, written, rejected and rejected_by_reason (sorted by reason), summed over unit records."""
    records = list(records)
    reasons: Counter[str] = Counter()
    for record in records:
        reasons.update(record.rejected_by_reason)
    return {
        "read": sum(r.read for r in records),
        "written": sum(r.written for r in records),
        "rejected": sum(r.rejected for r in records),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }


@dataclass
class ShardManifest:
    stage: str
    config_hash: str
    processing: dict[str, Any]
    processing_hash: str
    processor_hash: str
    sources: list[str]
    units: list[UnitRecord] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    created: str = ""

    # ---- derived views ---------------------------------------------------------------------------
    @property
    def shards(self) -> list[ShardInfo]:
        return [shard for unit in self.units for shard in unit.shards]

    def accounting(self) -> dict[str, dict[str, Any]]:
        """Per source: rows read = rows written + rows rejected, and the reasons."""
        by_source: dict[str, list[UnitRecord]] = {}
        for unit in self.units:
            by_source.setdefault(unit.source, []).append(unit)
        return {source: tally(units) for source, units in by_source.items()}

    def totals(self) -> dict[str, Any]:
        shards = self.shards
        return {
            "read": sum(u.read for u in self.units),
            "written": sum(u.written for u in self.units),
            "rejected": sum(u.rejected for u in self.units),
            "shards": len(shards),
            "train": sum(s.split_rows.get("train", 0) for s in shards),
            "val": sum(s.split_rows.get("val", 0) for s in shards),
        }

    def to_json(self) -> str:
        body = asdict(self)
        body["shards"] = [asdict(s) for s in self.shards]
        body["accounting"] = self.accounting()
        body["totals"] = self.totals()
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> ShardManifest:
        """Raises ManifestError when `text` is not JSON, of another schema version or misses fields."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where} is not valid JSON ({err}); prepare the dataset again") from None
        if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
            found = raw.get("schema_version") if isinstance(raw, dict) else None
            raise ManifestError(
                f"{where}: schema_version {found!r}, this code reads {SCHEMA_VERSION}; "
                "prepare the dataset again with this version"
            )
        for derived in ("shards", "accounting", "totals"):
            raw.pop(derived, None)
        try:
            raw["units"] = [UnitRecord.from_dict(u) for u in raw["units"]]
            return cls(**raw)
        except (KeyError, TypeError) as err:
            raise ManifestError(
                f"{where} misses or mistypes a field ({err}); prepare the dataset again"
            ) from None


def read_manifest(dataset_uri: str) -> ShardManifest:
    """The committed manifest of the dataset at `dataset_uri` (local path or s3://).

    Raises:
        DatasetNotFound: no manifest.json there (nothing prepared, or a run never finished).
        ManifestError: malformed, or of another schema version.
    """
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise DatasetNotFound(
            f"no {MANIFEST} at {dataset_uri}: a dataset exists only once prepare has committed it "
            "(run `hovle prepare` or point to the prepared dataset's folder)"
        )
    return ShardManifest.from_json(storage.read_text(uri), where=uri)


def write_manifest(dataset_uri: str, manifest: ShardManifest) -> None:
    storage.write_text_atomic(storage.join(dataset_uri, MANIFEST), manifest.to_json())


def stable_hash(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
