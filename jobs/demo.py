"""`make demo` / `python -m jobs.demo`: what the platform can do today, on this machine, offline.

Today that is the model layer (the HoVLE network and its presets, the processor, generation with a KV
cache, the three training stages as data) and the data pipeline (a synthetic corpus with ground truth,
prepared into Parquet shards by Ray Data, incrementally). Ray Train + DeepSpeed training and the MLflow
registry are later issues; the demo says so rather than pretending.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from jobs.logging_setup import setup_logging
from model import STAGES, apply_stage, build_model, build_processor, load_preset, stage_loss

logger = logging.getLogger("jobs.demo")

BANNER = """\
HoVLE platform demo: the model layer and the data pipeline
  built:     HoVLE model (holistic embedding module + LLM), presets, processor (dynamic tiling, chat
             template), cached generation, the three stages (distill / align / instruct) as data;
             synthetic corpora and `hovle prepare` (Ray Data: raw corpora -> Parquet shards + manifest)
  not yet:   Ray Train + DeepSpeed training, MLflow tracking and registry (later issues); nothing
             below is trained, so image answers are NOT expected to be right
"""


def demo_image(size: int) -> Image.Image:
    """A red square (top left) and a blue circle (bottom right) on light grey."""
    image = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size // 10, size // 10, size // 2, size // 2], fill=(220, 30, 30))
    draw.ellipse([size // 2, size // 2, size - size // 10, size - size // 10], fill=(30, 60, 220))
    return image


def show_presets() -> None:
    print("\n1. Presets, counted on the meta device (nothing allocated):")
    print(f"   {'preset':<14} {'total':>10} {'embedding':>10} {'LLM':>10} {'img tok/tile':>12}")
    for name in ("hovle-2.6b", "hovle-hd", "smollm2-135m", "tiny"):
        config = load_preset(name)
        model = build_model(config, device="meta")
        total = sum(p.numel() for p in model.parameters())
        embedding = sum(p.numel() for p in model.embedding.parameters())
        print(
            f"   {name:<14} {total / 1e6:>9.1f}M {embedding / 1e6:>9.1f}M {(total - embedding) / 1e6:>9.1f}M "
            f"{config.image_tokens_per_tile:>12}"
        )


def ask(
    model,
    processor,
    question: str,
    image: Image.Image | None = None,
    max_new_tokens: int = 32,
    use_cache: bool = True,
) -> tuple[str, float]:
    content = f"<image>\n{question}" if image is not None else question
    inputs = processor(
        [{"role": "user", "content": content}], images=[image] if image else None, add_generation_prompt=True
    )
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
        )
    seconds = time.perf_counter() - start
    return processor.decode(out[0, inputs["input_ids"].shape[1] :]).strip(), seconds


def show_model(preset: str) -> None:
    config = load_preset(preset)
    print(
        f"\n2. The {preset} preset, built offline (LLM: {config.llm_name_or_path or 'random weights'}, "
        f"embedding init: {config.embedding_init})"
    )
    start = time.perf_counter()
    model = build_model(config).eval()
    processor = build_processor(config)
    print(f"   built in {time.perf_counter() - start:.0f} s")

    answer, _ = ask(model, processor, "What is the capital of France?")
    print("   text-only, through the embedding module (identity init passes text through unchanged):")
    print(f"     Q: What is the capital of France?\n     A: {answer}")

    image = demo_image(config.tile_size)
    answer, cached_s = ask(model, processor, "What colour is the square?", image)
    print("   about an image (a red square and a blue circle) - the vision path is UNTRAINED:")
    print(f"     Q: <image> What colour is the square?\n     A: {answer}")
    _, recomputed_s = ask(model, processor, "What colour is the square?", image, use_cache=False)
    print(
        f"   the same 32-token answer with the KV cache: {cached_s:.2f} s; re-encoding the whole sequence "
        f"every step (the released HoVLE code's way): {recomputed_s:.2f} s"
    )


def show_stages(steps: int) -> None:
    from model.teachers import build_teacher

    print(f"\n3. The three stages on the tiny preset, {steps} AdamW steps each on one fixed synthetic batch:")
    torch.manual_seed(0)
    config = load_preset("tiny")
    model = build_model(config)
    processor = build_processor(config)
    image = demo_image(config.tile_size * 2)
    chat = processor.collate(
        [
            processor(
                [
                    {"role": "user", "content": "<image>\nWhat colour is the square?"},
                    {"role": "assistant", "content": "red"},
                ],
                images=[image],
            )
        ]
    )
    unpaired = processor.collate(
        [processor([{"role": "user", "content": "<image>\nzebra quartz lamp"}], images=[image])]
    )
    teacher = build_teacher("mobilenet_v2", student_hidden=config.text_config.hidden_size, input_size=112)
    for name, spec in STAGES.items():
        params = apply_stage(model, spec)
        if spec.needs_teacher:
            params += list(teacher.trainable_parameters())
        optimizer = torch.optim.AdamW(params, lr=3e-3)
        batch = unpaired if spec.needs_teacher else chat
        first = last = None
        for _ in range(steps):
            result = stage_loss(model, batch, spec, teacher if spec.needs_teacher else None)
            optimizer.zero_grad()
            result.loss.backward()
            optimizer.step()
            first = first or result.parts
            last = result.parts
        trainable = sum(p.numel() for p in params)
        detail = ", ".join(f"{k} {first[k]:.3f}->{last[k]:.3f}" for k in first if k != "loss")
        print(
            f"   {name:<9} trains {trainable:>9,} params ({', '.join(spec.trainable)}): "
            f"loss {first['loss']:.3f} -> {last['loss']:.3f}  ({detail})"
        )


def show_data(preset: str, samples: int, workdir: Path) -> None:
    """A synthetic instruct corpus with two corrupt records -> `prepare` twice (the second finds no work)."""
    from pipelines.prepare import prepare
    from pipelines.settings import PrepareSettings
    from pipelines.synthetic import generate

    print(
        f"\n4. Data: {samples} synthetic instruct samples -> Ray Data prepare -> Parquet shards ({preset}):"
    )
    jsonl = generate("instruct", samples, seed=0, output_dir=workdir / "corpus", image_size=224)
    (jsonl.parent / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with jsonl.open("a", encoding="utf-8") as out:  # one corrupt image and one escaping the dataset root
        for n, ref in enumerate(("images/broken.png", "../../etc/passwd")):
            turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "?"}]
            out.write(json.dumps({"id": f"bad-{n}", "image": ref, "conversations": turns}) + "\n")
    output = str(workdir / "prepared")
    for attempt in ("first run", "rerun"):
        start = time.perf_counter()
        report = prepare(preset, "instruct", [str(jsonl)], output, PrepareSettings())
        print(
            f"   {attempt:<9} read {report['read']:>3}  written {report['written']:>3}  rejected "
            f"{report['rejected']} {report['rejected_by_reason']}  ({time.perf_counter() - start:.0f} s)"
        )
    print(f"   shards, rejects table and manifest.json under {output} (--workdir keeps them)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hovle demo", description=__doc__)
    parser.add_argument(
        "--preset", default="smollm2-135m", help="model preset for part 2 (default: smollm2-135m)"
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per stage in part 3")
    parser.add_argument("--samples", type=int, default=64, help="synthetic samples prepared in part 4")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where part 4 writes its corpus (default: a temp folder)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    print(BANNER)
    show_presets()
    show_model(args.preset)
    show_stages(args.steps)
    with tempfile.TemporaryDirectory(prefix="hovle-demo-") as scratch:
        show_data(args.preset, args.samples, args.workdir or Path(scratch))
    print("\nNext: `make test` runs the suite; `hovle inspect configs/hovle-2.6b.yaml --gpus 8` sizes a run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
