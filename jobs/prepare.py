"""`hovle prepare` / `python -m jobs.prepare`: raw corpora -> Parquet shards + manifest, with Ray Data.

    python -m jobs.prepare --config tiny --stage instruct \\
        --input data/train.jsonl --input s3://bucket/more/ --output s3://bucket/prepared/instruct

The config's `model:` section gives the processor (tokenizer, tiling, chat template); its `data:` section
the processing settings (token budget, overflow policy, validation share, shard size, ...). The last
line of output is one JSON object: read, written, rejected, rejected_by_reason for this run, the
dataset's totals and its location. Rerunning over unchanged inputs writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import parse_overrides, positive_int
from jobs.hooks import Hooks, from_env
from jobs.logging_setup import setup_logging
from jobs.run_config import add_config_arguments, load_run_config
from model.config import ConfigError
from pipelines.manifest import ManifestError, ManifestMismatch
from pipelines.prepare import STAGES, prepare

logger = logging.getLogger("jobs.prepare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hovle prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--input", action="append", required=True, help="input URI (repeatable)")
    parser.add_argument("--output", required=True, help="dataset URI (local folder or s3://...)")
    add_config_arguments(parser)
    parser.add_argument(
        "--num-actors",
        type=positive_int,
        default=None,
        help="preprocessing actors (default: one per CPU of the cluster)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    overrides = parse_overrides(parser, args.set)
    try:
        settings = load_run_config(args.config, overrides).data
        hooks = Hooks(from_env())
        report = prepare(
            args.config, args.stage, args.input, args.output, settings, num_actors=args.num_actors,
            on_unit_done=lambda done, total: hooks.emit("on_prepare_unit", done, total),
        )  # fmt: skip
    except (ConfigError, ManifestError, ManifestMismatch, FileNotFoundError) as err:
        print(f"hovle prepare: {err}", file=sys.stderr)
        return 2
    logger.info(
        "read %d, written %d, rejected %d -> %s",
        report["read"],
        report["written"],
        report["rejected"],
        report["output"],
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
