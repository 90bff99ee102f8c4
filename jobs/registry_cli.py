"""`hovle registry history|rollback --config C`: the gate's decisions on a registered model, and the way back.

    hovle registry history  --config C [--json]              every version: the gate's decision and why,
                                                             its scores, the champion it replaced, rollbacks
    hovle registry rollback --config C --reason TEXT [--to V]  `champion` back to the version the current
                                                             champion replaced (or to V)

The model is the config's `registry.name` in its tracking server's registry (`train.tracking.uri`, or
MLFLOW_REGISTRY_URI when set). The gate (jobs.registry.promote) records on each version its decision
(`hovle.promotion`) and, when it crowned it, the champion it replaced (`hovle.previous_champion`); a
rollback records on both versions it touches who (the login name), when (UTC), why (--reason), from and
to, appended to their `hovle.rollbacks` tag (a JSON list), so the history survives repeated rollbacks.
A rollback prints that record as one JSON line.

A rollback does not take the retrain lock: a cycle that finishes meanwhile gates its version against the
champion it read, and may still crown it. Exit codes: 0 done, 2 a bad config or a rollback that cannot be
done (no champion, no previous one recorded, no such version).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from jobs.cli import USAGE_ERROR, job_parser, parse_job_args, parse_overrides, run_command
from jobs.registry import CHAMPION, PREVIOUS_CHAMPION_TAG, PROMOTION_TAG, champion_version, version_scores
from jobs.run_config import add_config_arguments, load_run_config

logger = logging.getLogger("jobs.registry_cli")

ROLLBACK_TAG = "hovle.rollbacks"
TAG_MAX_CHARS = 5000  # MLflow stores of older schemas keep 5,000 characters of a version tag
REASON_MAX_CHARS = 500


class RollbackRefused(ValueError):
    """The rollback asked for cannot be done (the message says why and what to pass instead)."""


def who() -> str:
    """The login name ($USER, $LOGNAME, ... or the password database's), for the record."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container's uid with no name
        return f"uid {os.getuid()}"


def versions(client, name: str) -> list:
    """Every version of `name`, oldest first."""
    escaped = name.replace("'", "''")
    return sorted(client.search_model_versions(f"name = '{escaped}'"), key=lambda v: int(v.version))


def rollbacks(version) -> list[dict[str, str]]:
    text = version.tags.get(ROLLBACK_TAG)
    return json.loads(text) if text else []


def previous_champion(client, name: str, current) -> str:
    """The version `current` (the champion) replaced when the gate crowned it."""
    recorded = current.tags.get(PREVIOUS_CHAMPION_TAG)
    if recorded == "none":
        raise RollbackRefused(
            f"{name} v{current.version} was the first champion: no earlier one to return to (pass --to)"
        )
    if recorded:
        return recorded
    # crowned before the gate recorded whom it replaced: the newest older version the gate crowned
    crowned = [
        str(v.version)
        for v in versions(client, name)
        if int(v.version) < int(current.version) and v.tags.get(PROMOTION_TAG, "").startswith("champion:")
    ]
    if not crowned:
        raise RollbackRefused(f"{name}: no champion before v{current.version} is known (pass --to)")
    return crowned[-1]


def rollback(
    client, name: str, reason: str, to: str | None = None, by: str | None = None, now: datetime | None = None
) -> dict[str, str]:
    """Move `name`'s champion alias to `to` (default: the version the champion replaced); returns the
    record kept on both versions (model, from, to, by, at, reason).

    Raises:
        RollbackRefused: no reason, no champion, nothing earlier recorded, no version `to`, or `to` is
            already the champion.
    """
    from mlflow.exceptions import MlflowException

    reason = " ".join(reason.split())
    if not reason:
        raise RollbackRefused("a rollback needs a --reason (it is recorded on both versions)")
    current = champion_version(client, name)
    if current is None:
        raise RollbackRefused(f"{name} has no champion: nothing to roll back")
    target = str(to) if to else previous_champion(client, name, current)
    if target == str(current.version):
        raise RollbackRefused(f"{name} v{target} is already the champion")
    try:
        client.get_model_version(name, target)
    except MlflowException:
        raise RollbackRefused(
            f"{name} has no version {target!r} (`hovle registry history` lists them)"
        ) from None
    record = {
        "from": str(current.version),
        "to": target,
        "by": by or who(),
        "at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "reason": reason[:REASON_MAX_CHARS],
    }
    client.set_registered_model_alias(name, CHAMPION, target)
    for version in (record["from"], record["to"]):
        kept = rollbacks(client.get_model_version(name, version)) + [record]
        while len(kept) > 1 and len(json.dumps(kept)) > TAG_MAX_CHARS:
            kept.pop(0)  # the oldest records go first; the newest always stays
        client.set_model_version_tag(name, version, ROLLBACK_TAG, json.dumps(kept))
    logger.info("%s: champion v%s -> v%s (%s)", name, record["from"], target, reason)
    return {"model": name, **record}


def history(client, name: str) -> list[dict[str, Any]]:
    """Each version of `name`, oldest first: version, created (UTC), aliases, decision ("promoted",
    "not_promoted", or None when the gate has not judged it), reason, previous_champion, scores,
    data_version, rollbacks (the records of rollbacks from or to it)."""
    rows, found = [], versions(client, name)
    aliases: dict[str, list[str]] = {}  # a search does not fill in versions' aliases; the model has them
    for alias, number in (client.get_registered_model(name).aliases if found else {}).items():
        aliases.setdefault(str(number), []).append(alias)
    for version in found:
        verdict = version.tags.get(PROMOTION_TAG)
        decision = (
            None if verdict is None else "promoted" if verdict.startswith("champion:") else "not_promoted"
        )
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
        rows.append(
            {
                "version": str(version.version),
                "created": created.isoformat(timespec="seconds"),
                "aliases": sorted(aliases.get(str(version.version), [])),
                "decision": decision,
                "reason": verdict.split(": ", 1)[-1] if verdict else None,
                "previous_champion": version.tags.get(PREVIOUS_CHAMPION_TAG),
                "scores": version_scores(version),
                "data_version": version.tags.get("hovle.data_version"),
                "rollbacks": rollbacks(version),
            }
        )
    return rows


def format_history(rows: list[dict[str, Any]]) -> str:
    """`history` for a person: a line per version, a line per rollback under it."""
    lines = []
    for row in rows:
        aliases = f" [{', '.join(row['aliases'])}]" if row["aliases"] else ""
        scores = " ".join(f"{k}={v:.4f}" for k, v in sorted(row["scores"].items()))
        lines.append(
            f"v{row['version']}{aliases}  {row['created']}  {row['decision'] or 'not gated'}  {scores}  "
            f"{row['reason'] or ''}".rstrip()
        )
        for record in row["rollbacks"]:
            lines.append(
                f"    rollback v{record['from']} -> v{record['to']} by {record['by']} at {record['at']}: "
                f"{record['reason']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("hovle registry", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    shown = sub.add_parser("history", help="every version: the gate's decision, scores, rollbacks")
    add_config_arguments(shown)
    shown.add_argument("--json", action="store_true", help="a JSON list instead of lines for a person")
    back = sub.add_parser("rollback", help="move champion back to the version it replaced (or --to)")
    add_config_arguments(back)
    back.add_argument("--to", help="the version to make champion (default: the one the champion replaced)")
    back.add_argument("--reason", required=True, help="why (recorded on both versions)")
    args = parse_job_args(parser, argv)
    overrides = parse_overrides(parser, args.set)

    def body() -> int:
        from mlflow import MlflowClient

        run = load_run_config(args.config, overrides)
        client, name = MlflowClient(run.train.tracking_uri), run.registry.name
        if args.command == "rollback":
            print(json.dumps(rollback(client, name, args.reason, args.to)))
        elif args.json:
            print(json.dumps(history(client, name)))
        else:
            print(format_history(history(client, name)) or f"{name}: no versions")
        return 0

    return run_command(f"hovle registry {args.command}", body, {RollbackRefused: USAGE_ERROR})


if __name__ == "__main__":
    raise SystemExit(main())
