"""Images/s of `prepare` (Ray Data) vs a plain single-process Python loop doing the same work.

Both read the same synthetic instruct corpus, validate and decode every image, tile it, tokenize the
conversation and write Parquet shards. The loop calls the very functions the pipeline's actors call
(`read_unit`, `preprocess_row`), one record after another, in this process.

What is outside the timings, as it is in normal use: Ray starting (a cluster is already running) and
the one-time GGUF conversion (model.gguf_cache keeps it). The first prepare in a driver also pays for
Ray's worker processes starting and importing Ray Data, which a pipeline that prepares several datasets
(retrain's three stages) pays once: a small corpus is prepared twice before the timings, and
`cold_start_s`, the difference, is what a one-off `hovle prepare` job adds. Everything else is timed,
each run's own preprocessing actors starting, building the processor and writing the manifest included.
Each side runs `--repeats` times per size (alternating) and the fastest counts.

    python benchmarks/bench_prepare.py [--sizes 1000 4000 16000] [--repeats 2] [--image-size 448]

Prints a table and writes results/bench_prepare.json. Target: >= 1.7x the loop on 2 cores, with time
growing linearly in the corpus size.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import default_output, save  # noqa: E402
from pipelines.prepare import parquet_bytes, prepare  # noqa: E402
from pipelines.preprocess import PrepareContext, preprocess_row  # noqa: E402
from pipelines.readers import read_unit  # noqa: E402
from pipelines.schema import SHARD_SCHEMA  # noqa: E402
from pipelines.settings import PrepareSettings  # noqa: E402
from pipelines.sources import discover_units  # noqa: E402
from pipelines.synthetic import generate  # noqa: E402


def plain_loop(config: str, corpus: Path, output: Path, settings: PrepareSettings) -> tuple[int, int]:
    """The same work, one record at a time in this process. Returns (samples written, images)."""
    ctx = PrepareContext.build(config, "instruct", settings)
    rows, images, shard = [], 0, 0
    output.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal rows, shard
        if rows:
            data = parquet_bytes(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))  # as prepare writes
            (output / f"shard-{shard:05d}.parquet").write_bytes(data)
            rows, shard = [], shard + 1

    written = 0
    for unit in discover_units(str(corpus)):
        for raw in read_unit(unit):
            images += len(raw["image_refs"])
            row, _ = preprocess_row(raw, ctx)
            if row is not None:
                rows.append(row)
                written += 1
                if len(rows) >= settings.shard_max_rows:
                    flush()
    flush()
    return written, images


def linear_fit(sizes: list[int], seconds: list[float]) -> dict[str, float]:
    """Least-squares seconds = fixed + per_sample * size: how time grows with the corpus size."""
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum(
        (x - mean_x) ** 2 for x in sizes
    )
    fixed = mean_y - slope * mean_x
    deviation = max(abs(y - (fixed + slope * x)) / y for x, y in zip(sizes, seconds))
    return {
        "fixed_s": round(fixed, 2),
        "ms_per_sample": round(1000 * slope, 3),
        "max_deviation": round(deviation, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 4000, 16000])
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and size; the fastest counts")
    parser.add_argument("--probe", type=int, default=256, help="samples of the cold-start probe")
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--output", type=Path, default=default_output("bench_prepare"))
    args = parser.parse_args(argv)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    settings = PrepareSettings(shard_max_rows=1024)
    PrepareContext.build(args.config, "instruct", settings)  # fills the GGUF conversion cache
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    runs = itertools.count()  # a fresh output folder for every run

    def timed_prepare(corpus: Path) -> tuple[float, dict]:
        start = time.perf_counter()
        report = prepare(args.config, "instruct", [str(corpus)], str(work / f"ray-{next(runs)}"), settings)
        return time.perf_counter() - start, report

    rows = []
    try:
        probe = generate(
            "instruct", args.probe, seed=5, output_dir=work / "probe", image_size=args.image_size
        )
        cold_s, _ = timed_prepare(probe)
        warm_s, _ = timed_prepare(probe)
        startup = {
            "samples": args.probe,
            "first_s": round(cold_s, 2),
            "second_s": round(warm_s, 2),
            "cold_start_s": round(cold_s - warm_s, 2),
        }
        print(
            f"start-up probe ({args.probe} samples): first prepare in this driver {cold_s:.1f} s, "
            f"second {warm_s:.1f} s -> a one-off job adds {cold_s - warm_s:.1f} s",
            flush=True,
        )
        for n in args.sizes:
            corpus = generate(
                "instruct", n, seed=7, output_dir=work / f"corpus-{n}", image_size=args.image_size
            )
            loop_times, ray_times = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                written_loop, images = plain_loop(args.config, corpus, work / f"loop-{n}", settings)
                loop_times.append(time.perf_counter() - start)
                seconds, report = timed_prepare(corpus)
                ray_times.append(seconds)
                assert report["written"] == written_loop, (report["written"], written_loop)
            loop_s, ray_s = min(loop_times), min(ray_times)
            row = {
                "samples": n,
                "images": images,
                "written": written_loop,
                "loop_s": round(loop_s, 2),
                "ray_s": round(ray_s, 2),
                "loop_runs_s": [round(t, 2) for t in loop_times],
                "ray_runs_s": [round(t, 2) for t in ray_times],
                "loop_images_s": round(images / loop_s, 1),
                "ray_images_s": round(images / ray_s, 1),
                "speedup": round(loop_s / ray_s, 2),
                "speedup_one_off_job": round(loop_s / (ray_s + startup["cold_start_s"]), 2),
                "ray_ms_per_sample": round(1000 * ray_s / n, 2),
                "loop_ms_per_sample": round(1000 * loop_s / n, 2),
            }
            rows.append(row)
            print(
                f"n={n:6d} images={images:6d}  loop {row['loop_images_s']:8.1f} img/s ({loop_s:7.1f} s)  "
                f"ray {row['ray_images_s']:8.1f} img/s ({ray_s:7.1f} s)  speed-up {row['speedup']:.2f}x "
                f"(one-off job {row['speedup_one_off_job']:.2f}x)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()

    growth = (
        {
            name: linear_fit([r["samples"] for r in rows], [r[f"{name}_s"] for r in rows])
            for name in ("loop", "ray")
        }
        if len(rows) >= 2
        else {}
    )
    for name, fit in growth.items():
        print(
            f"{name:4s} time = {fit['fixed_s']:6.1f} s + {fit['ms_per_sample']:.2f} ms x samples "
            f"(worst deviation from the line {fit['max_deviation']:.1%})"
        )
    if growth:
        steady = growth["loop"]["ms_per_sample"] / growth["ray"]["ms_per_sample"]
        print(f"steady-state speed-up (ratio of slopes): {steady:.2f}x")
        growth["steady_speedup"] = round(steady, 2)

    result = {
        "benchmark": "prepare",
        "growth": growth,
        "config": args.config,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "startup": startup,
        "rows": rows,
    }
    save(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
