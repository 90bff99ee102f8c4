"""`StorageLock`: one holder at a time for a job, through a lock file in the shared storage (local or s3://).

    with StorageLock("s3://bucket/runs/retrain/lock.json", ttl_s=6 * 3600):
        ...   # a second process gets LockHeld (with the holder's host, pid and age) instead of running

A lock older than `ttl_s` belongs to a run that died without releasing it and is taken over. Locally the
file is created with O_EXCL (atomic). On S3 the lock is written and read back: two writers racing within
the same instant could both see their own token only if S3 returned stale reads, which it no longer does
(strong read-after-write consistency); the loser sees the winner's token and gets LockHeld.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from pipelines import storage

logger = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another run holds the lock (and it is not stale yet)."""


class StorageLock:
    def __init__(self, uri: str, ttl_s: float) -> None:
        self.uri, self.ttl_s = uri, ttl_s
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}

    def holder(self) -> dict[str, Any] | None:
        """The current lock record, or None when there is none (or it is unreadable: a torn write)."""
        try:
            return json.loads(storage.read_text(self.uri))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"time": 0.0}  # unreadable: treat as stale

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the holder; a stale lock is taken over (logged)."""
        current = self.holder()
        if current is not None:
            age = time.time() - float(current.get("time", 0.0))
            if age < self.ttl_s:
                raise LockHeld(
                    f"another run holds {self.uri} (host {current.get('host')}, pid {current.get('pid')}, "
                    f"{age:.0f} s ago); it expires after {self.ttl_s:.0f} s"
                )
            logger.warning("taking over a stale lock %s (%.0f s old): its run died", self.uri, age)
            storage.remove(self.uri)
        if storage.is_remote(self.uri):
            storage.write_text_atomic(self.uri, json.dumps(self._record()))
        else:
            path = self.uri.removeprefix("file://")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise LockHeld(f"another run took {self.uri} just now") from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(self._record()))
        if (self.holder() or {}).get("token") != self.token:
            raise LockHeld(f"another run took {self.uri} at the same moment")
        self.held = True

    def refresh(self) -> None:
        """Renew the lock's time (long runs call it between phases so it never looks stale)."""
        if self.held:
            storage.write_text_atomic(self.uri, json.dumps(self._record()))

    def release(self) -> None:
        if self.held and (self.holder() or {}).get("token") == self.token:
            storage.remove(self.uri)
        self.held = False

    def __enter__(self) -> StorageLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
