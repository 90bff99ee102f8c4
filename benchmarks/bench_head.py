"""A training step with the vocabulary head only at learnt positions vs at every position.

Training samples learn a few answer tokens per pack of hundreds, but a causal LM computes its 49k-word
head (and the log-softmax over it) at every position. `model.modeling.language_model_output` asks the
LLM for logits only where a label is learnt; the baseline is what it did before: logits everywhere, then
the LLM's own loss function. Both sides run the same model, the same packed batches (the synthetic
instruct corpus through the demo's 112 px tiles, packs of `--max-tokens`, `--micro-batch` packs per step)
and forward + backward with the LLM frozen and the embedding module training, as in the demo's stages.

The sides alternate (every position, learnt only, ...) `--rounds` times; each run is `--steps` steps
after one warm-up step; the speed-up is taken per round and reported with its spread. Each round also
checks that both sides give the same loss.

    python benchmarks/bench_head.py [--steps 4] [--rounds 3] [--max-tokens 256] [--micro-batch 4]

Prints a table and writes results/bench_head.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_packing import tokenized_corpus  # noqa: E402
from benchmarks.results import (  # noqa: E402
    Report,
    Spread,
    Table,
    alternate,
    command_line,
    default_output,
    parse_args,
    ratios,
    save,
)
from model import build_model, build_processor  # noqa: E402
from model.config_files import find_preset
from model.presets import config_from_spec, parse_model_spec  # noqa: E402
from pipelines.packing import collate_packed, pack_sequences  # noqa: E402

PRESET = "smollm2-135m"
QUICK = {"steps": 2, "rounds": 2, "n": 48}


def demo_config(tile_size: int):
    """The smollm2 preset with the demo's tile size (16 image tokens per 112 px tile)."""
    document = yaml.safe_load(find_preset(PRESET).read_text())
    document["model"]["image"]["tile_size"] = tile_size
    return config_from_spec(parse_model_spec(document["model"], PRESET))


def packed_batches(processor, n: int, max_tokens: int, micro_batch: int, tile_size: int) -> list[dict]:
    """The synthetic instruct corpus, tokenized with pixels, packed into rows of `max_tokens`."""
    with tempfile.TemporaryDirectory() as workdir:
        samples = tokenized_corpus(processor, n, 0, Path(workdir), tile_size, pixels=True)
    packs = pack_sequences([s["input_ids"].numel() for s in samples], max_tokens)
    pad = processor.tokenizer.pad_token_id
    batches = []
    for first in range(0, len(packs) - micro_batch + 1, micro_batch):
        chosen = packs[first : first + micro_batch]
        members = [samples[i] for pack in chosen for i in pack]
        rows, start = [], 0
        for pack in chosen:  # indices into `members`
            rows.append(list(range(start, start + len(pack))))
            start += len(pack)
        batches.append(collate_packed(members, max_tokens, pad, packs=rows))
    return batches


def step_loss(model, batch: dict, learnt_only: bool) -> torch.Tensor:
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "position_ids") if k in batch
    }
    if learnt_only:
        return model(**inputs, labels=batch["labels"]).loss
    logits = model(**inputs).logits  # every position, as before
    vocab = model.config.text_config.vocab_size
    return model.language_model.loss_function(logits=logits, labels=batch["labels"], vocab_size=vocab)


def run(model, batches: list[dict], steps: int, learnt_only: bool) -> dict:
    """One warm-up step, then `steps` timed forward + backward steps; seconds, tokens and the losses."""
    step_loss(model, batches[0], learnt_only).backward()
    model.zero_grad(set_to_none=True)
    losses, tokens = [], 0
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        loss = step_loss(model, batch, learnt_only)
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["num_tokens"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "losses": losses}


def _progress(index: int, side: str, out: dict) -> None:
    print(
        f"round {index + 1} {side:<15} {out['tokens_per_s']:8.1f} tok/s  {out['seconds']:.1f} s", flush=True
    )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--n", type=int, default=96, help="corpus samples")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="packs per step")
    parser.add_argument("--tile-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--output", type=Path, default=default_output("bench_head"))
    args = parse_args(parser, QUICK, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = demo_config(args.tile_size)
    processor = build_processor(config)
    model = build_model(config).train()
    model.language_model.requires_grad_(False)  # the demo's stages train the embedding module only
    batches = packed_batches(processor, args.n, args.max_tokens, args.micro_batch, args.tile_size)
    learnt = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    positions = sum(b["labels"].numel() for b in batches)

    runs = alternate(
        {
            "every position": partial(run, model, batches, args.steps, False),
            "learnt only": partial(run, model, batches, args.steps, True),
        },
        args.rounds,
        on_result=_progress,
    )
    for every, only in zip(runs["every position"], runs["learnt only"], strict=True):
        torch.testing.assert_close(
            torch.tensor(only["losses"]), torch.tensor(every["losses"]), atol=1e-4, rtol=1e-4
        )
    rates = {side: [r["tokens_per_s"] for r in results] for side, results in runs.items()}
    speedups = ratios(rates["learnt only"], rates["every position"])

    table = Table(
        f"Forward + backward, {PRESET} at {args.tile_size} px tiles, fp32, {args.threads} threads, "
        f"{args.micro_batch} packs of {args.max_tokens} tokens per step, LLM frozen "
        f"(median, min–max over {args.rounds} alternating rounds of {args.steps} steps)",
        ["head", "tokens/s", "speed-up"],
    )
    table.add("every position", Spread.of(rates["every position"]).text(1), "1.00x")
    table.add(
        "learnt positions only",
        Spread.of(rates["learnt only"]).text(1),
        Spread.of(speedups).text(2, unit="x"),
    )
    print(f"\n{table.title}\n" + " | ".join(table.columns))
    for line in table.rows:
        print(" | ".join(line))
    print(f"learnt positions: {learnt} of {positions} ({learnt / positions:.1%})")
    report = Report(
        title="head: the vocabulary head at learnt positions only vs at every position",
        description=(
            "A training step (forward + backward, LLM frozen) on packed synthetic instruct samples; the "
            "baseline computes logits at every position and the LLM's own loss, the other side only where "
            f"a label is learnt ({learnt} of {positions} positions, {learnt / positions:.1%}). Both give the "
            f"same loss (checked every round). Sides alternate x {args.rounds}."
        ),
        command=command_line("bench_head.py", argv),
        quick=args.quick,
        duration_s=time.perf_counter() - started,
        tables=[table],
    )
    result = {
        "benchmark": "head",
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "rounds": args.rounds,
        "steps": args.steps,
        "learnt_fraction": round(learnt / positions, 4),
        "tokens_per_s": {side: [round(v, 2) for v in values] for side, values in rates.items()},
        "speedups": [round(v, 4) for v in speedups],
        "speedup": Spread.of(speedups).to_dict(),
    }
    save(args.output, result, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
