"""`make demo` / `python -m jobs.demo`: the whole story on this machine, offline, on embedded defaults.

    synthetic corpora -> prepare (Ray Data) -> distill, align, instruct (Ray Train + DeepSpeed)
        -> evaluate on a held-out set -> register in MLflow -> the gate crowns a champion
        -> models:/hovle@champion answers a question about an image

Everything lands in `--workdir` (default outputs/demo): raw corpora, prepared shards, checkpoints and
exports under runs/, and the MLflow store (mlflow.db + mlruns/), which `mlflow ui` opens afterwards.
Preset smollm2-135m (the real SmolLM2-135M-Instruct): ~18 min on 2 bf16-native cores, fp32 slower elsewhere;
`--preset tiny` runs the same story in about a minute with a random model (its answers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

from jobs.logging_setup import setup_logging
from jobs.strategy import cpu_bf16_is_native
from model import build_model, load_preset
from model.config_files import find_preset
from model.stages import STAGE_NAMES
from pipelines.general_text import write_general_chat

logger = logging.getLogger("jobs.demo")

# Per preset: samples per stage, held-out samples, image size, general text-only conversations mixed into
# align and instruct (what keeps the LLM's language), and per stage its train settings (StageSettings).
PLANS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        # 112 px tiles (16 image tokens) and packs of 256 tokens: more samples per CPU-second than 224 px
        # tiles; align learns from questions about images as well as captions; the LLM stays frozen (it kept
        # the most language of the plans measured, docs/results/) while the embedding module learns; text
        # preservation 10 kept 38 of 47 general answers where 1.0 kept 31 (docs/results/demo_sweep.md). About
        # 18 min on 2 bf16-native cores (fp32 elsewhere is slower); half the steps kept almost no language.
        # Align keeps stage 1's image term: without it image tokens collapsed (docs/results/findings.md, 5).
        "samples": 320, "heldout": 40, "image_size": 112, "tile_size": 112, "max_tokens": 256,
        "general_text": None, "skills": ("colour", "shape", "count"), "align_questions": 640,
        "stages": {
            "distill": {"steps": 40, "micro_batch_size": 8, "lr": 3e-4},
            "align": {"steps": 100, "micro_batch_size": 4, "lr": 5e-4, "text_preservation_weight": 10.0,
                      "image_anchor_weight": 1.0},
            "instruct": {"steps": 40, "micro_batch_size": 4, "lr": 2e-4, "llm_lr_ratio": 0,
                         "text_preservation_weight": 10.0},
        },
    },
    "tiny": {
        "samples": 24, "heldout": 8, "image_size": 56, "max_tokens": 256, "general_text": 8,
        "stages": {
            "distill": {"steps": 4, "micro_batch_size": 2, "lr": 1e-3},
            "align": {"steps": 4, "micro_batch_size": 2, "lr": 1e-3, "image_anchor_weight": 1.0},
            "instruct": {"steps": 4, "micro_batch_size": 2, "lr": 1e-3},
        },
    },
}  # fmt: skip
# Asked through models:/hovle@champion at the end, as a user would: one image question, two text-only ones.
DEMO_QUESTION = "What colour is the square?"
TEXT_QUESTIONS = ("Who wrote Romeo and Juliet?", "Name three fruits.")


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


def run_config(
    preset: str,
    plan: dict[str, Any],
    workdir: Path,
    steps: int | None,
    seed: int = 0,
    run_name: str = "demo",
    corpora: Corpora | None = None,
) -> Path:
    """The demo's run config: the preset's model, one worker (bf16 if the CPU has it natively), the plan;
    with `corpora`, evaluation on their held-out set against the preset's own untrained model."""
    document = yaml.safe_load(Path(find_preset(preset)).read_text())
    stages = {}
    for name, planned in plan["stages"].items():
        count = steps or planned["steps"]
        stages[name] = {
            **planned, "steps": count, "warmup_steps": max(1, count // 10), "max_tokens": plan["max_tokens"],
        }  # fmt: skip
        if name == "distill" or planned.get("image_anchor_weight"):
            stages[name]["teacher_input_size"] = min(224, plan.get("tile_size") or plan["image_size"])
    if plan.get("tile_size"):  # smaller tiles: fewer image tokens per sample, more samples in the budget
        document["model"]["image"]["tile_size"] = plan["tile_size"]
    document["data"] = {"max_tokens": plan["max_tokens"], "val_fraction": 0.0}
    document["train"] = {
        "run_name": run_name,
        "seed": seed,
        "storage_path": str(workdir / "runs"),
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": os.cpu_count() or 1},
        "deepspeed": {"zero_stage": 0, "precision": "bf16" if cpu_bf16_is_native() else "fp32"},
        "checkpoint": {"every_n_steps": 25, "keep_last": 1},
        "log_every_n_steps": 5 if preset != "tiny" else 2,
        "data": {"reader": "local"},
        "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "system_metrics_interval_s": 5},
        "recipe": plan.get("recipe", "project"),
        "stages": stages,
    }
    path = workdir / "demo.yaml"
    if corpora is not None:
        document["eval"] = {"data": str(corpora.heldout), "text": str(corpora.text), "base": f"preset:{path}"}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def step(title: str) -> float:
    print(f"\n{title}", flush=True)
    return time.perf_counter()


@dataclass
class Corpora:
    """The demo's raw inputs per stage, its held-out VQA set and domain text, and what they hold."""

    raw: dict[str, list[str]]
    heldout: Path
    text: Path
    real: int
    chats: int
    heldout_count: int


def make_corpora(plan: dict[str, Any], workdir: Path, count: int, seed: int = 0) -> Corpora:
    """Synthetic corpora per stage (instruct asks the plan's skills, balanced), `count // 8` Fashion-MNIST
    photos (captions and Q&A over their labels) for align and instruct when Debian's dataset-fashion-mnist
    is installed, the general text-only conversations; and a held-out set on new images (another seed, the
    test split) in phrasings training never uses, `plan["heldout"]` questions per skill."""
    from pipelines.corpora.fashion_mnist import import_fashion_mnist
    from pipelines.corpora.scenes import MissingPackageError
    from pipelines.corpora.synthetic import generate

    size = plan["image_size"]
    raw = {}
    for stage in STAGE_NAMES:
        skills = plan.get("skills") if stage == "instruct" else None
        output = workdir / "raw" / stage
        jsonl = generate(stage, count, seed=seed, output_dir=output, image_size=size, skills=skills)
        raw[stage] = [str(jsonl)] + ([str(jsonl.with_name("text.jsonl"))] if stage == "distill" else [])
    if plan.get("align_questions"):  # align on questions about images too, not only on captions
        folder = workdir / "raw" / "align-questions"
        n = plan["align_questions"]
        questions = generate("instruct", n, seed + 500, folder, image_size=size, skills=plan.get("skills"))
        raw["align"].append(str(questions))
    real = count // 8
    try:
        for stage in ("align", "instruct"):
            folder = workdir / "raw" / f"{stage}-fashion"
            raw[stage].append(str(import_fashion_mnist(folder, real, seed, "train", stage, size)))
    except MissingPackageError as err:
        print(f"   (no real images: {err})")
        real = 0
    general = write_general_chat(workdir / "raw" / "general-text", plan["general_text"])
    for stage in ("align", "instruct"):
        raw[stage].append(str(general))
    chats = sum(1 for _ in general.open(encoding="utf-8"))

    skills = plan.get("skills") or ("colour", "shape", "count")
    held, parts = workdir / "heldout", []
    parts.append(
        generate(
            "instruct", plan["heldout"] * len(skills), seed=seed + 1000, output_dir=held / "shapes",
            image_size=size, phrasing="heldout", skills=skills,
        )
    )  # fmt: skip
    if real:
        parts.append(
            import_fashion_mnist(held / "fashion", plan["heldout"], seed, "test", "instruct", size, "heldout")
        )
    heldout_count = merge_jsonl(parts, held / "data.jsonl")
    text = generate("distill", 16, seed=seed + 1000, output_dir=workdir / "heldout-text", image_size=size)
    return Corpora(raw, held / "data.jsonl", text.with_name("text.jsonl"), real, chats, heldout_count)


def merge_jsonl(parts: list[Path], output: Path) -> int:
    """Conversation JSONLs in sub-folders of `output`'s folder -> one JSONL there, image paths re-rooted;
    returns the record count."""
    lines = []
    for part in parts:
        prefix = part.parent.relative_to(output.parent).as_posix()
        for line in part.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            image = record.get("image")
            if isinstance(image, str):
                record["image"] = f"{prefix}/{image}"
            elif isinstance(image, list):
                record["image"] = [f"{prefix}/{ref}" for ref in image]
            lines.append(json.dumps(record, ensure_ascii=False))
    output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def story(
    preset: str, workdir: Path, steps: int | None, samples: int | None, seed: int = 0
) -> dict[str, Any]:
    import ray

    from jobs.cycle import prepare_cycle, run_cycle
    from jobs.predict import answer_all
    from jobs.run_config import load_run_config

    plan = PLANS.get(preset, PLANS["smollm2-135m"])
    count = samples or plan["samples"]
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # MLflow's default artifact folder (mlruns/) lands beside mlflow.db
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    timings: dict[str, float] = {}

    start = step(
        f"2. Corpora: {count} synthetic samples per stage (shapes, colours, counts, words), held out apart"
    )
    corpora = make_corpora(plan, workdir, count, seed)
    config_path = run_config(preset, plan, workdir, steps, seed, corpora=corpora)
    timings["corpora"] = time.perf_counter() - start
    if corpora.real:
        print(f"   + {corpora.real} Fashion-MNIST photos per stage for align and instruct (label Q&A)")
    print(f"   + {corpora.chats} general text-only chats (the base LLM's answers) in align and instruct")
    print(f"   held out: {corpora.heldout_count} questions on new images in phrasings training never uses")

    start = step("3. Prepare with Ray Data: validate, decode, tile, tokenize -> Parquet shards + manifest")
    # With the dashboard: it serves Ray's State API, which Ray Train's placement-group cleaner polls every
    # second (without it, a warning a second for the whole training), and a person can watch the jobs.
    context = ray.init(include_dashboard=True, configure_logging=False, log_to_driver=True)
    if context.dashboard_url:
        print(f"   Ray dashboard: http://{context.dashboard_url}")
    run = load_run_config(str(config_path))
    reports = prepare_cycle(run, corpora.raw, str(workdir / "prepared"))
    for stage, report in reports.items():
        counts = f"read {report['read']:>4}  written {report['written']:>4}  rejected {report['rejected']}"
        print(f"   {stage:<9} {counts}")
    timings["prepare"] = time.perf_counter() - start

    step(
        "4. The cycle, as `hovle retrain` runs it (jobs.cycle): train distill -> align -> instruct on Ray"
        " Train + DeepSpeed,\n   evaluate on the held-out set, register in MLflow, the promotion gate"
    )
    print(f"   precision {run.train.precision} (native bf16 matmul on this CPU: {cpu_bf16_is_native()})")
    datasets = {stage: report["output"] for stage, report in reports.items()}
    cycle = run_cycle(
        run, datasets, {}, source=str(config_path), tags={"hovle.preset": preset},
        eval_output=workdir / "evaluation",
    )  # fmt: skip
    timings.update(cycle["timings"])
    alias = "champion" if cycle["promoted"] else "challenger"
    print(f"   hovle v{cycle['version']}: {alias} ({cycle['reason']})")

    start = step(
        f"5. Ask models:/hovle@{alias} (pyfunc, as an application would): a new image, then text only"
    )
    image = workdir / "question.png"
    demo_image(plan["image_size"]).save(image)
    questions = [(DEMO_QUESTION, str(image))] + [(q, None) for q in TEXT_QUESTIONS]
    replies = dict(zip((q for q, _ in questions), answer_all(f"models:/hovle@{alias}", questions, 32)))
    print(f"   Q: <image: a red square and a blue circle> {DEMO_QUESTION}\n   A: {replies[DEMO_QUESTION]}")
    for question in TEXT_QUESTIONS:
        print(f"   Q: {question}\n   A: {replies[question]}")
    timings["predict"] = time.perf_counter() - start
    ray.shutdown()
    return {
        "mlflow_run_id": cycle["mlflow_run_id"], "scores": cycle["scores"], "version": cycle["version"],
        "alias": alias, "replies": replies, "reason": cycle["reason"],
        "timings": timings, "tracking": tracking, "workdir": workdir,
    }  # fmt: skip


def summary_table(result: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(result["tracking"])
    parent = result["mlflow_run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    print("\nSummary")
    print(f"   {'stage':<9} {'steps':>5} {'loss first -> last':>20} {'tokens/s':>9}")
    for run in sorted(children, key=lambda r: STAGE_NAMES.index(r.data.tags["hovle.stage"])):
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        speed = run.data.metrics.get("tokens_per_s", float("nan"))
        print(
            f"   {run.data.tags['hovle.stage']:<9} {history[-1].step:>5} "
            f"{history[0].value:>9.3f} -> {history[-1].value:<8.3f} {speed:>9.0f}"
        )
    scores = result["scores"]
    skills = ", ".join(
        f"{k.removeprefix('vqa_accuracy/')} {v:.2f}"
        for k, v in scores.items()
        if k.startswith("vqa_accuracy/")
    )
    print(f"   held-out VQA accuracy {scores.get('vqa_accuracy', float('nan')):.3f} ({skills})")
    base_right = round(scores.get("base_text_accuracy", 0.0) * scores.get("text_questions", 0.0))
    print(
        f"   language kept: text_retained {scores.get('text_retained', float('nan')):.3f} (of {base_right} "
        f"general questions the base LLM answers right), answer perplexity ratio "
        f"{scores.get('answer_ppl_ratio', float('nan')):.3f}"
    )
    print(f"   registered model hovle v{result['version']}, alias {result['alias']} ({result['reason']})")
    print("   time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items()))
    print(f"\nOpen the MLflow UI on it (from {result['workdir']}):")
    print(f"   mlflow ui --backend-store-uri {result['tracking']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hovle demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m", help="smollm2-135m (default) or tiny")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/demo"), help="where everything lands")
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default: planned)")
    parser.add_argument("--samples", type=int, help="samples per stage (default: planned)")
    parser.add_argument("--seed", type=int, default=0, help="corpora and training seed (held out: +1000)")
    args = parser.parse_args(argv)
    setup_logging()
    for chatty in ("transformers", "ray", "ray.data", "ray.train", "mlflow", "py.warnings"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    started = time.perf_counter()
    print(f"HoVLE platform demo on the {args.preset} preset: the whole story on this machine")
    show_presets()
    result = story(args.preset, args.workdir.resolve(), args.steps, args.samples, args.seed)
    summary_table(result)
    summary = {
        "preset": args.preset, "seed": args.seed, "plan": PLANS.get(args.preset, PLANS["smollm2-135m"]),
        "scores": result["scores"], "replies": result["replies"],
        "version": result["version"], "alias": result["alias"], "reason": result["reason"],
        "timings": result["timings"], "seconds": time.perf_counter() - started,
    }  # fmt: skip
    (result["workdir"] / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
