"""Regenerate the command outputs in platform/SIZING.md (or, with --check, say whether they are stale).

Each generated block in the document is a fenced text block between two markers; the opening marker names
the `hovle inspect` arguments whose output the block holds:

    <!-- generated: hovle inspect hovle-2.6b --gpus 8 -->
    ```text
    ...what `hovle inspect hovle-2.6b --gpus 8` prints...
    ```
    <!-- end generated -->

The prose around the blocks is left as written; only the blocks are rewritten. tests/test_sizing.py checks
that the blocks equal what the command prints now.

    python benchmarks/sizing_doc.py [--check] [--doc platform/SIZING.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DOC = REPO_ROOT / "platform" / "SIZING.md"
BLOCK = re.compile(
    r"(?P<open><!-- generated: hovle inspect (?P<args>[^>]*?) -->\n)```text\n(?P<body>.*?)```\n"
    r"(?P<close><!-- end generated -->)",
    re.DOTALL,
)


def inspect_output(args: str) -> str:
    """What `hovle inspect ARGS` prints on stdout (run in this process; its log lines go to stderr)."""
    import deepspeed  # noqa: F401  (its logger binds stdout at import and notes the accelerator on it: not here)

    from jobs.inspect import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(shlex.split(args))
    if status != 0:
        raise RuntimeError(f"hovle inspect {args} exited {status}")
    return out.getvalue()


def blocks(text: str) -> dict[str, str]:
    """The document's generated blocks: inspect arguments -> the block's text as written."""
    return {match["args"]: match["body"] for match in BLOCK.finditer(text)}


def render(text: str) -> str:
    """The document with every generated block replaced by the command's output now."""
    return BLOCK.sub(lambda m: f"{m['open']}```text\n{inspect_output(m['args'])}```\n{m['close']}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs; write nothing")
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    if not blocks(text):
        parser.error(f"{args.doc}: no generated blocks (<!-- generated: hovle inspect ... -->)")
    fresh = render(text)
    if args.check:
        stale = fresh != text
        print(f"{args.doc}: {'stale: run python benchmarks/sizing_doc.py' if stale else 'up to date'}")
        return int(stale)
    args.doc.write_text(fresh)
    print(f"{args.doc}: {len(blocks(fresh))} block(s) written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
