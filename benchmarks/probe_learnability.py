"""Can a model learn to see at all, and how much data does the demo's task take? A bare PyTorch loop (no
Ray, no DeepSpeed) that trains only the image path with the LLM frozen, then asks held-out questions.

    .venv/bin/python benchmarks/probe_learnability.py --model compositional --task big-square --steps 100
    .venv/bin/python benchmarks/probe_learnability.py --model hovle --task scenes --steps 400 --lr 5e-4

Models (smollm2-135m presets at 112 px tiles, 16 image tokens, as the demo trains them):
- `hovle`: the embedding module trains (identity init, no stage 1);
- `compositional`: the MLP projector trains over the frozen ImageNet MobileNetV2 (LLaVA's stage 1).
Tasks:
- `big-square`: one 40-65 px square in one of the 7 palette colours, "What colour is the square?";
- `scenes`: the demo's own synthetic instruct scenes (1-5 shapes of ~30 px), `--skills` questions
  (default colour), evaluated on 40 new images per skill in the training phrasings and in held-out ones.
Batch 8, AdamW (0.9, 0.95), linear warmup over 10 steps then cosine to 0.1, bf16 autocast, grad clip 1.
Prints the loss every 20 steps and the accuracies; appends one JSON line to results/probe_learnability.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine  # noqa: E402
from jobs.evaluate import evaluate_vqa  # noqa: E402
from jobs.models import generate_answers  # noqa: E402
from jobs.scoring import answers_match  # noqa: E402
from model import build_model, build_processor  # noqa: E402
from model.config_files import find_preset
from model.presets import config_from_spec, parse_model_spec  # noqa: E402
from pipelines.corpora.scenes import PALETTE  # noqa: E402
from pipelines.corpora.synthetic import generate  # noqa: E402
from pipelines.validate import parse_conversation  # noqa: E402

PRESETS = {"hovle": "smollm2-135m", "compositional": "smollm2-135m-compositional"}
TRAINABLE = {"hovle": "embedding.", "compositional": "projector."}
SQUARE_QUESTION = "What colour is the square?"
BATCH, TILE, HELD_OUT = 8, 112, 40


def big_square(rng: random.Random) -> tuple[Image.Image, str]:
    colour = rng.choice(list(PALETTE))
    image = Image.new("RGB", (TILE, TILE), (240, 240, 240))
    x, y, side = rng.randint(5, 40), rng.randint(5, 40), rng.randint(40, 65)
    ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=PALETTE[colour])
    return image, colour


def square_chat(image: Image.Image, answer: str | None) -> tuple[list[dict[str, str]], list[Image.Image]]:
    messages = [{"role": "user", "content": f"<image>\n{SQUARE_QUESTION}"}]
    return messages + ([{"role": "assistant", "content": answer}] if answer else []), [image]


def scene_chats(jsonl: Path) -> list[tuple[list[dict[str, str]], list[Image.Image]]]:
    chats = []
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        refs = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images = [Image.open(jsonl.parent / ref).convert("RGB") for ref in refs]
        chats.append((parse_conversation(record["conversations"], len(images)), images))
    return chats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="compositional")
    parser.add_argument("--task", choices=("big-square", "scenes"), default="scenes")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skills", default="colour", help="scenes: comma-separated instruct skills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/probe_learnability.jsonl"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    document = yaml.safe_load(find_preset(PRESETS[args.model]).read_text())
    document["model"]["image"]["tile_size"] = TILE
    config = config_from_spec(parse_model_spec(document["model"]))
    model, processor = build_model(config), build_processor(config)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(TRAINABLE[args.model]))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    skills = tuple(args.skills.split(","))
    with tempfile.TemporaryDirectory(prefix="probe-learnability-") as scratch:
        if args.task == "scenes":
            train = scene_chats(
                generate("instruct", 800, args.seed, Path(scratch) / "train", TILE, skills=skills)
            )
            held = {
                phrasing: generate(
                    "instruct",
                    HELD_OUT * len(skills),
                    args.seed + 1000,
                    Path(scratch) / phrasing,
                    TILE,
                    phrasing=phrasing,
                    skills=skills,
                )  # fmt: skip
                for phrasing in ("train", "heldout")
            }
        model.train()
        started, losses = time.perf_counter(), []
        for step in range(args.steps):
            if args.task == "scenes":
                chats = rng.sample(train, BATCH)
            else:
                chats = [square_chat(*big_square(rng)) for _ in range(BATCH)]
            batch = processor.collate([processor(messages, images=images) for messages, images in chats])
            warmup, progress = min(1.0, (step + 1) / 10), step / args.steps
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], pixel_values=batch["pixel_values"],
                ).loss  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if step % 20 == 0 or step == args.steps - 1:
                print(
                    f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True
                )
        train_s = time.perf_counter() - started
        model.eval()
        accuracy, answers = {}, {}
        if args.task == "scenes":
            for phrasing, jsonl in held.items():
                report = evaluate_vqa(model, processor, str(jsonl), max_new_tokens=8)
                accuracy[phrasing] = report.metrics()["vqa_accuracy"]
                answers[phrasing] = Counter(r.given for r in report.results).most_common(7)
        else:
            tests = [big_square(random.Random(args.seed + 1000 + i)) for i in range(HELD_OUT)]
            given = []
            for start in range(0, HELD_OUT, BATCH):
                chats = [square_chat(image, None) for image, _ in tests[start : start + BATCH]]
                given += generate_answers(model, processor, chats, 4)
            accuracy["train"] = sum(answers_match(g, c) for g, (_, c) in zip(given, tests)) / HELD_OUT
            answers["train"] = Counter(given).most_common(7)
    asked = list(skills) if args.task == "scenes" else ["colour"]
    result = {
        "model": args.model, "task": args.task, "skills": asked,
        "steps": args.steps, "samples": args.steps * BATCH, "lr": args.lr, "seed": args.seed,
        "accuracy": {k: round(v, 3) for k, v in accuracy.items()}, "answers": answers,
        "loss_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 3), "train_s": round(train_s, 1),
        "machine": machine(),
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a", encoding="utf-8") as out:
        out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
