"""Packing efficiency (non-padding tokens / all tokens): packed rows vs padding each batch to its longest.

The corpus is the synthetic instruct corpus (`pipelines.synthetic.generate("instruct", ...)`), tokenized
by the processor of the `smollm2-135m` preset (224 px tiles, 64 image tokens per tile), in corpus order.
Padded batches hold `--batch-size` samples; packed rows hold `--max-tokens` tokens, filled by
`pack_sequences` (streaming first fit with `--max-open` open packs), collated by `collate_packed`.

    python benchmarks/bench_packing.py [--n 1000] [--max-tokens 2048] [--max-open 1 4 16]

Prints a table and writes results/bench_packing.json. Target: >= 0.95 with packing at 2048 tokens.
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

from benchmarks.results import default_output, save  # noqa: E402
from model import build_processor, load_preset  # noqa: E402
from pipelines.packing import collate_packed, collate_padded, pack_sequences, packing_efficiency  # noqa: E402
from pipelines.synthetic import generate  # noqa: E402

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
TARGET = 0.95


def tokenized_corpus(processor, n: int, seed: int, workdir: Path, image_size: int = 224) -> list[dict]:
    """The instruct corpus as samples ({input_ids, labels, num_tiles}); pixels are not kept."""
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
        samples.append(
            {"input_ids": out["input_ids"][0], "labels": out["labels"][0], "num_tiles": sum(out["num_tiles"])}
        )
    return samples


def padded_batches(samples: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    return [collate_padded(samples[i : i + batch_size], pad_id) for i in range(0, len(samples), batch_size)]


def packed_batches(samples: list[dict], max_tokens: int, max_open: int, pad_id: int) -> list[dict]:
    """Every pack as a one-row batch (rows per batch do not change the padding)."""
    packs = pack_sequences([s["input_ids"].numel() for s in samples], max_tokens, max_open)
    return [collate_packed([samples[i] for i in pack], max_tokens, pad_id) for pack in packs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=1000, help="corpus records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="synthetic image size (448: 5 tiles)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 32], help="padded baseline")
    parser.add_argument("--max-open", type=int, nargs="+", default=[1, 4, 16], help="packer look-ahead")
    parser.add_argument("--output", type=Path, default=default_output("bench_packing"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    processor = build_processor(load_preset(args.preset))
    pad_id = processor.tokenizer.pad_token_id
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        samples = tokenized_corpus(processor, args.n, args.seed, Path(workdir), args.image_size)
    tokenize_s = time.perf_counter() - started
    lengths = [s["input_ids"].numel() for s in samples]
    corpus = {
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
                "mode": "padded",
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
                "mode": "packed",
                "max_tokens": args.max_tokens,
                "max_open": max_open,
                "rows": len(batches),
                "samples_per_row": round(len(samples) / len(batches), 2),
                "tokens_computed": sum(b["input_ids"].numel() for b in batches),
                "efficiency": round(packing_efficiency(batches), 4),
            }
        )

    best_packed = max(r["efficiency"] for r in rows if r["mode"] == "packed")
    result = {
        "benchmark": "packing",
        "preset": args.preset,
        "corpus": {"kind": "synthetic instruct", "seed": args.seed, "image_size": args.image_size, **corpus},
        "target": {"packed_efficiency_at_max_tokens": TARGET, "max_tokens": args.max_tokens},
        "met": best_packed >= TARGET,
        "rows": rows,
        "tokenize_s": round(tokenize_s, 1),
    }
    print(f"corpus: {corpus['samples']} samples, {corpus['tokens']} tokens")
    print(f"tokens/sample: {corpus['tokens_per_sample']}, tiles/sample: {corpus['tiles_per_sample_mean']}")
    print(f"{'mode':<8} {'setting':<22} {'rows':>6} {'tokens computed':>16} {'efficiency':>11}")
    for r in rows:
        setting = (
            f"batch {r['batch_size']}"
            if r["mode"] == "padded"
            else f"{r['max_tokens']} tok, {r['max_open']} open"
        )
        print(
            f"{r['mode']:<8} {setting:<22} {r['rows']:>6} {r['tokens_computed']:>16} {r['efficiency']:>11.4f}"
        )
    print(f"target packed >= {TARGET} at {args.max_tokens} tokens: {'met' if result['met'] else 'NOT met'}")
    save(args.output, result)
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
