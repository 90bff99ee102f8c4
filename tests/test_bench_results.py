"""The benchmarks' shared measuring helpers and the generated docs/benchmarks.md.

Real measurements of real (tiny) functions go through `alternate`, `ratios`, `Spread`, `Target`, `save`
and `report.render`; the tests check that what the document says is computed from those samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import pytest

from benchmarks import report
from benchmarks.results import (
    Report,
    Spread,
    Table,
    Target,
    alternate,
    cpu_model,
    parse_args,
    ratios,
    save,
    timed,
)


def busy_work(n: int) -> int:
    """A real function whose cost grows with n."""
    return sum(i * i for i in range(n))


def test_alternate_runs_the_sides_in_rounds_and_keeps_each_rounds_results_together() -> None:
    calls: list[str] = []

    def side(name: str, n: int):
        def run() -> float:
            calls.append(name)
            start = time.perf_counter()
            busy_work(n)
            return time.perf_counter() - start

        return run

    seen: list[tuple[int, str]] = []
    runs = alternate(
        {"a": side("a", 2_000), "b": side("b", 100)}, rounds=3, on_result=lambda r, s, _: seen.append((r, s))
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert seen == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert [len(v) for v in runs.values()] == [3, 3]
    assert all(t > 0 for v in runs.values() for t in v)
    with pytest.raises(ValueError, match="rounds"):
        alternate({"a": side("a", 1)}, rounds=0)


def test_ratios_and_spread_are_computed_from_the_measured_samples() -> None:
    # 60x the work on one side: per-round ratios well above 1, whatever the machine's load
    runs = alternate({"slow": timed(lambda: busy_work(60_000)), "fast": timed(lambda: busy_work(1_000))}, 5)
    per_round = ratios(runs["slow"], runs["fast"])
    assert per_round == [s / f for s, f in zip(runs["slow"], runs["fast"])]
    spread = Spread.of(per_round)
    assert spread.n == 5
    assert spread.median == statistics.median(per_round)
    assert spread.min == min(per_round) and spread.max == max(per_round)
    assert spread.q1 == pytest.approx(np.percentile(per_round, 25))
    assert spread.q3 == pytest.approx(np.percentile(per_round, 75))
    assert spread.median > 1
    assert spread.text(2, unit="x") == f"{spread.median:.2f}x ({spread.min:.2f}–{spread.max:.2f}x, n=5)"
    with pytest.raises(ValueError, match="unpaired"):
        ratios([1.0, 2.0], [1.0])


def test_spread_of_known_values() -> None:
    s = Spread.of([4.0, 1.0, 3.0, 2.0])
    assert (s.median, s.q1, s.q3, s.min, s.max) == (2.5, 1.75, 3.25, 1.0, 4.0)
    assert s.relative_range == pytest.approx(3 / 2.5)
    assert Spread.of([0.081]).text(1, scale=100, unit="%") == "8.1% (n=1)"
    with pytest.raises(ValueError):
        Spread.of([])


def test_a_target_is_judged_on_the_median_and_counts_the_repeats_that_met_it() -> None:
    met = Target("overhead", "<=", 0.10, [0.08, 0.12, 0.05], unit="%", scale=100, digits=1)
    assert met.met and met.repeats_met == 2
    assert met.to_dict()["measured_text"] == "8.0% (5.0–12.0%, n=3)"
    assert met.threshold_text() == "<= 10.0%"
    missed = Target("speed-up", ">=", 1.7, [1.2, 1.9, 1.5], unit="x")
    assert not missed.met and missed.repeats_met == 1
    strict = Target("data wait", "<", 0.05, [0.05, 0.05, 0.04])
    assert not strict.met  # the median equals the bound: "<" is not met
    with pytest.raises(ValueError, match="op"):
        Target("x", "=>", 1.0, [1.0])


def test_quick_swaps_in_the_smoke_defaults_and_explicit_flags_still_win() -> None:
    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--sizes", type=int, nargs="+", default=[1000, 16000])
        return p

    quick = {"rounds": 2, "sizes": [64]}
    full = parse_args(parser(), quick, [])
    assert (full.quick, full.rounds, full.sizes) == (False, 3, [1000, 16000])
    smoke = parse_args(parser(), quick, ["--quick"])
    assert (smoke.quick, smoke.rounds, smoke.sizes) == (True, 2, [64])
    mixed = parse_args(parser(), quick, ["--quick", "--rounds", "5"])
    assert (mixed.rounds, mixed.sizes) == (5, [64])


def test_cpu_model_reads_proc_cpuinfo() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
    )
    assert cpu_model(text) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"


def _bench(tmp_path, name: str, quick: bool) -> tuple[dict, list[float], list[float]]:
    """A tiny benchmark run end to end: alternate, targets, save(); returns (summary entry, ratios...)."""
    runs = alternate({"base": timed(lambda: busy_work(40_000)), "fast": timed(lambda: busy_work(2_000))}, 3)
    speedups = ratios(runs["base"], runs["fast"])
    table = Table("Seconds per side", ["side", "seconds"])
    for side, seconds in runs.items():
        table.add(side, Spread.of(seconds).text(5))
    targets = [
        Target("speed-up over base", ">=", 1.0, speedups, unit="x"),
        Target("an unreachable speed-up", ">=", 1e9, speedups, unit="x"),
    ]
    output = tmp_path / f"bench_{name}.json"
    save(
        output,
        {"benchmark": name, "runs": runs},
        Report(
            title=f"{name}: a tiny benchmark",
            description="busy_work(40k) vs busy_work(2k)",
            command=f"python benchmarks/bench_{name}.py" + (" --quick" if quick else ""),
            quick=quick,
            duration_s=1.5,
            tables=[table],
            targets=targets,
        ),
    )
    entry = {
        "name": name,
        "command": f"python benchmarks/bench_{name}.py",
        "result": str(output),
        "exit_code": 0,
        "wall_s": 2.0,
    }
    return entry, speedups, runs["base"]


def test_the_markdown_is_generated_from_the_saved_results(tmp_path) -> None:
    entry, speedups, base = _bench(tmp_path, "tiny", quick=True)
    failed = {"name": "broken", "command": "python x", "result": str(tmp_path / "none.json"), "exit_code": 3}
    summary = {
        "mode": "quick",
        "command": "python benchmarks/run_all.py --quick",
        "make_command": "make bench BENCH_ARGS='--quick'",
        "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:00+00:00",
        "wall_s": 65.0,
        "machine": json.loads((tmp_path / "bench_tiny.json").read_text()),
        "load_average_end": [1.0, 1.0, 1.0],
        "benches": [entry, failed],
    }
    doc = report.render(summary, report.load_results(summary))

    assert "**Mode: quick**" in doc and "make bench BENCH_ARGS='--quick'" in doc
    assert cpu_model() in doc and "torch " in doc and "datasets " in doc
    spread = Spread.of(speedups)
    measured = spread.text(2, unit="x")
    assert f"| tiny | speed-up over base | >= 1.00x | {measured} | **met** (3/3 repeats) |" in doc
    assert (
        f"| tiny | an unreachable speed-up | >= 1000000000.00x | {measured} | **not met** (0/3 repeats) |"
        in doc
    )
    assert f"| base | {Spread.of(base).text(5)} |" in doc
    assert "| broken | — | — | — | no result (exit 3) |" in doc
    assert "failed (exit 3)" in doc
    assert "| all |  | 1 min 05 s |  |" in doc

    summary["mode"] = "full"
    assert "**Mode: full**" in report.render(summary, report.load_results(summary))


def test_report_command_line_writes_the_file(tmp_path) -> None:
    entry, _, _ = _bench(tmp_path, "tiny", quick=False)
    summary = {
        "mode": "full",
        "command": "python benchmarks/run_all.py",
        "make_command": "make bench",
        "machine": {"cpus": 2},
        "benches": [entry],
    }
    (tmp_path / "run.json").write_text(json.dumps(summary))
    assert report.main(["--summary", str(tmp_path / "run.json"), "--output", str(tmp_path / "b.md")]) == 0
    text = (tmp_path / "b.md").read_text()
    assert text.startswith("# Benchmarks\n") and "## tiny: a tiny benchmark" in text


def test_make_bench_runs_every_benchmark_in_the_issues_order() -> None:
    from benchmarks import run_all

    names = run_all.discover()
    assert names[:5] == ["prepare", "train", "packing", "generate", "ingest"]
    assert all((run_all.HERE / f"bench_{name}.py").exists() for name in names)
