"""What every benchmark shares: alternating repeats with their spread, targets, the machine, the JSON out.

    runs = alternate({"loop": run_loop, "ray": run_ray}, rounds=3)   # loop ray loop ray loop ray
    Spread.of(runs["ray"])                                           # median, quartiles, min-max
    ratios(runs["loop"], runs["ray"])                                # one ratio per alternating pair
    Target("speed-up over the loop", ">=", 1.7, per_pair, unit="x")  # met on the median, with the count
    save(path, result, report=Report(...))                           # results/<name>.json

Each side of a comparison runs once per round, the sides one after another in the same order every
round, so slow drift on a shared machine (another job starting, thermal throttling) reaches both sides
alike; the ratio is taken within each round, so a round that was slow on both sides does not move it.
`report` is what `benchmarks/report.py` turns into docs/benchmarks.md: tables and targets, generated from
the measured values, never typed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
T = TypeVar("T")
Comparison = Literal[">=", ">", "<=", "<"]
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, threshold: value >= threshold,
    ">": lambda value, threshold: value > threshold,
    "<=": lambda value, threshold: value <= threshold,
    "<": lambda value, threshold: value < threshold,
}
VERSIONED = ("torch", "ray", "deepspeed", "datasets", "transformers", "mlflow")


def default_output(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


# ---- repeats and their spread -------------------------------------------------------------------------
def alternate(
    sides: Mapping[str, Callable[[], T]],
    rounds: int,
    on_result: Callable[[int, str, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run every side once per round, in the mapping's order (A B A B ... for two sides).

    Returns {side: [result of round 0, round 1, ...]}: index i of every side belongs to the same round.
    `on_result(round, side, result)` is called after each run (progress lines).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    results: dict[str, list[T]] = {name: [] for name in sides}
    for index in range(rounds):
        for name, run in sides.items():
            result = run()
            results[name].append(result)
            if on_result is not None:
                on_result(index, name, result)
    return results


def timed(run: Callable[[], Any]) -> Callable[[], float]:
    """`run` as a side of `alternate` that returns its wall time in seconds."""

    def side() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return side


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """numerator[i] / denominator[i] for every round i (both sides of one round are a pair)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"unpaired samples: {len(numerator)} vs {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator)]


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default); `ordered` sorted."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and range of repeated measurements of one quantity."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        ordered = sorted(float(v) for v in values)
        return cls(
            n=len(ordered),
            median=statistics.median(ordered),
            q1=_quantile(ordered, 0.25),
            q3=_quantile(ordered, 0.75),
            min=ordered[0],
            max=ordered[-1],
        )

    @property
    def relative_range(self) -> float:
        """(max - min) / median: how far apart the repeats lie."""
        return (self.max - self.min) / abs(self.median) if self.median else float("inf")

    def text(self, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
        """The median, then the range of the repeats: "1.83x (1.71–1.95x, n=3)"."""
        f = f"{{:.{digits}f}}"
        median = f.format(self.median * scale) + unit
        if self.n == 1:
            return f"{median} (n=1)"
        return f"{median} ({f.format(self.min * scale)}–{f.format(self.max * scale)}{unit}, n={self.n})"

    def to_dict(self) -> dict[str, float]:
        return {
            key: round(value, 6) if isinstance(value, float) else value for key, value in asdict(self).items()
        }


# ---- targets --------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A target from the issue, judged on the median of the repeats; how many repeats met it is kept too.

    `samples` are the per-round values (a ratio per alternating pair, a fraction per run); `scale` and
    `unit` only change how it prints (0.081 with scale 100 and unit "%" prints as 8.1%).
    """

    name: str
    op: Comparison
    threshold: float
    samples: Sequence[float]
    unit: str = ""
    scale: float = 1.0
    digits: int = 2
    note: str = ""

    def __post_init__(self) -> None:
        if self.op not in _COMPARE:
            raise ValueError(f"op must be one of {sorted(_COMPARE)}, got {self.op!r}")
        self.samples = [float(v) for v in self.samples]
        self.spread = Spread.of(self.samples)

    @property
    def met(self) -> bool:
        return _COMPARE[self.op](self.spread.median, self.threshold)

    @property
    def repeats_met(self) -> int:
        return sum(_COMPARE[self.op](v, self.threshold) for v in self.samples)

    def threshold_text(self) -> str:
        f = f"{{:.{self.digits}f}}"
        return f"{self.op} {f.format(self.threshold * self.scale)}{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "threshold": self.threshold,
            "samples": [round(v, 6) for v in self.samples],
            "spread": self.spread.to_dict(),
            "met": self.met,
            "repeats_met": self.repeats_met,
            "measured_text": self.spread.text(self.digits, self.scale, self.unit),
            "threshold_text": self.threshold_text(),
            "note": self.note,
        }


# ---- what report.py renders -----------------------------------------------------------------------------
@dataclass
class Table:
    """One table of a benchmark's section: column names and rows of already-formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])


@dataclass
class Report:
    """A benchmark's section of docs/benchmarks.md: what was compared, the tables, the targets."""

    title: str
    description: str
    command: str
    quick: bool
    duration_s: float
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "description": self.description,
            "command": self.command,
            "mode": "quick" if self.quick else "full",
            "duration_s": round(self.duration_s, 1),
            "tables": [asdict(t) for t in self.tables],
            "targets": [t.to_dict() for t in self.targets],
            "notes": list(self.notes),
        }


# ---- the command line every benchmark shares ------------------------------------------------------------
def parse_args(
    parser: argparse.ArgumentParser, quick: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse with a `--quick` flag that swaps in the smoke-run defaults `quick` (explicit flags still win)."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small smoke run: {', '.join(f'{k}={v}' for k, v in quick.items())}",
    )
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How this benchmark was started, for the report: `python benchmarks/<script> <args>`."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}", *args])


# ---- the machine ------------------------------------------------------------------------------------------
def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What the figures depend on besides the code: CPU, cores, memory, library versions, load, date."""
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "versions": versions(),
        "load_average": load_average(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def save(path: Path, result: dict[str, Any], report: Report | None = None) -> None:
    """Write `result` (machine info and the report section added) as indented JSON and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result, **machine()}
    if report is not None:
        payload["report"] = report.to_dict()
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
