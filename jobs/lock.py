"""`StorageLock`: one holder at a time for a job, through a lock record in the shared storage (local or s3://).

    with StorageLock("s3://bucket/runs/retrain/lock.json", ttl_s=6 * 3600) as lock:
        ...
        lock.check()   # before anything only the holder may do (move an alias, write the cycle's state)

A second process gets LockHeld, naming the holder's host, pid and age. Every change to the record is a
compare-and-swap, so there is one holder, always:
- create only if there is none (S3: `If-None-Match: *`; locally: under an flock on `<lock>.mutex`, which
  the kernel releases when its process dies, so the mutex itself is never stale);
- a record older than `ttl_s` belonged to a run that died or stopped: it is taken over by replacing
  exactly the record that was read (S3: `If-Match` on its ETag; locally: the bytes compared under the
  flock); of several processes racing for it, one wins and the rest get LockHeld;
- a heartbeat thread renews the record every `ttl_s / 4` in the same owner-checked way; a holder that
  was paused past its TTL (SIGSTOP, a frozen VM) finds on waking that its record is gone, and its next
  `check()` or `refresh()` raises LockLost before it acts as the holder (fencing).
A local record is written to a temporary file and renamed into place: readers never see half a record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any

from pipelines import storage

logger = logging.getLogger(__name__)

MUTEX_WAIT_S = 10.0  # a local mutation holds the flock for microseconds; longer means a paused process


class LockHeld(RuntimeError):
    """Another run holds the lock (and it is not stale yet)."""


class LockLost(RuntimeError):
    """This run held the lock, and another took it over (this run looked dead: paused past the TTL)."""


class _LocalRecord:
    """The record as a local file; each change under an flock, compared byte for byte."""

    def __init__(self, path: str) -> None:
        self.path = path.removeprefix("file://")

    @contextmanager
    def _mutex(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(f"{self.path}.mutex", "a") as handle:
            deadline = time.monotonic() + MUTEX_WAIT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockHeld(f"{self.path}.mutex: held for {MUTEX_WAIT_S:.0f} s") from None
                    time.sleep(0.01)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, bytes] | None:
        """(record bytes, version: the same bytes), or None when there is no record."""
        data = self._read()
        return None if data is None else (data, data)

    def _swap(self, expected: bytes | None, change) -> bool:
        """`change()` under the flock if the record is still `expected` (None: there is none)."""
        with self._mutex():
            if self._read() != expected:
                return False
            change()
            return True

    def put(self, data: bytes, expected: bytes | None) -> bytes | None:
        """Write `data` if the record is still `expected`: its new version, or None when it was not."""

        def write() -> None:
            temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, self.path)

        return data if self._swap(expected, write) else None

    def delete(self, expected: bytes) -> bool:
        return self._swap(expected, lambda: os.remove(self.path))


class _S3Record:
    """The record as an S3 object; each change a conditional request on its ETag."""

    def __init__(self, uri: str) -> None:
        import botocore.session  # s3fs's own client library: no second AWS SDK to keep in step with it

        self.bucket, _, self.key = uri.split("://", 1)[1].partition("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint)

    def _conditional(self, request, **kwargs) -> dict | None:
        """S3's response to a conditional `request` on the record, or None when the condition failed."""
        try:
            return request(Bucket=self.bucket, Key=self.key, **kwargs)
        except self.client.exceptions.ClientError as err:
            code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            raise

    def read(self) -> tuple[bytes, str] | None:
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return found["Body"].read(), found["ETag"]

    def put(self, data: bytes, expected: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        written = self._conditional(self.client.put_object, Body=data, **condition)
        return None if written is None else written["ETag"]

    def delete(self, expected: str) -> bool:
        return self._conditional(self.client.delete_object, IfMatch=expected) is not None


class StorageLock:
    def __init__(self, uri: str, ttl_s: float, heartbeat_s: float | None = None) -> None:
        self.uri, self.ttl_s = uri, ttl_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else ttl_s / 4
        self.token = uuid.uuid4().hex
        self.record = _S3Record(uri) if storage.is_remote(uri) else _LocalRecord(uri)
        self.version: Any = None  # what this holder last wrote: the compare in compare-and-swap
        self.held = False
        self.lost: LockLost | None = None
        self._changing = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _new_record(self) -> bytes:
        record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        return json.dumps(record).encode()

    def holder(self) -> dict[str, Any] | None:
        """The current lock record, or None when there is none ({"time": 0} when unreadable: stale)."""
        found = self.record.read()
        return None if found is None else _parse(found[0])

    def acquire(self) -> None:
        """Take the lock, or raise LockHeld naming the holder; a stale lock is taken over (logged)."""
        for _ in range(3):  # a lost race re-reads: the winner is then named
            found = self.record.read()
            if found is not None:
                current, version = _parse(found[0]), found[1]
                age = time.time() - float(current.get("time", 0.0))
                if age < self.ttl_s:
                    raise LockHeld(
                        f"another run holds {self.uri} (host {current.get('host')}, pid {current.get('pid')},"
                        f" renewed {age:.0f} s ago); it expires after {self.ttl_s:.0f} s"
                    )
            written = self.record.put(self._new_record(), None if found is None else version)
            if written is not None:
                if found is not None:
                    logger.warning(
                        "took over a stale lock %s (%.0f s old): its run died or stopped", self.uri, age
                    )
                self.version, self.held, self.lost = written, True, None
                self._start_heartbeat()
                return
        raise LockHeld(f"{self.uri}: other runs kept taking it")

    def refresh(self) -> None:
        """Renew the lock's time if this run still holds it; LockLost if another took it over."""
        with self._changing:
            if self.lost is not None:
                raise self.lost
            if not self.held:
                return
            written = self.record.put(self._new_record(), self.version)
            if written is None:
                holder = self.holder() or {}
                self.lost = LockLost(
                    f"{self.uri} was taken over by host {holder.get('host')}, pid {holder.get('pid')}: this "
                    f"run looked dead (not renewed for {self.ttl_s:.0f} s) and must stop"
                )
                raise self.lost
            self.version = written

    check = refresh  # fencing, before anything only the holder may do: renew, or raise LockLost

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self._changing:
            if self.held and self.lost is None:
                self.record.delete(self.version)
            self.held = False

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self.refresh()
                except LockLost as err:
                    logger.error("%s", err)
                    return

        self._heartbeat = threading.Thread(target=beat, name="lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def __enter__(self) -> StorageLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"time": 0.0}  # unreadable (not written by this module): stale
    return record if isinstance(record, dict) else {"time": 0.0}
