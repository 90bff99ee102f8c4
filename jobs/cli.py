"""`hovle <subcommand> [args...]`: one command over the job modules.

Each subcommand is a module `jobs.<name>` with `main(argv: list[str] | None) -> int`, so
`hovle inspect X` and `python -m jobs.inspect X` run the same code. Modules are imported
only when their subcommand runs: `hovle --help` stays instant and one job's heavy imports
(torch, Ray, DeepSpeed) never slow another.
"""

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping

# name -> (module, one-line help). A new job module registers itself here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "config": ("jobs.run_config", "print a resolved run config (extends, --set applied) or its JSON schema"),
    "inspect": ("jobs.inspect", "parameter counts per part and stage, ZeRO memory per GPU for a config"),
    "demo": ("jobs.demo", "the demo on this machine (what `make demo` runs)"),
    "synth": (
        "jobs.synth",
        "write a deterministic synthetic (or Fashion-MNIST / emoji) corpus as images + JSONL",
    ),
    "prepare": ("jobs.prepare", "raw corpora -> validated Parquet shards + manifest (Ray Data)"),
    "train": ("jobs.train", "the HoVLE stages on Ray Train + DeepSpeed, tracked in MLflow (resumable)"),
    "retrain": ("jobs.retrain", "one scheduled cycle: new data -> prepare -> train -> evaluate -> register"),
    "submit": (
        "jobs.submit",
        "a retrain cycle as a Ray job: its outcome as one JSON line and an exit code, posted to a webhook",
    ),
    "registry": ("jobs.registry_cli", "the gate's history of a registered model; roll its champion back"),
    "predict": ("jobs.predict", "ask a registered model (models:/hovle@champion) or an export a question"),
    "evaluate": (
        "jobs.evaluate",
        "VQA accuracy per skill, language preservation and a gallery, logged to MLflow",
    ),
    "import": (
        "jobs.importer",
        "a released checkpoint (HoVLE, HoVLE-HD, InternLM2) -> this project's model folder",
    ),
}

USAGE_ERROR = 2  # the exit status argparse uses for bad arguments
FAILED = 1  # the job ran and failed (a stage beyond its retries); a rerun continues from what is done

ErrorTypes = type[BaseException] | tuple[type[BaseException], ...]


def run_command(prog: str, body: Callable[[], int], errors: Mapping[ErrorTypes, int] | None = None) -> int:
    """Every job CLI's error -> exit code mapping: run `body`; an expected error prints `prog: message` on
    stderr (no traceback) and returns its code. `errors` come first; then for every command a bad config,
    a missing or unreadable input, or object storage it cannot reach or sign requests for (no endpoint,
    no credentials) is a usage error (2). Anything else propagates: a traceback and exit 1, for a person
    to read."""
    from model.errors import ConfigError  # deferred: `hovle --help` imports nothing heavy
    from pipelines.storage import UNREACHABLE, UNREACHABLE_HINT

    table = {
        **(errors or {}),
        (ConfigError, FileNotFoundError, PermissionError): USAGE_ERROR,
        UNREACHABLE: USAGE_ERROR,
    }
    try:
        return body()
    except Exception as err:
        code = next((code for types, code in table.items() if isinstance(err, types)), None)
        if code is None:
            raise
        hint = f" ({UNREACHABLE_HINT})" if isinstance(err, UNREACHABLE) else ""
        print(f"{prog}: {err}{hint}", file=sys.stderr)
        return code


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` items as a dict (values stay strings); a malformed item is a usage error."""
    pairs = [item.split("=", 1) for item in items]
    bad = [item for item, pair in zip(items, pairs) if len(pair) != 2 or not pair[0]]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    return dict(pairs)


def job_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A job's parser: its module docstring `doc`, laid out as written, describes it in --help."""
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def parse_job_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed with a last option, `--verbose`, and logging set up by it."""
    from jobs.logging_setup import setup_logging

    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return args


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: hovle <subcommand> [args...]",
        "",
        "Train HoVLE vision-language models on Ray. Each subcommand is also `python -m jobs.<subcommand>`;",
        "`hovle <subcommand> --help` shows its arguments.",
        "",
        "subcommands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv` (default: the process arguments) to a job's `main`; return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return USAGE_ERROR
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0

    name, job_args = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"hovle: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        print("run `hovle --help` for what each does", file=sys.stderr)
        return USAGE_ERROR

    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise  # a dependency of the job is missing: that traceback is the useful message
        print(f"hovle: {name!r} is registered but its module {module_name} was not found", file=sys.stderr)
        return USAGE_ERROR
    return module.main(job_args)


if __name__ == "__main__":
    sys.exit(main())
