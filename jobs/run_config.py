"""`RunConfig`: one run config, loaded by one function at the CLI edge.

    schema_version: 1
    extends: smollm2-135m          # optional: a preset (or a YAML path) this file overrides
    model:    {llm: ..., embedding: ..., image: ...}          # model.presets.ModelSpec
    data:     {max_tokens: 2048, overflow: reject, ...}        # pipelines.settings.PrepareSettings
    train:    {run_name: ..., scaling: ..., stages: ...}       # jobs.train_config.TrainConfig
    eval:     {data: heldout.jsonl, base: preset:smollm2-135m} # EvalSettings (retrain's evaluation)
    retrain:  {raw: ..., prepared: ...}                        # RetrainSettings (the scheduled cycle)
    registry: {name: hovle, floor: 0.3, ...}                   # jobs.registry.GateSettings (the gate)

Every command takes `--config` (a preset name or a YAML path) and the same `--set section.field=value`
(values parsed as YAML scalars: `--set train.seed=3`, `--set data.max_tokens=1024`). An unknown or bad
field fails with its dotted name (exit 2). `hovle config show CONFIG [--set ...]` prints the resolved
config; `hovle config schema` prints its JSON schema (for editors and a Kubernetes ConfigMap).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from jobs.registry import GateSettings
from jobs.train_config import TrainConfig, _Strict
from model.config_files import SCHEMA_VERSION, read_run_document
from model.errors import ConfigError, config_problems
from model.presets import ModelSpec
from pipelines.settings import PrepareSettings


class EvalSettings(_Strict):
    """How a model is evaluated (jobs.evaluate.evaluate; `hovle evaluate`'s flags)."""

    data: str = Field(description="held-out conversation JSONL (hovle synth with another seed)")
    text: str | None = Field(None, description="held-out text JSONL for perplexity")
    base: str | None = Field(None, description="base model for language preservation (a model URI, preset:)")
    language_questions: str | None = Field(
        None, description="keyed general questions JSONL; default: the package's, never trained on"
    )
    max_samples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(16, ge=1, description="answer length")
    # where a cycle evaluates and logs its model (jobs/cycle.py): not in the job driver, which on a cluster
    # is a small CPU head, but in Ray tasks that declare what they need
    placement: Literal["auto", "driver", "task"] = Field(
        "auto",
        description="task: Ray tasks; driver: the cycle's own process; auto: tasks on a multi-node Ray",
    )
    num_cpus: float = Field(1, ge=0, description="CPUs each evaluation / model-logging task reserves")
    num_gpus: float = Field(0, ge=0, description="GPUs the evaluation task reserves (it generates answers)")


class RetentionSettings(_Strict):
    """What finished cycles leave in the storage (jobs/retention.py)."""

    keep_cycles: int | None = Field(
        None,
        ge=1,
        description="keep the files (checkpoints, exports, champion copies) of the newest N finished cycles, "
        "the current one included, and the champion's lineage; null: keep everything",
    )


class RetrainSettings(_Strict):
    """The scheduled cycle's inputs (jobs.retrain)."""

    raw: dict[Literal["distill", "align", "instruct"], list[str]]
    prepared: str = Field(description="prepared datasets root: <prepared>/<stage>")
    stages: Literal["all", "instruct"] = Field("all", description="instruct: fine-tune the champion only")
    init: str | None = Field(
        None,
        description="with stages: instruct, the model folder the cycle fine-tunes while there is no champion "
        "yet (`hovle import`'s output or a stage export); null: the `model:` section's model",
    )
    lock_ttl_s: float = Field(
        900, gt=0, description="a lock not renewed this long (every ttl/4 while a cycle runs) is stale"
    )
    retention: RetentionSettings = RetentionSettings()


class RunConfig(_Strict):
    """A whole run config (see the module docstring)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str | None = Field(None, description="the preset's name, when the file is one")
    model: ModelSpec
    data: PrepareSettings = PrepareSettings()
    train: TrainConfig = TrainConfig()
    eval: EvalSettings | None = None
    retrain: RetrainSettings | None = None
    registry: GateSettings = GateSettings()


SECTIONS = tuple(name for name in RunConfig.model_fields if name not in ("schema_version", "name"))


def load_run_config(source: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config at `source` (a preset name or a YAML path), `extends` resolved, with dotted
    `section.field` overrides applied (string values parsed as YAML scalars, as `--set` passes them).

    Raises:
        FileNotFoundError: no such file or preset.
        ConfigError: a bad or unknown field (named with its dots), a malformed override, an old schema.
    """
    document, path = read_run_document(source)
    for dotted, value in (overrides or {}).items():
        set_dotted(document, dotted, yaml.safe_load(value) if isinstance(value, str) else value)
    try:
        return RunConfig.model_validate(document)
    except ValidationError as err:
        raise ConfigError(f"{path}: {config_problems(err)}") from None


def set_dotted(document: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `section.field[.sub...]` in a run-config mapping; the first part must be a section."""
    *parents, leaf = dotted.split(".")
    if not parents or parents[0] not in SECTIONS:
        raise ConfigError(
            f"--set {dotted}: expected section.field=value, the section one of {', '.join(SECTIONS)}"
        )
    node = document
    for depth, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parents[: depth + 1])} is not a section")
        node = child
    node[leaf] = value


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config` and `--set`, the same on every command."""
    parser.add_argument("--config", required=required, help="run config: a preset name or a YAML path")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a run-config field, e.g. --set train.seed=1 --set data.max_tokens=1024",
    )


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import parse_overrides, run_command

    parser = argparse.ArgumentParser(prog="hovle config", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the resolved run config as YAML (extends and --set applied)")
    show.add_argument("config", help="a preset name or a YAML path")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    sub.add_parser("schema", help="print the run config's JSON schema")
    args = parser.parse_args(argv)
    if args.command == "schema":
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    overrides = parse_overrides(parser, args.set)

    def body() -> int:
        config = load_run_config(args.config, overrides)
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0

    return run_command("hovle config", body)


if __name__ == "__main__":
    raise SystemExit(main())
