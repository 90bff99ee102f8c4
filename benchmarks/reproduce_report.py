"""What `benchmarks/reproduce.py` writes from its row results: the markdown table with the paper's claims
checked against the run, the JSON, and the plots (loss curves per stage, per-skill accuracy). Every figure
comes from the row results and the MLflow store; nothing is typed in."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SKILL_COLUMNS = ("colour", "shape", "count", "class")
STAGES = ("distill", "align", "instruct")
# (claim, row, against, kind): "better" holds when row beats `against` by more than two standard errors;
# "matches" holds unless row is worse than `against` by more than two standard errors
CLAIMS = (
    ("Stage 1 (distillation) helps, at equal compute", "a", "c", "better"),
    ("A monolithic HoVLE matches a compositional model on the same LLM, at equal compute",
     "a", "d", "matches"),
    ("Distilling from a compositional VLM's projected tokens (the paper's teacher) beats the direct "
     "MobileNetV2 teacher, teacher's training included", "e", "a", "better"),
    ("The paper's recipe (random init, no norm-matching or text-preservation term) does as well as the "
     "project's", "b", "a", "matches"),
    ("De-focus attention improves the embedding module", "f", "a", "better"),
)  # fmt: skip
TARGETS = {"colour": 0.9, "shape": 0.9, "count": 0.9, "class": 0.7}  # issue 11, for the best row
# A comparison between rows that learnt nothing compares noise around chance: a claim is judged only when
# one of its rows reaches the registry gate's first-champion floor (jobs.registry.GateSettings.floor).
LEARNT = 0.3


def machine() -> dict[str, Any]:
    """Cores, CPU model and the versions of what trained."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "ray", "deepspeed", "mlflow", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(), **versions}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _verdict(rows: dict[str, dict], row: str, against: str, kind: str) -> tuple[str, str] | None:
    """(verdict, the figures behind it) from held-out VQA accuracy, or None when a row is missing."""
    if row not in rows or against not in rows:
        return None
    p, q = rows[row]["vqa_accuracy"], rows[against]["vqa_accuracy"]
    n, m = rows[row].get("vqa_samples", 0) or 1, rows[against].get("vqa_samples", 0) or 1
    se = math.sqrt(p * (1 - p) / n + q * (1 - q) / m)  # of the difference of two binomial shares
    diff = p - q
    figures = f"VQA {row} {p:.3f} vs {against} {q:.3f} (difference {diff:+.3f}, 2 s.e. {2 * se:.3f})"
    if se == 0:  # both at 0 (or both at 1): nothing was learnt (or nothing is left to tell them apart)
        return "not shown at this size", figures
    if max(p, q) < LEARNT:
        return "not shown at this size", f"{figures}; neither row learnt (VQA under {LEARNT})"
    if kind == "better":
        verdict = "holds" if diff > 2 * se else ("reversed" if diff < -2 * se else "not shown at this size")
    else:
        verdict = "does not hold" if diff < -2 * se else "holds"
    return verdict, figures


def claims(rows: dict[str, dict]) -> list[str]:
    """One line per claim of the paper this run can speak to, with its verdict and figures."""
    lines = []
    for claim, row, against, kind in CLAIMS:
        found = _verdict(rows, row, against, kind)
        if found:
            lines.append(f"- {claim}: **{found[0]}** — {found[1]}")
    if "a" in rows and rows["a"].get("text_retained") is not None:
        kept = rows["a"]["text_retained"]
        if math.isnan(kept):
            verdict = "not measured (the base answers none of the questions right)"
        else:
            verdict = "holds" if kept >= 0.9 else "does not hold"
        right = round(rows["a"].get("base_text_accuracy", 0) * rows["a"].get("text_questions", 0))
        lines.append(
            f"- A frozen LLM keeps its language (of the {right} general questions the base answers right, "
            f"at least 9 in 10 still right): **{verdict}** — text_retained {_fmt(kept)}"
        )
    evaluated = [r for r in rows.values() if "vqa_accuracy" in r]
    if evaluated:
        best = max(evaluated, key=lambda r: r["vqa_accuracy"])
        met = [
            f"{skill} {_fmt(best.get(f'vqa_accuracy/{skill}'), 2)} (target {goal})"
            + (" met" if (best.get(f"vqa_accuracy/{skill}") or 0) >= goal else " not met")
            for skill, goal in TARGETS.items()
        ]
        lines.append(f"- Issue 11's targets for the best row ({best['row']}): " + ", ".join(met))
    return lines


