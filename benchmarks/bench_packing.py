"""Packing efficiency (non-padding tokens / all tokens): packed rows vs padding each batch to its longest.

The corpus is the synthetic instruct corpus (`pipelines.corpora.synthetic.generate("instruct", ...)`),
tokenized by the processor of the `smollm2-135m` preset (224 px tiles, 64 image tokens per tile),
in corpus order.
Padded batches hold `--batch-size` samples; packed rows hold `--max-tokens` tokens, filled by
`pack_sequences` (streaming first fit with `--max-open` open packs), collated by `collate_packed`.

One corpus per `--seeds` value: the figures are exact for a corpus, so their spread is over corpora.

    python benchmarks/bench_packing.py [--n 1000] [--seeds 0 1 2] [--max-tokens 2048] [--max-open 1 4 16]

Prints a table and writes results/bench_packing.json. Target: >= 0.95 with packing at 2048 tokens and
the look-ahead training uses (`DEFAULT_MAX_OPEN`), on the median corpus.
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

from PIL import Image

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
from pipelines.packing import (  # noqa: E402
    DEFAULT_MAX_OPEN,
    collate_packed,
    collate_padded,
    pack_sequences,
    packing_efficiency,
)

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
TARGET = 0.95
QUICK = {"n": 200, "seeds": [0, 1]}


def tokenized_corpus(
    processor, n: int, seed: int, workdir: Path, image_size: int = 224, pixels: bool = False
) -> list[dict]:
    """The instruct corpus as samples ({input_ids, labels, num_tiles}, and `pixel_values` with `pixels`)."""
    jsonl = generate("instruct", n, seed, workdir, image_size=image_size)
    samples = []
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        refs = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images = []
        for ref in refs:
            with Image.open(jsonl.parent / ref) as image:
                images.append(image.convert("RGB"))
        messages = [
            {"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]
        ]
        out = processor(messages, images=images)
        sample = {"input_ids": out["input_ids"][0], "labels": out["labels"][0]}
        sample["num_tiles"] = sum(out["num_tiles"])
        if pixels:
            sample["pixel_values"] = out["pixel_values"]
        samples.append(sample)
    return samples


def padded_batches(samples: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    return [collate_padded(samples[i : i + batch_size], pad_id) for i in range(0, len(samples), batch_size)]


def packed_batches(samples: list[dict], max_tokens: int, max_open: int, pad_id: int) -> list[dict]:
    """Every pack as a one-row batch (rows per batch do not change the padding)."""
    packs = pack_sequences([s["input_ids"].numel() for s in samples], max_tokens, max_open)
    return [collate_packed([samples[i] for i in pack], max_tokens, pad_id) for pack in packs]


def measure(processor, args: argparse.Namespace, seed: int) -> tuple[dict, list[dict]]:
    """One corpus (`seed`): its token statistics and the efficiency of every padded / packed setting."""
    pad_id = processor.tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as workdir:
        samples = tokenized_corpus(processor, args.n, seed, Path(workdir), args.image_size)
    lengths = [s["input_ids"].numel() for s in samples]
    corpus = {
        "seed": seed,
        "samples": len(samples),
        "tokens": sum(lengths),
        "tokens_per_sample": {
            "mean": round(statistics.mean(lengths), 1),
            "min": min(lengths),
            "max": max(lengths),
        },
        "tiles_per_sample_mean": round(statistics.mean(s["num_tiles"] for s in samples), 2),
        "image_tokens_per_tile": processor.image_tokens_per_tile,
    }
    rows = []
    for batch_size in args.batch_size:
        batches = padded_batches(samples, batch_size, pad_id)
        rows.append(
            {
                "seed": seed,
                "mode": "padded",
                "setting": f"batch {batch_size}",
                "batch_size": batch_size,
                "rows": sum(b["input_ids"].shape[0] for b in batches),
                "tokens_computed": sum(b["input_ids"].numel() for b in batches),
                "efficiency": round(packing_efficiency(batches), 4),
            }
        )
    for max_open in args.max_open:
        batches = packed_batches(samples, args.max_tokens, max_open, pad_id)
        rows.append(
            {
                "seed": seed,
                "mode": "packed",
                "setting": f"{args.max_tokens} tokens, {max_open} open",
                "max_tokens": args.max_tokens,
                "max_open": max_open,
                "rows": len(batches),
                "samples_per_row": round(len(samples) / len(batches), 2),
                "tokens_computed": sum(b["input_ids"].numel() for b in batches),
                "efficiency": round(packing_efficiency(batches), 4),
            }
        )
    return corpus, rows


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=1000, help="corpus records")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one corpus per seed")
    parser.add_argument("--image-size", type=int, default=224, help="synthetic image size (448: 5 tiles)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 32], help="padded baseline")
    parser.add_argument(
        "--max-open",
        type=int,
        nargs="+",
        default=sorted({1, 4, DEFAULT_MAX_OPEN}),
        help=f"packer look-ahead (training uses {DEFAULT_MAX_OPEN}: the target is judged there)",
    )
    parser.add_argument("--output", type=Path, default=default_output("bench_packing"))
    args = parse_args(parser, QUICK, argv)
    logging.basicConfig(level=logging.WARNING)
    if DEFAULT_MAX_OPEN not in args.max_open:
        parser.error(f"--max-open must include the training default {DEFAULT_MAX_OPEN}")

    processor = build_processor(load_preset(args.preset))
    corpora, rows = [], []
    for seed in args.seeds:
        tokenize_start = time.perf_counter()
        corpus, seed_rows = measure(processor, args, seed)
        corpus["tokenize_s"] = round(time.perf_counter() - tokenize_start, 1)
        corpora.append(corpus)
        rows.extend(seed_rows)
        print(
            f"seed {seed}: {corpus['samples']} samples, {corpus['tokens']} tokens, "
            + ", ".join(f"{r['setting']} {r['efficiency']:.4f}" for r in seed_rows),
            flush=True,
        )

    baseline = f"batch {args.batch_size[0]}"
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)  # in seed order
    table = Table(
        f"Non-padding share of computed tokens over {len(args.seeds)} corpora (median, min–max over seeds)",
        ["mode", "setting", "efficiency", "rows", "tokens computed", f"ratio to padded {baseline}"],
    )
    for setting, seed_rows in by_setting.items():
        table.add(
            seed_rows[0]["mode"],
            setting,
            Spread.of([r["efficiency"] for r in seed_rows]).text(4),
            Spread.of([r["rows"] for r in seed_rows]).text(0),
            Spread.of([r["tokens_computed"] for r in seed_rows]).text(0),
            Spread.of(
                ratios([r["efficiency"] for r in seed_rows], [r["efficiency"] for r in by_setting[baseline]])
            ).text(2, unit="x"),
        )
    default_setting = f"{args.max_tokens} tokens, {DEFAULT_MAX_OPEN} open"
    packed_rows = round(Spread.of([r["rows"] for r in by_setting[default_setting]]).median)
    target = Target(
        f"packing efficiency at {args.max_tokens} tokens, {DEFAULT_MAX_OPEN} open packs (training's)",
        ">=",
        TARGET,
        [r["efficiency"] for r in by_setting[default_setting]],
        digits=4,
    )
    lengths = Table(
        "Corpora",
        ["seed", "samples", "tokens", "tokens/sample (mean, min–max)", "tiles/sample", "tokenize s"],
    )
    for c in corpora:
        t = c["tokens_per_sample"]
        lengths.add(
            c["seed"],
            c["samples"],
            c["tokens"],
            f"{t['mean']} ({t['min']}–{t['max']})",
            c["tiles_per_sample_mean"],
            c["tokenize_s"],
        )
    print(f"\n{table.title}\n" + " | ".join(table.columns))
    for row in table.rows:
        print(" | ".join(row))
    print(
        f"{target.name}: {target.to_dict()['measured_text']} (target {target.threshold_text()}): "
        f"{'met' if target.met else 'NOT met'}"
    )
    report = Report(
        title="packing: packed rows vs padding each batch to its longest",
        description=(
            f"Synthetic instruct corpora of {args.n} records (seeds {args.seeds}), {args.image_size} px "
            f"images, tokenized by the {args.preset} processor in corpus order. Padded batches hold "
            f"{args.batch_size} samples; packed rows hold {args.max_tokens} tokens (`pack_sequences`, "
            "streaming first fit). Efficiency is deterministic for a corpus: the spread is over corpora."
        ),
        command=command_line("bench_packing.py", argv),
        quick=args.quick,
        duration_s=time.perf_counter() - started,
        tables=[table, lengths],
        targets=[target],
        notes=[
            f"At {args.max_tokens} tokens a corpus fills {packed_rows} packed rows (median); its last row "
            f"is partly empty, which alone can cost up to {1 / packed_rows:.1%} of the efficiency."
        ],
    )
    result = {
        "benchmark": "packing",
        "preset": args.preset,
        "corpus": {"kind": "synthetic instruct", "seeds": args.seeds, "image_size": args.image_size},
        "corpora": corpora,
        "target": {"packed_efficiency_at_max_tokens": TARGET, "max_tokens": args.max_tokens},
        "met": target.met,
        "rows": rows,
    }
    save(args.output, result, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
