"""`hovle import <format> --from DIR --to DIR`: a released checkpoint -> a folder transformers loads natively.

Each format is a module with `import_checkpoint(source: Path, dest: Path, max_shard_bytes: int) -> Path`
(it streams shard by shard and writes `dest` atomically), registered in `IMPORTERS`; a module may add
its own options with `add_arguments(parser)`, and they reach `import_checkpoint` as keyword arguments.
A bad input (no such folder, not that format, an unsafe pickle, a non-empty output folder) exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from jobs.cli import USAGE_ERROR, run_command
from jobs.logging_setup import setup_logging

# format -> (module, one-line help). A new importer registers itself here.
IMPORTERS: dict[str, tuple[str, str]] = {
    "internlm2": (
        "model.convert.internlm2",
        "an InternLM2 checkpoint (fused wqkv) -> the Llama layout, with a fast tokenizer and chat template",
    ),
    "hovle": (
        "model.convert.hovle",
        "a released HoVLE / HoVLE-HD checkpoint -> this project's HoVLE model folder, processor, model.yaml",
    ),
}
_COMMON = ("source", "dest", "max_shard_size", "verbose", "format")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?B)?", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def shard_size(text: str) -> int:
    """argparse type: `2GB`, `500MB`, `1000000` -> bytes (decimal units, as transformers' max_shard_size)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or a byte count, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hovle import",
        description="Convert a released checkpoint into a folder transformers loads natively "
        "(no remote code).",
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, (module, summary) in IMPORTERS.items():
        sub = formats.add_parser(name, help=summary, description=summary)
        sub.add_argument(
            "--from", dest="source", type=Path, required=True, metavar="DIR", help="the checkpoint folder"
        )
        sub.add_argument(
            "--to", dest="dest", type=Path, required=True, metavar="DIR", help="a new (or empty) folder"
        )
        sub.add_argument(
            "--max-shard-size",
            type=shard_size,
            default="2GB",
            metavar="SIZE",
            help="largest output shard (default: 2GB)",
        )
        sub.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        add_arguments = getattr(importlib.import_module(module), "add_arguments", None)
        if add_arguments is not None:
            add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    module = importlib.import_module(IMPORTERS[args.format][0])
    extra = {key: value for key, value in vars(args).items() if key not in _COMMON}
    from model.convert import ConversionError

    def body() -> int:
        if not args.source.is_dir():
            raise FileNotFoundError(f"--from {args.source}: no such folder")
        dest = module.import_checkpoint(args.source, args.dest, max_shard_bytes=args.max_shard_size, **extra)
        print(dest)
        return 0

    return run_command(f"hovle import {args.format}", body, {ConversionError: USAGE_ERROR})


if __name__ == "__main__":
    sys.exit(main())