def markdown(results: list[dict], meta: dict[str, Any], info: dict[str, Any], date: str) -> str:
    evaluated = [r for r in results if "vqa_accuracy" in r]
    head = ["row", "what", "VQA", *SKILL_COLUMNS, "text kept", "text acc", "answer ppl ratio"]
    head += ["CPU-s", "tokens", "model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in evaluated:
        cpu = _fmt(r["cpu_seconds_spent"], 0) + (f" (with {r['built_on']})" if r.get("built_on") else "")
        cells = [r["row"], r["title"], _fmt(r["vqa_accuracy"])]
        cells += [_fmt(r.get(f"vqa_accuracy/{skill}"), 2) for skill in SKILL_COLUMNS]
        cells += [
            _fmt(r.get("text_retained")),
            _fmt(r.get("text_accuracy")),
            _fmt(r.get("answer_ppl_ratio"), 2),
        ]
        cells += [cpu, str(r["tokens"]), f"`{r['model_uri']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    stage_head = ["row", "stage", "CPU-s budget", "CPU-s spent", "steps", "stopped by", "tokens", "wall s"]
    stage_lines = ["| " + " | ".join(stage_head) + " |", "|" + "---|" * len(stage_head)]
    for r in results:
        for stage, s in r["stages"].items():
            cells = [r["row"], stage, _fmt(s.get("cpu_seconds_budget"), 0), _fmt(s["cpu_seconds"], 0)]
            cells += [str(s["steps"]), str(s.get("stopped_by")), str(s["tokens"]), _fmt(s.get("wall_s"), 0)]
            stage_lines.append("| " + " | ".join(cells) + " |")
    stage_runs = sum(len(r["stages"]) for r in results)
    stage_wall = sum(s.get("wall_s", 0.0) for r in results for s in r["stages"].values())
    stage_cpu = sum(s["cpu_seconds"] for r in results for s in r["stages"].values())
    evaluations = [r["evaluate_s"] for r in evaluated if "evaluate_s" in r]
    total = meta["corpora_prepare_s"] + sum(r.get("wall_s", 0.0) for r in results)
    timing = [
        f"- corpora + prepare: {meta['corpora_prepare_s']:.0f} s",
        f"- {stage_runs} stage runs: {stage_wall:.0f} s of wall for {stage_cpu:.0f} training CPU-s "
        "(the rest of a stage's wall: Ray Train start-up, model load, DeepSpeed set-up, checkpoints, export)",
    ]
    if evaluations:
        timing.append(
            f"- {len(evaluations)} evaluations: {sum(evaluations):.0f} s "
            f"({sum(evaluations) / len(evaluations):.0f} s each)"
        )
    timing.append(f"- total (this workdir's runs, summed): {total / 60:.1f} min")
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "ray", "deepspeed", "mlflow", "transformers"))
    return "\n".join(
        [
            "# `make reproduce`",
            "",
            f"Generated by `benchmarks/reproduce.py` on {date}: preset `{meta['preset']}`, "
            f"{meta['cpu_seconds']:.0f} training CPU-seconds per row (split over a row's stages: "
            "distill 0.15, align 0.55, instruct 0.30; without distill align 0.70, instruct 0.30), "
            f"{meta['heldout_questions']} held-out questions ({meta['heldout']} per skill on new images in "
            "phrasings training never uses, and Fashion-MNIST test photos), seed "
            f"{meta['seed']}. Machine: {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
            f"{versions}.",
            "",
            *lines,
            "",
            "Text columns: the general-language check against the base LLM (jobs/language.py). CPU-s: "
            "training CPU-seconds the stage exports record (a row built on another counts both). Models: "
            "registered without the gate in the reproduction's MLflow store.",
            "",
            "## What holds at this scale",
            "",
            "Verdicts compare held-out VQA accuracy: a difference counts when it exceeds two standard errors "
            "of the difference (binomial, over each row's questions); smaller ones are not shown here.",
            "",
            *claims({r["row"]: r for r in evaluated}),
            "",
            "![loss curves](reproduce_loss.png)",
            "",
            "![accuracy per skill](reproduce_accuracy.png)",
            "",
            "## Stages",
            "",
            *stage_lines,
            "",
            "## Time",
            "",
            *timing,
            "",
        ]
    )


def plot_losses(client, results: list[dict], path: Path) -> None:
    """Training loss against CPU-seconds spent, one panel per stage, one line per row (MLflow history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(STAGES), figsize=(5 * len(STAGES), 4), squeeze=False)
    colours = {r["row"]: f"C{i}" for i, r in enumerate(results)}  # a row keeps its colour in every panel
    for axis, stage in zip(axes[0], STAGES):
        for r in results:
            run_id = r["stages"].get(stage, {}).get("run_id")
            if not run_id:
                continue
            loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
            spent = {m.step: m.value for m in client.get_metric_history(run_id, "cpu_seconds")}
            steps = sorted(loss)
            x = [spent.get(s, s) for s in steps]
            axis.plot(x, [loss[s] for s in steps], marker=".", label=r["row"], color=colours[r["row"]])
        axis.set_title(stage)
        axis.set_xlabel("training CPU-seconds")
        axis.set_ylabel("loss")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_accuracy(results: list[dict], path: Path) -> None:
    """Held-out accuracy per skill (and overall), grouped bars, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*SKILL_COLUMNS, "overall"]
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        values = [r.get(f"vqa_accuracy/{skill}") or 0.0 for skill in SKILL_COLUMNS] + [r["vqa_accuracy"]]
        axis.bar(
            [g + i * width for g in range(len(groups))], values, width, label=f"{r['row']}: {r['title']}"
        )
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    axis.set_ylim(0, 1)
    axis.set_ylabel("held-out accuracy")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(
    results: list[dict], meta: dict[str, Any], docs_dir: Path, results_file: Path, client
) -> list[Path]:
    """The table, the plots and the JSON; returns their paths."""
    info = machine()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    evaluated = [r for r in results if "vqa_accuracy" in r]
    docs_dir.mkdir(parents=True, exist_ok=True)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    paths = [docs_dir / "reproduce.md", docs_dir / "reproduce_loss.png", docs_dir / "reproduce_accuracy.png"]
    paths[0].write_text(markdown(results, meta, info, date), encoding="utf-8")
    plot_losses(client, results, paths[1])
    plot_accuracy(evaluated, paths[2])
    document = {"date": date, "settings": meta, "machine": info, "rows": results}
    results_file.write_text(json.dumps(document, indent=2))
    return [*paths, results_file]
