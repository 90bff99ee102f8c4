"""Run one command on a cron schedule, one run at a time, and log how each run ended.

    python platform/scheduler/cron_loop.py --schedule "0 3 * * *" --log-file /var/log/hovle/cycles.jsonl \\
        -- python -m jobs.submit --address http://ray-head:8265 --config /etc/hovle/run.yaml

The compose stack's `scheduler` service runs this with jobs.submit as the command. Each run ends in one JSON
line on stdout (and appended to --log-file): when it started and ended, its exit code, the outcome that exit
code stands for (jobs.submit: 0 promoted / not promoted / nothing to do, 2 bad config, 3 locked, 1 failed)
and the command's own last JSON line (jobs.submit's final status), so `docker compose logs scheduler` shows
every cycle's result.

Why a loop and not cron or supercronic: cron runs as root and starts jobs with an empty environment (the
Ray token and the MLflow credentials would have to be written to a file), and supercronic is a binary
fetched from outside the package registries. This loop runs as the image's non-root user with the
container's environment as it is, and never starts a run while one is going (a cycle that outlasts its
interval skips the ticks it covers, like a Kubernetes CronJob's `concurrencyPolicy: Forbid`; the retrain
lock guards against a second scheduler). Times are the container's local time (UTC unless TZ is set).
A file touched every HEARTBEAT_S seconds (--heartbeat), waiting or running, is what the container's
healthcheck reads.

Schedules are the five standard cron fields (minute hour day-of-month month day-of-week) with `*`, `a-b`,
`*/n`, `a-b/n` and lists; as in cron, when both day fields are restricted a day matching either runs.
Standard library only: this runs in the platform image beside the project, not from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

HEARTBEAT_S = 30.0
OUTCOMES = {0: "succeeded", 1: "failed", 2: "bad_config", 3: "locked"}
FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)


class ScheduleError(ValueError):
    """A cron expression this loop cannot read; the message names the field."""


def parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ScheduleError(f"{name}: bad step in {part!r}")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first_text, _, last_text = span.partition("-")
            if not (first_text.isdigit() and last_text.isdigit()):
                raise ScheduleError(f"{name}: bad range {part!r}")
            first, last = int(first_text), int(last_text)
        elif span.isdigit():
            first = last = int(span)
            if step:  # `5/15`: from 5 to the end, every 15
                last = high
        else:
            raise ScheduleError(f"{name}: {part!r} is not a number, range, `*` or step")
        if not low <= first <= last <= high:
            raise ScheduleError(f"{name}: {part!r} is outside {low}-{high}")
        values.update(range(first, last + 1, step or 1))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday, as cron (7 is folded into 0)
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        fields = expression.split()
        if len(fields) != 5:
            raise ScheduleError(f"{expression!r}: a cron schedule has 5 fields (minute hour day month dow)")
        minutes, hours, days, months, weekdays = (
            parse_field(text, name, low, high) for text, (name, low, high) in zip(fields, FIELDS)
        )
        weekdays = frozenset(0 if day == 7 else day for day in weekdays)
        return cls(minutes, hours, days, months, weekdays, fields[2] != "*", fields[4] != "*")

    def day_matches(self, moment: datetime) -> bool:
        day_ok = moment.day in self.days
        weekday_ok = (moment.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return moment.month in self.months and (day_ok or weekday_ok)
        return moment.month in self.months and day_ok and weekday_ok

    def next_after(self, moment: datetime) -> datetime:
        """The first whole minute strictly after `moment` that the schedule names."""
        candidate = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = candidate + timedelta(days=366 * 5)  # Feb 29 on a Monday recurs within 28 years; 5 is plenty
        while candidate < limit:
            if not self.day_matches(candidate):
                candidate = candidate.replace(hour=0, minute=0) + timedelta(days=1)
            elif candidate.hour not in self.hours:
                candidate = candidate.replace(minute=0) + timedelta(hours=1)
            elif candidate.minute not in self.minutes:
                candidate += timedelta(minutes=1)
            else:
                return candidate
        raise ScheduleError("the schedule names no time in the next five years")


def last_json_object(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_once(command: list[str]) -> dict:
    """Run `command` (its stderr passes through; its stdout is echoed and read) -> the run's record."""
    started = datetime.now().astimezone()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    exit_code = process.wait()
    status = last_json_object("".join(lines))
    outcome = (status or {}).get("status") or OUTCOMES.get(exit_code, "failed")
    return {
        "event": "scheduled_run",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
        "exit_code": exit_code,
        "outcome": outcome,
        "status": status,
    }


def keep_touching(path: Path) -> None:
    """Touch `path` now and every HEARTBEAT_S seconds from a daemon thread, for as long as the loop lives."""

    def beat() -> None:
        while True:
            path.touch()
            time.sleep(HEARTBEAT_S)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def report(record: dict, log_file: Path | None) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as out:
            out.write(line + "\n")


def sleep_until(moment: datetime) -> None:
    while (remaining := (moment - datetime.now().astimezone()).total_seconds()) > 0:
        time.sleep(min(remaining, 60.0))  # in steps: a suspended host's clock jump is noticed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", required=True, help='five cron fields, e.g. "0 3 * * *"')
    parser.add_argument("--log-file", type=Path, help="append each run's JSON line here too")
    parser.add_argument("--heartbeat", type=Path, help="a file touched while the loop is alive")
    parser.add_argument("--run-at-start", action="store_true", help="run once at start, then on schedule")
    parser.add_argument("--once", action="store_true", help="run once now and exit with the run's exit code")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: put it after --")
    try:
        schedule = Schedule.parse(args.schedule)
    except ScheduleError as error:
        parser.error(str(error))
    if args.heartbeat is not None:
        keep_touching(args.heartbeat)
    if args.once or args.run_at_start:
        record = run_once(command)
        report(record, args.log_file)
        if args.once:
            return record["exit_code"]
    while True:
        due = schedule.next_after(datetime.now().astimezone())
        report({"event": "next_run", "at": due.isoformat(timespec="seconds")}, None)
        sleep_until(due)
        report(run_once(command), args.log_file)


if __name__ == "__main__":
    sys.exit(main())
