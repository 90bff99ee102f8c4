"""How training ingest gets its pixels, measured on one prepared corpus in one run.

1. Stored tiles vs on the fly: ms per sample to produce normalised pixel tensors (a) from the shard's
   stored PNG tiles (`decode_sample`, what training does) vs (b) from the original image bytes through
   the model processor (decode the image as prepare does, dynamic tiling + resize, normalise).
2. Reading shards in Ray Data tasks vs in this process: epoch time and data-wait share of a
   `TrainingStream` over `ShardSource(reader="ray" | "local")`, with a training step simulated by a sleep
   of `--step-ms` per batch; data-wait = time spent in next(iterator) / epoch time. A batch's tiles are
   decoded inside next() either way (in the worker), so that decode counts as waiting.

The corpus is the synthetic instruct corpus at 448 px (5 tiles of 224 px with the smollm2-135m preset),
prepared by `pipelines.prepare.prepare`. Ray starts once (2 CPUs) before everything and is shut down after.

    python benchmarks/bench_ingest.py [--n 400] [--epochs 3] [--step-ms 100] [--batch-size 4]

Prints a table and writes results/bench_ingest.json. Decides: whether prepare stores tiles (stored
must be faster than on the fly) and ShardSource's default `reader` (the lower epoch time and data-wait).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import (  # noqa: E402
    Report,
    Spread,
    Table,
    Target,
    command_line,
    default_output,
    parse_args,
    ratios,
    save,
)
from model import build_processor, load_preset  # noqa: E402
from pipelines.corpora.synthetic import generate  # noqa: E402
from pipelines.ingest import ShardSource, decode_sample  # noqa: E402
from pipelines.manifest import read_manifest  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.settings import PrepareSettings  # noqa: E402
from pipelines.stream import TrainingStream  # noqa: E402
from pipelines.validate import decode_image  # noqa: E402

CONFIG = "smollm2-135m"
QUICK = {"n": 64, "epochs": 2}


def shard_rows(dataset: Path) -> list[dict]:
    """Every row of every listed shard (all splits), as Python values."""
    rows = []
    for entry in read_manifest(str(dataset)).shards:
        rows.extend(pq.read_table(dataset / entry.path).to_pylist())
    return rows


def pixels_per_sample(rows: list[dict], jsonl: Path, processor, settings: PrepareSettings) -> dict:
    """ms/sample of stored PNG tiles -> pixels vs original bytes -> processor -> pixels (alternating)."""
    refs = {}
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
        refs[record["id"]] = [(jsonl.parent / p).read_bytes() for p in paths]
    stored, fly, identical = [], [], True
    mean, std, tile = processor.image_mean, processor.image_std, processor.tile_size
    for row in rows:
        originals = refs[row["id"].rsplit("/", 1)[-1]]
        start = time.perf_counter()
        a = decode_sample(row, tile, mean, std)["pixel_values"]
        stored.append(time.perf_counter() - start)
        start = time.perf_counter()
        b, _ = processor.process_images([decode_image(d, settings.max_image_pixels) for d in originals])
        fly.append(time.perf_counter() - start)
        identical &= torch.equal(a, b) if a is not None else b.numel() == 0
    tiles = sum(len(r["tiles"]) for r in rows)
    png = statistics.mean(len(t) for r in rows for t in r["tiles"])
    out = {"samples": len(rows), "tiles_per_sample": round(tiles / len(rows), 2)}
    for name, times in (("stored", stored), ("on_the_fly", fly)):
        out[f"{name}_ms_per_sample"] = round(1000 * statistics.mean(times), 2)
        out[f"{name}_ms_median"] = round(1000 * statistics.median(times), 2)
        out[f"{name}_ms_per_tile"] = round(1000 * sum(times) / tiles, 3)
    out["on_the_fly_over_stored"] = round(statistics.mean(fly) / statistics.mean(stored), 2)
    out["per_sample_ratios"] = [round(r, 3) for r in ratios(fly, stored)]  # each sample timed both ways
    out["pixels_identical"] = identical
    out["png_bytes_per_tile"] = round(png)
    out["float32_over_png_bytes"] = round(3 * tile * tile * 4 / png, 1)
    return out


def epoch(source: ShardSource, index: int, args: argparse.Namespace, pad_id: int) -> dict:
    """One epoch of a TrainingStream with a `step_ms` sleep per batch; time spent waiting in next()."""
    stream = TrainingStream(
        source, batch_size=args.batch_size, pad_token_id=pad_id, max_tokens=args.max_tokens
    )
    stream.load_state_dict({"epoch": index, "step": 0, "next": 0, "open": [], "rows": 0})
    waits, rows = [], 0
    started = time.perf_counter()
    batches = iter(stream)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        waits.append(time.perf_counter() - start)
        if batch is None:
            break
        rows += len(batch["ids"])
        time.sleep(args.step_ms / 1000)
    total = time.perf_counter() - started
    steps = len(waits) - 1
    return {
        "reader": source.reader,
        "epoch": index,
        "steps": steps,
        "rows": rows,
        "epoch_s": round(total, 2),
        "wait_s": round(sum(waits), 2),
        "wait_fraction": round(sum(waits) / total, 3),
        "wait_ms_per_step": round(1000 * sum(waits) / steps, 1),
        "first_batch_ms": round(1000 * waits[0], 1),
    }


def report_section(
    args: argparse.Namespace, argv: list[str] | None, result: dict, epochs: list[dict], duration_s: float
) -> Report:
    """The docs/benchmarks.md section: both comparisons with their spread, the two decisions as checks."""
    p = result["stored_vs_on_the_fly"]
    pixels = Table(
        f"Pixels per sample ({p['samples']} samples, {p['tiles_per_sample']} tiles each; each sample timed "
        "both ways in turn)",
        ["pixels from", "ms/sample (mean)", "ms/sample (median)", "ms/tile"],
    )
    for label, key in (("stored PNG tiles", "stored"), ("original bytes + processor", "on_the_fly")):
        pixels.add(label, p[f"{key}_ms_per_sample"], p[f"{key}_ms_median"], p[f"{key}_ms_per_tile"])
    modes = ("ray", "local")
    per_mode = {m: [e for e in epochs if e["reader"] == m] for m in modes}  # epoch i of each mode: a pair
    reading = Table(
        f"Epochs with a {args.step_ms:.0f} ms simulated step (median, min–max over {args.epochs} epochs per "
        "reader, alternating ray / local)",
        ["reader", "epoch s", "data wait", "wait ms/step", "first batch ms"],
    )
    for mode in modes:
        runs = per_mode[mode]
        reading.add(
            mode,
            Spread.of([e["epoch_s"] for e in runs]).text(2),
            Spread.of([e["wait_fraction"] for e in runs]).text(1, scale=100, unit="%"),
            Spread.of([e["wait_ms_per_step"] for e in runs]).text(1),
            Spread.of([e["first_batch_ms"] for e in runs]).text(0),
        )
    fly_over_stored = Spread.of(p["per_sample_ratios"])
    return Report(
        title="ingest: stored tiles vs decoding originals; shards read in Ray Data vs in the worker",
        description=(
            f"Synthetic instruct corpus of {args.n} records at {args.image_size} px, prepared once. Not an "
            "issue target: the two checks below are the measurements behind prepare storing PNG tiles and "
            "ShardSource's default reader='ray' (train.data.reader)."
        ),
        command=command_line("bench_ingest.py", argv),
        quick=args.quick,
        duration_s=duration_s,
        tables=[pixels, reading],
        targets=[
            Target(
                "check: stored tiles beat decoding originals (on the fly / stored, per sample)",
                ">",
                1.0,
                p["per_sample_ratios"],
                unit="x",
                note=f"per-sample ratios, quartiles {fly_over_stored.q1:.2f}–{fly_over_stored.q3:.2f}",
            ),
            Target(
                "check: the default reader='ray' is not slower (epoch local / ray, per epoch)",
                ">=",
                1.0,
                ratios([e["epoch_s"] for e in per_mode["local"]], [e["epoch_s"] for e in per_mode["ray"]]),
                unit="x",
            ),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=400, help="corpus records")
    parser.add_argument("--image-size", type=int, default=448, help="synthetic image size (448: 5 tiles)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per reader (interleaved)")
    parser.add_argument("--step-ms", type=float, default=100.0, help="simulated training step")
    parser.add_argument("--batch-size", type=int, default=4, help="packs per batch")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=default_output("bench_ingest"))
    args = parse_args(parser, QUICK, argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset execution lines
    processor = build_processor(load_preset(CONFIG))
    settings = PrepareSettings(shard_max_rows=128)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ingest_") as work:
            jsonl = generate(
                "instruct", args.n, seed=7, output_dir=Path(work) / "corpus", image_size=args.image_size
            )
            dataset = Path(work) / "dataset"
            start = time.perf_counter()
            report = prepare(processor, "instruct", [str(jsonl)], str(dataset), settings)
            prepare_s = time.perf_counter() - start
            pixels = pixels_per_sample(shard_rows(dataset), jsonl, processor, settings)
            sources = {
                mode: ShardSource(str(dataset), tile_size=processor.tile_size, reader=mode)
                for mode in ("ray", "local")
            }
            pad_id = processor.tokenizer.pad_token_id
            epochs = [epoch(sources[m], e, args, pad_id) for e in range(args.epochs) for m in sources]
    finally:
        ray.shutdown()

    modes = {}
    for mode in sources:
        runs = [r for r in epochs if r["reader"] == mode]
        modes[mode] = {
            key: round(statistics.mean(r[key] for r in runs), 3)
            for key in ("epoch_s", "wait_fraction", "wait_ms_per_step", "first_batch_ms")
        }
    faster = min(modes, key=lambda m: modes[m]["epoch_s"])
    result = {
        "benchmark": "ingest",
        "config": CONFIG,
        "corpus": {"kind": "synthetic instruct", "n": args.n, "seed": 7, "image_size": args.image_size},
        "written": report["written"],
        "train_rows": len(sources["ray"].index),
        "prepare_s": round(prepare_s, 1),
        "stored_vs_on_the_fly": pixels,
        "reader": {
            "step_ms": args.step_ms,
            "batch_size": args.batch_size,
            "max_tokens": args.max_tokens,
            "epochs": epochs,
            "mean": modes,
            "faster": faster,
        },
        "ray_cpus": 2,
    }
    p = pixels
    print(f"corpus: {report['written']} samples ({result['train_rows']} train), prepare {prepare_s:.1f} s")
    print(
        f"{'pixels from':<28} {'ms/sample':>10} {'median':>8} {'ms/tile':>8}  {p['tiles_per_sample']} tiles"
    )
    for label, k in (("stored PNG tiles", "stored"), ("original bytes + processor", "on_the_fly")):
        ms = (p[f"{k}_ms_per_sample"], p[f"{k}_ms_median"], p[f"{k}_ms_per_tile"])
        print(f"{label:<28} {ms[0]:>10.2f} {ms[1]:>8.2f} {ms[2]:>8.2f}")
    print(
        f"on the fly / stored: {p['on_the_fly_over_stored']:.2f}x (pixels identical: {p['pixels_identical']})"
    )
    columns = "reader epoch steps epoch_s wait_s wait_fraction wait_ms_per_step first_batch_ms".split()
    print("  ".join(columns))
    for row in epochs:
        print("  ".join(f"{row[c]:>{len(c)}}" for c in columns))
    for mode, m in modes.items():
        print(f"mean {mode:<6}: {m['epoch_s']:.2f} s/epoch, {m['wait_ms_per_step']:.1f} ms waiting per step")
    print(f"faster: reader={faster}, {'stored tiles' if p['on_the_fly_over_stored'] > 1 else 'on the fly'}")
    save(args.output, result, report_section(args, argv, result, epochs, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
