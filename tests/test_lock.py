"""The retrain lock: one holder, always. Real processes race for a local lock, fresh and stale; a holder
paused past its TTL with SIGSTOP finds it lost the lock before it acts; on moto's S3 server, the
conditional-write protocol (moto's conditional writes are not atomic under a true race, so what is tested
there is that every stale compare is refused)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.lock import LockHeld, LockLost, StorageLock
from tests.conftest import REPO_ROOT

PROCESSES, ROUNDS = 8, 12  # rounds alternate: no lock yet / a stale one


def contender(folder: str, rounds: int, start, done, results) -> None:
    """One racing process: every round, at the barrier, try the round's lock; report; hold it."""
    for round_ in range(rounds):
        start.wait()
        lock = StorageLock(os.path.join(folder, f"lock-{round_}.json"), ttl_s=60, heartbeat_s=3600)
        try:
            lock.acquire()
            results.put((round_, os.getpid(), "held"))
        except LockHeld as err:
            results.put((round_, os.getpid(), str(err)))
        done.wait()  # everyone has tried; the holder never released (it stays the holder)


def test_processes_racing_for_a_fresh_or_stale_local_lock_leave_exactly_one_holder(tmp_path):
    for round_ in range(1, ROUNDS, 2):  # a run that died long ago
        record = {"token": "dead", "host": "elsewhere", "pid": 1, "time": time.time() - 10**6}
        (tmp_path / f"lock-{round_}.json").write_text(json.dumps(record))
    context = multiprocessing.get_context("fork")
    start, done, results = context.Barrier(PROCESSES), context.Barrier(PROCESSES), context.Queue()
    workers = [
        context.Process(target=contender, args=(str(tmp_path), ROUNDS, start, done, results))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in range(PROCESSES * ROUNDS)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    for round_ in range(ROUNDS):
        got = [(pid, outcome) for r, pid, outcome in outcomes if r == round_]
        holders = [pid for pid, outcome in got if outcome == "held"]
        assert len(holders) == 1, (round_, got)
        record = json.loads((tmp_path / f"lock-{round_}.json").read_text())
        assert record["pid"] == holders[0]
        losers = [outcome for pid, outcome in got if outcome != "held"]
        # every loser names the holder (or, having lost the same instant, says so)
        assert all(f"pid {holders[0]}" in o or "kept taking it" in o for o in losers), (round_, losers)


HOLDER = """
import sys, time
from pathlib import Path
from jobs.lock import LockLost, StorageLock

lock = StorageLock(sys.argv[1], ttl_s=1.0, heartbeat_s=0.2)
lock.acquire()
print("held", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.05)
try:
    lock.check()  # what a cycle does before it moves an alias or writes its state
    print("still the holder", flush=True)
except LockLost as err:
    print("lost:", err, flush=True)
lock.release()
"""


def test_a_holder_paused_past_its_ttl_finds_it_lost_the_lock_before_acting(tmp_path):
    uri, go = str(tmp_path / "lock.json"), tmp_path / "go"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, str(go)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            StorageLock(uri, ttl_s=30).acquire()  # held, and fresh to a reader with a long ttl
        holder.send_signal(signal.SIGSTOP)  # a frozen VM, a stopped container: no heartbeat
        time.sleep(1.5)
        taker = StorageLock(uri, ttl_s=1.0, heartbeat_s=0.2)
        taker.acquire()  # stale: taken over
        holder.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # the woken heartbeat tries to renew, and must not overwrite the taker
        go.touch()
        out, _ = holder.communicate(timeout=60)
        assert out.startswith("lost:") and f"pid {os.getpid()}" in out, out
        assert json.loads(Path(uri).read_text())["token"] == taker.token
        taker.check()  # the taker still holds it
        taker.release()
        assert not Path(uri).exists()
    finally:
        holder.kill()


def test_s3_lock_writes_are_conditional_on_what_was_read(s3_bucket):
    uri = f"{s3_bucket}/retrain/lock.json"
    first = StorageLock(uri, ttl_s=1.0, heartbeat_s=3600)
    first.acquire()
    record = first.record
    assert record.put(b"{}", None) is None  # a second create (If-None-Match: *) is refused
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        StorageLock(uri, ttl_s=3600).acquire()  # a reader's ttl judges staleness: not stale to this one
    stale_etag = first.version
    time.sleep(1.2)
    second = StorageLock(uri, ttl_s=1.0, heartbeat_s=3600)
    second.acquire()  # takes over the stale record: If-Match on the ETag it read
    assert record.put(b"{}", stale_etag) is None  # a takeover or renewal on a stale ETag is refused
    assert not record.delete(stale_etag)
    with pytest.raises(LockLost):
        first.check()  # the first holder's renewal is refused: it is fenced off
    first.release()  # does not remove the second's record
    assert second.holder()["token"] == second.token
    second.release()
    assert second.holder() is None
