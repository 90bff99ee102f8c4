"""`hovle submit` / `python -m jobs.submit --config C`: one retrain cycle as a Ray job, and its outcome.

    submit `python -m jobs.retrain --config C --set ...` to the cluster's Jobs API -> follow its logs (to
    stderr) -> the job's final status line -> one JSON line on stdout -> POST it to the webhook -> exit

What a scheduler runs (the docker-compose `scheduler`, a Kubernetes CronJob). `ray job submit` reports
every non-zero exit as FAILED; the retrain job's last JSON line (jobs.retrain) tells the outcomes apart,
and this command turns it back into an exit code. The line printed is that line with `job_id` (the Ray
submission id, null when nothing was submitted) and `job_status` (Ray's final status) added; a job that
ended without one (killed, out of memory, stopped) is reported as
`{"status": "failed", "reason": "the job ended FAILED without a final status line", ...}`.

Exit codes:
    0  promoted, not_promoted or nothing_to_do
    2  bad_config (the job found its config bad or an input missing)
    3  locked (another retrain holds the lock; the next tick retries)
    1  failed: the cycle failed, the job ended without a status line, or the cluster could not be reached
(A bad argument to this command itself is argparse's exit 2, before anything is submitted, with no line.)

The cluster is `--address` (its dashboard / Jobs API URL, default $RAY_ADDRESS). With token authentication
on the cluster (RAY_AUTH_MODE=token), export RAY_AUTH_MODE=token and the token as RAY_AUTH_TOKEN (or a
file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token): Ray's client sends it with every request. The config
path is read by the job, on the cluster: a path inside the uploaded `--working-dir`, a mounted ConfigMap, a
preset name. `--webhook` (default $HOVLE_WEBHOOK_URL) receives the printed line as a JSON POST; a webhook
that fails is logged as a warning and never changes the exit code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol

import yaml

from jobs.cli import FAILED, USAGE_ERROR, job_parser, parse_job_args, parse_overrides

logger = logging.getLogger("jobs.submit")

LOCKED = 3  # as jobs.retrain's (not imported: that module imports the training stack)
EXIT_CODES = {"promoted": 0, "not_promoted": 0, "nothing_to_do": 0}
EXIT_CODES |= {"bad_config": USAGE_ERROR, "locked": LOCKED, "failed": FAILED}
WEBHOOK_TIMEOUT_S = 10.0
# a head that was just started answers before its job agent has registered; its Jobs API says so
NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 60.0


class JobClient(Protocol):
    """What this module uses of ray.job_submission.JobSubmissionClient."""

    def submit_job(self, *, entrypoint: str, runtime_env: dict[str, Any] | None = None) -> str: ...
    def get_job_status(self, job_id: str) -> Any: ...
    def get_job_logs(self, job_id: str) -> str: ...
    def stop_job(self, job_id: str) -> bool: ...


def final_status(logs: str) -> dict[str, Any] | None:
    """The last line of `logs` that is a JSON object with a string `status`, or None.

    Lines after it (Ray's own messages, a worker's late output) and lines that are not JSON are ignored.
    """
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("status"), str):
            return parsed
    return None


def outcome(logs: str, job_id: str | None, job_status: str) -> dict[str, Any]:
    """The line to print for a job that ended with `job_status` (Ray's: SUCCEEDED, FAILED, STOPPED)."""
    found = final_status(logs)
    if found is None:
        found = {"status": "failed", "reason": f"the job ended {job_status} without a final status line"}
    elif found["status"] not in EXIT_CODES:
        reason = f"unknown status {found['status']!r} in the job's line"
        found = {**found, "status": "failed", "reason": reason}
    return {**found, "job_id": job_id, "job_status": job_status}


def post_webhook(url: str, line: dict[str, Any], timeout_s: float = WEBHOOK_TIMEOUT_S) -> bool:
    """POST `line` as JSON to `url`; False (and a warning) when it failed. The URL is never logged whole:
    a chat webhook's path is its secret."""
    parts = urllib.parse.urlsplit(url)
    where = f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")
    if parts.scheme not in ("http", "https"):
        logger.warning("webhook %s: not an http(s) URL; nothing posted", where)
        return False
    headers = {"Content-Type": "application/json", "User-Agent": "hovle-submit"}
    request = urllib.request.Request(url, data=json.dumps(line).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except (OSError, ValueError) as err:  # URLError, HTTPError and timeouts are OSErrors
        logger.warning("webhook %s failed (%s); the outcome is on stdout", where, err)
        return False
    return True


def retrain_entrypoint(config: str, sets: list[str]) -> str:
    """The job's command line, quoted for the shell Ray runs it with."""
    flags = [arg for item in sets for arg in ("--set", item)]
    return shlex.join(["python", "-m", "jobs.retrain", "--config", config, *flags])


def runtime_env(path: str | None, inline: str | None, working_dir: str | None) -> dict[str, Any] | None:
    """`--runtime-env` (YAML file), then `--runtime-env-json` over it, then `--working-dir` over both."""
    env: dict[str, Any] = {}
    if path:
        with open(path) as handle:
            env.update(yaml.safe_load(handle) or {})
    if inline:
        env.update(json.loads(inline))
    if working_dir:
        env["working_dir"] = working_dir
    return env or None


def connect(address: str | None) -> JobClient:
    """Ray's job client for `address`. Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the
    address it is given: while it is built with an explicit --address, they are hidden."""
    from ray.job_submission import JobSubmissionClient

    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if address else ()
    hidden = {name: os.environ.pop(name, None) for name in names}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update({name: value for name, value in hidden.items() if value is not None})


def submit(client: JobClient, entrypoint: str, env: dict[str, Any] | None) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env)
        except RuntimeError as err:
            if NO_AGENT_YET not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow_logs(client: JobClient, job_id: str) -> None:
    """Stream the job's logs to stderr while it runs (for a person reading the scheduler's log); returns
    when the job ends or the stream breaks (the caller then polls)."""
    tail = getattr(client, "tail_job_logs", None)
    if tail is None:
        return

    async def stream() -> None:
        async for chunk in tail(job_id):
            sys.stderr.write(chunk)
            sys.stderr.flush()

    try:
        asyncio.run(stream())
    except Exception as err:  # the stream is a convenience; the status and the full logs are polled
        logger.warning("following the job's logs stopped (%s); waiting for it to end", err)


def wait(client: JobClient, job_id: str, poll_s: float, timeout_s: float | None) -> str:
    """Ray's final status of the job (stopping it first after `timeout_s`)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("job %s still %s after %.0f s: stopping it", job_id, status.value, timeout_s)
            client.stop_job(job_id)
            deadline = None  # wait for it to stop
        time.sleep(poll_s)


def run_job(
    client: JobClient,
    entrypoint: str,
    env: dict[str, Any] | None,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    follow: bool = True,
) -> dict[str, Any]:
    """Submit `entrypoint`, wait for it, and return the line to print (see the module docstring)."""
    job_id = submit(client, entrypoint, env)
    logger.info("submitted %s as job %s", entrypoint, job_id)
    if follow:
        follow_logs(client, job_id)
    job_status = wait(client, job_id, poll_s, timeout_s)
    return outcome(client.get_job_logs(job_id), job_id, job_status)


def report(line: dict[str, Any], webhook: str | None) -> int:
    """Print `line` as the one stdout line, POST it to `webhook` (if any) and return its exit code."""
    sys.stderr.flush()
    print(json.dumps(line), flush=True)
    if webhook:
        post_webhook(webhook, line)
    return EXIT_CODES.get(line.get("status"), FAILED)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("hovle submit", __doc__)
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"), help="Ray Jobs API URL (default $RAY_ADDRESS)"
    )
    parser.add_argument("--config", required=True, help="the run config, as the job on the cluster reads it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    webhook = os.environ.get("HOVLE_WEBHOOK_URL")
    parser.add_argument(
        "--webhook", default=webhook, help="POST the final line here (default $HOVLE_WEBHOOK_URL)"
    )
    parser.add_argument("--runtime-env", help="a runtime env YAML file (e.g. platform/ray/runtime_env.yaml)")
    parser.add_argument("--runtime-env-json", help="a runtime env as JSON (over --runtime-env's)")
    parser.add_argument("--working-dir", help="a folder uploaded as the job's working directory")
    parser.add_argument("--timeout-s", type=float, help="stop the job after this long (default: wait)")
    parser.add_argument("--poll-s", type=float, default=5.0, help="how often the job's status is asked")
    parser.add_argument("--no-follow", action="store_true", help="do not stream the job's logs to stderr")
    args = parse_job_args(parser, argv)
    parse_overrides(parser, args.set)  # a malformed --set fails here, not on the cluster
    try:
        env = runtime_env(args.runtime_env, args.runtime_env_json, args.working_dir)
    except (OSError, ValueError, yaml.YAMLError) as err:
        parser.error(f"runtime env: {err}")
    entrypoint = retrain_entrypoint(args.config, args.set)
    try:
        client = connect(args.address)
        line = run_job(client, entrypoint, env, args.poll_s, args.timeout_s, not args.no_follow)
    except Exception as err:  # the cluster unreachable, refused (auth), the upload failed: still one line
        logger.error("submitting to %s failed: %s", args.address or "the local cluster", err)
        reason = " ".join(f"could not run the job: {type(err).__name__}: {err}".split())[:1000]
        line = {"status": "failed", "reason": reason, "job_id": None, "job_status": None}
    return report(line, args.webhook)


if __name__ == "__main__":
    raise SystemExit(main())
