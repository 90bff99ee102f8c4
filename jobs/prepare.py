"""`hovle prepare` / `python -m jobs.prepare`: raw corpora -> Parquet shards + manifest, with Ray Data.

    python -m jobs.prepare --config tiny --stage instruct \\
        --input data/train.jsonl --input s3://bucket/more/ --output s3://bucket/prepared/instruct

The config's `model:` section gives the processor (tokenizer, tiling, chat template); its `data:` section
the processing settings (token budget, overflow policy, validation share, shard size, ...). The last
line of output is one JSON object: read, written, rejected, rejected_by_reason for this run, the
dataset's totals and its location. Rerunning over unchanged inputs writes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from jobs.cli import USAGE_ERROR, job_parser, parse_job_args, parse_overrides, positive_int, run_command
from jobs.hooks import Hooks, from_env
from jobs.logging_setup import quiet_libraries
from jobs.run_config import RunConfig, add_config_arguments, load_run_config
from model.config import HoVLEConfig
from model.presets import build_processor, config_from_spec
from model.stages import STAGE_NAMES
from pipelines.manifest import ManifestError, ManifestMismatch, stable_hash
from pipelines.prepare import prepare
from pipelines.units import SourceError

logger = logging.getLogger("jobs.prepare")


def portable_config(values: Any) -> Any:
    """A config dict without `_name_or_path` entries: transformers records there the absolute folder a
    config was loaded from (the virtualenv's, for a packaged LLM), which differs between checkouts and
    machines, so a hash over it would name the same config differently on each."""
    if isinstance(values, dict):
        return {key: portable_config(value) for key, value in values.items() if key != "_name_or_path"}
    return values


def config_hash(config: HoVLEConfig) -> str:
    """sha256 of the model config, the same on every machine (what a prepared dataset's manifest records)."""
    return stable_hash(portable_config(config.to_dict()))


def prepare_stages(
    run: RunConfig,
    raw: dict[str, list[str]],
    outputs: dict[str, str],
    num_actors: int | None = None,
    on_unit_done: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each stage's raw inputs -> its prepared dataset at `outputs[stage]`, with the processor the run
    config's `model:` section builds (once) and its `data:` settings; logs and returns each stage's report."""
    import ray.data  # noqa: F401 (imported before quieting it: Ray Data resets its loggers on import)

    quiet_libraries()  # one line per unit from prepare, not Ray Data's operator lines every second
    config = config_from_spec(run.model)
    processor, key = build_processor(config), config_hash(config)
    reports = {}
    for stage, inputs in raw.items():
        reports[stage] = report = prepare(
            processor, stage, inputs, outputs[stage], run.data,
            num_actors=num_actors, on_unit_done=on_unit_done, config_hash=key,
        )  # fmt: skip
        logger.info(
            "%s: read %d, written %d, rejected %d -> %s",
            stage, report["read"], report["written"], report["rejected"], report["output"],
        )  # fmt: skip
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("hovle prepare", __doc__)
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--input", action="append", required=True, help="input URI (repeatable)")
    parser.add_argument("--output", required=True, help="dataset URI (local folder or s3://...)")
    add_config_arguments(parser)
    parser.add_argument(
        "--num-actors",
        type=positive_int,
        default=None,
        help="preprocessing actors (default: one per CPU of the cluster)",
    )
    args = parse_job_args(parser, argv)
    overrides = parse_overrides(parser, args.set)

    def body() -> int:
        run = load_run_config(args.config, overrides)
        hooks = Hooks(from_env())
        report = prepare_stages(
            run, {args.stage: args.input}, {args.stage: args.output}, num_actors=args.num_actors,
            on_unit_done=lambda done, total: hooks.emit("on_prepare_unit", done, total),
        )[args.stage]  # fmt: skip
        print(json.dumps(report))
        return 0

    return run_command("hovle prepare", body, {(ManifestError, ManifestMismatch, SourceError): USAGE_ERROR})


if __name__ == "__main__":
    raise SystemExit(main())
