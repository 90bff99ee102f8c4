"""`make bench`: every benchmarks/bench_*.py in turn, then docs/benchmarks.md from what they measured.

    python benchmarks/run_all.py [--quick] [--only prepare train ...] [--docs docs/benchmarks.md]
    make bench [BENCH_ARGS="--quick"]

Each benchmark runs in a process of its own (`--quick` passed on: the smoke sizes) and writes
results/<bench>.json; this runner times each one, writes results/bench_run.json (the mode, the command,
the machine, each benchmark's wall time and exit code) and renders docs/benchmarks.md from them
(`benchmarks/report.py`). A benchmark that fails is reported as failed, the others still run, and the
exit code is 1. A target that is not met is a finding, not a failure: it is in the document.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from benchmarks.results import RESULTS_DIR, default_output, load_average, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the order; a bench_*.py not listed here runs after these
ORDER = ("prepare", "train", "packing", "generate", "ingest")


def discover() -> list[str]:
    found = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    return [name for name in ORDER if name in found] + [name for name in found if name not in ORDER]


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run(name: str, quick: bool) -> dict:
    """One benchmark in its own process; its stale result removed first, so a failure leaves none."""
    output = default_output(f"bench_{name}")
    output.unlink(missing_ok=True)
    args = (["--quick"] if quick else []) + ["--output", str(output.relative_to(ROOT))]
    print(f"== bench_{name} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, str(HERE / f"bench_{name}.py"), *args], cwd=ROOT)
    wall = time.perf_counter() - start
    print(f"== bench_{name}: exit {code} after {wall:.0f} s", flush=True)
    return {
        "name": name,
        "command": " ".join(["python", f"benchmarks/bench_{name}.py", *(["--quick"] if quick else [])]),
        "result": str(output.relative_to(ROOT)),
        "exit_code": code,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="every benchmark at its smoke size")
    parser.add_argument("--only", nargs="+", choices=discover(), help="these benchmarks only")
    parser.add_argument("--docs", type=Path, default=report.DEFAULT_DOC, help="the markdown to write")
    args = parser.parse_args(argv)

    started, start = now(), time.perf_counter()
    summary = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python benchmarks/run_all.py", *argv]),
        "make_command": "make bench" + (f" BENCH_ARGS='{' '.join(argv)}'" if argv else ""),
        "started": started,
        "machine": machine(),
        "benches": [],
    }
    for name in args.only or discover():
        summary["benches"].append(run(name, args.quick))
    summary.update(
        finished=now(), wall_s=round(time.perf_counter() - start, 1), load_average_end=load_average()
    )
    path = RESULTS_DIR / "bench_run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    doc = report.write(summary, args.docs)
    print(f"wrote {path} and {doc} ({summary['mode']} mode, {summary['wall_s']:.0f} s)")
    return 0 if all(b["exit_code"] == 0 for b in summary["benches"]) else 1


if __name__ == "__main__":
    sys.exit(main())
