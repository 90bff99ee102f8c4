"""Samples/s of `prepare` (Ray Data) vs a plain single-process loop vs `datasets.Dataset.map(num_proc=N)`.

All three read the same synthetic instruct corpus, validate and decode every image, tile it, tokenize the
conversation with the same processor (built from the same config) and write zstd Parquet shards of the
same size. The loop and the `datasets` map call the very functions the pipeline's actors call
(`read_unit`, `preprocess_row`); the map runs them in N processes, N = the cores Ray sees (the pipeline's
actor count), so both parallel sides have the same workers.

Per corpus size the three sides run in rounds (loop, ray, datasets, loop, ray, datasets, ...) and every
ratio is taken within a round; the report gives the median and range over the rounds. Steady state is
the per-sample cost (the slope of seconds over corpus size, fitted per round), which leaves out what a
run pays once (actors or processes starting, building the processor, the manifest).

Outside the timings, as in normal use: Ray starting (a cluster is already running) and the one-time GGUF
conversion (model.gguf_cache keeps it). A small corpus goes through every side first: the first prepare
in a driver also starts Ray's worker processes and imports Ray Data, which a pipeline preparing several
datasets pays once; `cold_start_s` (first minus second probe run) is what a one-off `hovle prepare` adds.

    python benchmarks/bench_prepare.py [--sizes 1000 4000 16000] [--rounds 3] [--image-size 448] [--quick]

Prints tables and writes results/bench_prepare.json. Targets: >= 1.7x the loop at >= 16k samples and in
steady state; at least on par with `datasets` (ratio >= 1).
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

from benchmarks.results import (  # noqa: E402
    Report,
    Spread,
    Table,
    Target,
    alternate,
    command_line,
    default_output,
    parse_args,
    ratios,
    save,
)
from jobs.prepare import config_hash  # noqa: E402
from model.presets import build_processor, load_preset  # noqa: E402
from pipelines.corpora.synthetic import generate  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.preprocess import PrepareContext, preprocess_row  # noqa: E402
from pipelines.readers import read_unit  # noqa: E402
from pipelines.schema import SHARD_SCHEMA  # noqa: E402
from pipelines.settings import PrepareSettings  # noqa: E402
from pipelines.sources import discover_units  # noqa: E402
from pipelines.writer import parquet_bytes  # noqa: E402

SPEEDUP_TARGET = 1.7
TARGET_SAMPLES = 16_000
SIDES = ("loop", "ray", "datasets")
LABELS = {
    "loop": "plain loop (1 process)",
    "ray": "prepare (Ray Data)",
    "datasets": "datasets.Dataset.map",
}
QUICK = {"sizes": [128, 512], "rounds": 2, "probe": 32}


def raw_records(corpus: Path) -> list[dict]:
    return [raw for unit in discover_units(str(corpus)) for raw in read_unit(unit)]


def context(config: str, settings: PrepareSettings) -> PrepareContext:
    """What `hovle prepare` builds from a run config: the processor and config hash of its model section."""
    model = load_preset(config)
    return PrepareContext("instruct", settings, build_processor(model), config_hash(model))


def plain_loop(config: str, corpus: Path, output: Path, settings: PrepareSettings) -> int:
    """The same work, one record at a time in this process, a shard written every `shard_max_rows` rows.
    Returns the samples written."""
    ctx = context(config, settings)
    output.mkdir(parents=True, exist_ok=True)
    rows, shard, written = [], 0, 0
    for raw in raw_records(corpus):
        row, _ = preprocess_row(raw, ctx)
        if row is not None:
            rows.append(row)
            written += 1
        if len(rows) == settings.shard_max_rows:
            _write_shard(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), output, shard)
            rows, shard = [], shard + 1
    if rows:
        _write_shard(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), output, shard)
    return written


def _write_shard(table: pa.Table, output: Path, index: int) -> None:
    (output / f"shard-{index:05d}.parquet").write_bytes(parquet_bytes(table))  # as prepare writes them


def _preprocess_columns(batch: dict[str, list], ctx: PrepareContext) -> dict[str, list]:
    """A `datasets` batched map function: raw columns in, shard columns out (rejects dropped)."""
    size = len(next(iter(batch.values())))
    rows = [preprocess_row({name: values[i] for name, values in batch.items()}, ctx)[0] for i in range(size)]
    shards = [row for row in rows if row is not None]
    return {name: [row[name] for row in shards] for name in SHARD_SCHEMA.names}


def datasets_map(
    config: str, corpus: Path, output: Path, settings: PrepareSettings, num_proc: int, cache: Path
) -> int:
    """The same work with Hugging Face `datasets`: `Dataset.map(batched, num_proc=N)`, then the shards."""
    from datasets import Dataset, Features, disable_progress_bars

    disable_progress_bars()  # one line per run is printed instead
    ctx = context(config, settings)
    raw = Dataset.from_list(raw_records(corpus))
    mapped = raw.map(
        _preprocess_columns,
        fn_kwargs={"ctx": ctx},
        batched=True,
        batch_size=64,
        num_proc=num_proc,
        remove_columns=raw.column_names,
        features=Features.from_arrow_schema(SHARD_SCHEMA),
        # the map's Arrow files land in `cache`; a fresh fingerprint per run, so nothing is reused
        cache_file_name=str(cache / "map.arrow"),
        new_fingerprint=cache.name,
    )
    output.mkdir(parents=True, exist_ok=True)
    table = mapped.with_format("arrow")  # slices of the memory-mapped map output
    for index, start in enumerate(range(0, mapped.num_rows, settings.shard_max_rows)):
        _write_shard(table[start : start + settings.shard_max_rows], output, index)
    return mapped.num_rows


def per_sample_seconds(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares seconds = fixed + slope * size: (fixed seconds, seconds per sample)."""
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum(
        (x - mean_x) ** 2 for x in sizes
    )
    return mean_y - slope * mean_x, slope


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 4000, TARGET_SAMPLES])
    parser.add_argument("--rounds", type=int, default=3, help="runs of every side per size, alternating")
    parser.add_argument("--probe", type=int, default=256, help="samples of the warm-up / cold-start probe")
    parser.add_argument("--config", default="smollm2-135m")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--output", type=Path, default=default_output("bench_prepare"))
    args = parse_args(parser, QUICK, argv)
    sizes = sorted(set(args.sizes))

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    workers = int(ray.cluster_resources().get("CPU", 1))  # prepare's actor count, the map's processes
    settings = PrepareSettings(shard_max_rows=1024)
    context(args.config, settings)  # fills the GGUF conversion cache
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    runs = itertools.count()  # a fresh output folder for every run

    def side(name: str, corpus: Path):
        def run() -> tuple[float, int]:
            index = next(runs)
            output, cache = work / f"{name}-{index}", work / f"datasets-cache-{index}"
            start = time.perf_counter()
            if name == "loop":
                written = plain_loop(args.config, corpus, output, settings)
            elif name == "ray":
                ctx = context(args.config, settings)  # built inside the timing, as the other sides do
                written = prepare(
                    ctx.processor,
                    "instruct",
                    [str(corpus)],
                    str(output),
                    settings,
                    config_hash=ctx.config_hash,
                )["written"]
            else:
                written = datasets_map(args.config, corpus, output, settings, workers, cache)
            seconds = time.perf_counter() - start
            for folder in (output, cache):  # outside the timing: no side's clean-up counts
                shutil.rmtree(folder, ignore_errors=True)
            return seconds, written

        return run

    def progress(size: int):
        return lambda r, name, out: print(
            f"  n={size:6d} round {r + 1}: {name:<8} {out[0]:7.1f} s  {size / out[0]:7.1f} samples/s",
            flush=True,
        )

    measured: dict[int, dict[str, list[tuple[float, int]]]] = {}
    try:
        probe = generate(
            "instruct", args.probe, seed=5, output_dir=work / "probe", image_size=args.image_size
        )
        warm = alternate(
            {name: side(name, probe) for name in SIDES}, rounds=2, on_result=progress(args.probe)
        )
        cold_s, warm_s = warm["ray"][0][0], warm["ray"][1][0]
        startup = {
            "samples": args.probe,
            "first_s": round(cold_s, 2),
            "second_s": round(warm_s, 2),
            "cold_start_s": round(cold_s - warm_s, 2),
        }
        print(f"start-up probe: first prepare {cold_s:.1f} s, second {warm_s:.1f} s", flush=True)
        for n in sizes:
            corpus = generate(
                "instruct", n, seed=7, output_dir=work / f"corpus-{n}", image_size=args.image_size
            )
            measured[n] = alternate({name: side(name, corpus) for name in SIDES}, args.rounds, progress(n))
            written = {out[1] for outs in measured[n].values() for out in outs}
            if len(written) != 1:
                raise RuntimeError(f"the sides wrote different sample counts at n={n}: {measured[n]}")
            shutil.rmtree(corpus.parent, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()

    seconds = {
        n: {name: [s for s, _ in outs] for name, outs in by_side.items()} for n, by_side in measured.items()
    }
    rows, throughput = (
        [],
        Table(
            "Throughput per corpus size (samples/s: median, min–max over the rounds; ratios per round)",
            ["samples", "side", "samples/s", "seconds", "ratio to the loop", "ray / datasets"],
        ),
    )
    for n in sizes:
        s = seconds[n]
        rate = {name: Spread.of([n / t for t in s[name]]) for name in SIDES}
        over_loop = {name: Spread.of(ratios(s["loop"], s[name])) for name in SIDES}
        ray_over_ds = Spread.of(ratios(s["datasets"], s["ray"]))
        for name in SIDES:
            throughput.add(
                n,
                LABELS[name],
                rate[name].text(1),
                Spread.of(s[name]).text(1),
                "1 (baseline)" if name == "loop" else over_loop[name].text(2, unit="x"),
                ray_over_ds.text(2, unit="x") if name == "ray" else "",
            )
        rows.append(
            {
                "samples": n,
                "written": measured[n]["loop"][0][1],
                "seconds": {name: [round(t, 3) for t in s[name]] for name in SIDES},
                "samples_per_s": {name: rate[name].to_dict() for name in SIDES},
                "ratio_to_loop": {name: over_loop[name].to_dict() for name in ("ray", "datasets")},
                "ray_over_datasets": ray_over_ds.to_dict(),
            }
        )

    largest = sizes[-1]
    short = largest < TARGET_SAMPLES
    size_note = f"measured at {largest} samples, below the target's {TARGET_SAMPLES}" if short else ""
    targets = [
        Target(
            f"prepare vs the plain loop at {largest} samples",
            ">=",
            SPEEDUP_TARGET,
            ratios(seconds[largest]["loop"], seconds[largest]["ray"]),
            unit="x",
            note=size_note,
        ),
        Target(
            f"prepare vs datasets.Dataset.map(num_proc={workers}) at {largest} samples",
            ">=",
            1.0,
            ratios(seconds[largest]["datasets"], seconds[largest]["ray"]),
            unit="x",
            note=size_note,
        ),
    ]
    steady: dict[str, object] = {}
    notes = []
    if len(sizes) >= 2:
        fits = {
            name: [
                per_sample_seconds(sizes, [seconds[n][name][r] for n in sizes]) for r in range(args.rounds)
            ]
            for name in SIDES
        }
        slope = {name: [per_sample for _, per_sample in fits[name]] for name in SIDES}
        if any(k <= 0 for name in SIDES for k in slope[name]):
            notes.append(
                f"A fitted per-sample time is not positive: between {sizes} the timing noise exceeds the "
                "work added, so the steady-state rows are not meaningful at these sizes."
            )
        steady_table = Table(
            f"Steady state: seconds = fixed + per-sample x samples, fitted per round over {sizes}",
            ["side", "steady samples/s", "fixed seconds", "ratio to the loop", "ray / datasets"],
        )
        for name in SIDES:
            steady_table.add(
                LABELS[name],
                Spread.of([1 / k for k in slope[name]]).text(1),
                Spread.of([fixed for fixed, _ in fits[name]]).text(1),
                "1 (baseline)"
                if name == "loop"
                else Spread.of(ratios(slope["loop"], slope[name])).text(2, unit="x"),
                Spread.of(ratios(slope["datasets"], slope["ray"])).text(2, unit="x") if name == "ray" else "",
            )
        steady = {
            "sizes": sizes,
            "samples_per_s": {name: Spread.of([1 / k for k in slope[name]]).to_dict() for name in SIDES},
            "fixed_s": {name: Spread.of([f for f, _ in fits[name]]).to_dict() for name in SIDES},
            "ray_over_loop": Spread.of(ratios(slope["loop"], slope["ray"])).to_dict(),
            "ray_over_datasets": Spread.of(ratios(slope["datasets"], slope["ray"])).to_dict(),
        }
        targets += [
            Target(
                "prepare vs the plain loop, steady state",
                ">=",
                SPEEDUP_TARGET,
                ratios(slope["loop"], slope["ray"]),
                unit="x",
            ),
            Target(
                "prepare vs datasets, steady state",
                ">=",
                1.0,
                ratios(slope["datasets"], slope["ray"]),
                unit="x",
            ),
        ]

    for table in [throughput] + ([steady_table] if steady else []):
        print(f"\n{table.title}")
        print(" | ".join(table.columns))
        for row in table.rows:
            print(" | ".join(row))
    for target in targets:
        print(
            f"{target.name}: {target.spread.text(2, unit='x')} (target {target.threshold_text()}): "
            f"{'met' if target.met else 'NOT met'}"
        )

    report = Report(
        title="prepare: Ray Data vs a plain loop vs datasets.map",
        description=(
            f"Synthetic instruct corpus at {args.image_size} px, smollm2-135m processor: read, validate, "
            f"decode, tile, tokenize, write zstd Parquet shards. `datasets` maps with num_proc={workers}, "
            f"prepare runs {workers} actors. Sides alternate (loop, ray, datasets) x {args.rounds} rounds "
            "per size; ratios per round. Outside the timings: Ray's start and its first-run warm-up "
            f"({startup['cold_start_s']} s, measured on {args.probe} samples)."
        ),
        command=command_line("bench_prepare.py", argv),
        quick=args.quick,
        duration_s=time.perf_counter() - started,
        tables=[throughput] + ([steady_table] if steady else []),
        targets=targets,
        notes=notes,
    )
    result = {
        "benchmark": "prepare",
        "config": args.config,
        "image_size": args.image_size,
        "rounds": args.rounds,
        "workers": workers,
        "startup": startup,
        "rows": rows,
        "steady": steady,
    }
    save(args.output, result, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
