"""Retention for scheduled retraining: what finished cycles leave in the storage, cleaned by a policy.

Each cycle (jobs.retrain) trains as the run `retrain-<data version>`: its exports in
`<storage>/retrain-<version>/` and Ray Train's checkpoints in `<storage>/retrain-<version>-train/`; a
cycle that fine-tunes the champion reads a copy of it, `<storage>/retrain/champion-v<N>`. With
`retrain.retention.keep_cycles: K`, after a cycle finishes (under the retrain lock, so no other cycle runs)
the folders of finished cycles older than the newest K are removed, except the champion's lineage: the
champion's cycle and every export its export.json `init` chain leads to (the champion copy it started
from, an imported base). Never touched: the cycle that just ran, a cycle not marked done (it may resume),
the prepared datasets (one incremental dataset per stage that every cycle reads), the state and the lock.
"""

from __future__ import annotations

import logging
from typing import Any

from jobs.export import ExportNotFound, read_export_info
from pipelines import storage

logger = logging.getLogger(__name__)

MAX_LINEAGE = 64  # init links followed at most (a chain is one link per cycle that fine-tuned the last)


def lineage(export_uri: str) -> list[str]:
    """`export_uri` and the exports its export.json `init` chain leads to (those that still exist)."""
    chain, uri = [], export_uri
    while uri and len(chain) < MAX_LINEAGE:
        chain.append(uri.rstrip("/"))
        try:
            uri = read_export_info(uri).get("init")
        except (ExportNotFound, OSError, ValueError):
            break
    return chain


def children(uri: str) -> list[str]:
    """The names of the entries directly under the folder `uri` (none when it does not exist)."""
    fs, root = storage.filesystem(uri)
    entries = fs.ls(root, detail=False) if fs.exists(root) else []
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]


def cycle_folders(storage_root: str, run_name: str) -> list[str]:
    """The run's own folders under `storage_root` that exist: `<run_name>/`, and `<run_name>-train/` (its
    Ray Train checkpoints) or any other `<run_name>-*`."""
    own = [n for n in children(storage_root) if n == run_name or n.startswith(f"{run_name}-")]
    return [storage.join(storage_root, n) for n in sorted(own)]


def plan(
    cycles: dict[str, dict[str, Any]],
    current: str,
    keep_cycles: int,
    storage_root: str,
    retrain_root: str,
    champion_export: str | None,
    champion_copy: str | None = None,
) -> list[str]:
    """The folders to remove: those of finished cycles beyond the newest `keep_cycles` (by registered
    version) and the champion copies no kept export starts from; nothing in the champion's lineage (its
    export's chain, and `champion_copy`, where the next fine-tuning cycle reads it), nor the `current`
    cycle's."""
    done = [(v, c) for v, c in cycles.items() if c.get("done") and v != current]
    done.sort(key=lambda vc: int(vc[1].get("model_version") or 0), reverse=True)
    kept_versions = {v for v, _ in done[: max(keep_cycles - 1, 0)]} | {current}  # the current one counts
    protected = lineage(champion_export) if champion_export else []
    protected += [champion_copy.rstrip("/")] if champion_copy else []
    for version in kept_versions:
        export = (cycles.get(version, {}).get("summary") or {}).get("export")
        protected += lineage(export) if export else []

    def is_protected(folder: str) -> bool:
        return any(p == folder or p.startswith(folder.rstrip("/") + "/") for p in protected)

    doomed = [
        f for v, _ in done if v not in kept_versions for f in cycle_folders(storage_root, f"retrain-{v}")
    ]
    doomed += [storage.join(retrain_root, n) for n in children(retrain_root) if n.startswith("champion-v")]
    return [folder for folder in doomed if not is_protected(folder)]


def remove(folders: list[str]) -> list[str]:
    """Remove the folders `plan` names; returns them."""
    for folder in folders:
        storage.remove(folder, recursive=True)
        logger.info("retention: removed %s", folder)
    return folders
