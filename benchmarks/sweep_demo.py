"""A small, logged sweep over what `make demo` spends its budget on: which knobs make the model learn, and
which keep its LLM's language.

    .venv/bin/python benchmarks/sweep_demo.py [--only default,no-distill,...] [--workdir outputs/sweep]

The demo's corpora are made and prepared once (Ray Data), with and without the general text-only
conversations; each variant then trains align and instruct (Ray Train + DeepSpeed) from a stage-1 export
shared by every variant with the same distill settings, and is evaluated like the demo's champion: held-out
questions on new images in phrasings training never uses, and general text-only questions against the base
LLM (jobs/language.py). MLflow: one parent run `demo-sweep`; each variant's pipeline run (its stage runs
below it) is nested under it and holds the variant's scores. The table goes to docs/results/demo_sweep.md
and results/demo_sweep.json; every figure in it comes from this run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cycle import prepare_cycle  # noqa: E402
from jobs.demo import PLANS, make_corpora, run_config  # noqa: E402
from jobs.logging_setup import setup_logging  # noqa: E402
from jobs.run_config import load_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = "smollm2-135m"
# name -> (what it tests, changes to the demo's plan). `general_text: False` trains without the general
# text-only conversations; stage entries override StageSettings fields; `distill: None` skips stage 1.
NO_PRESERVATION = {"text_preservation_weight": 0.0}


def on(base: dict[str, Any], **stages: dict[str, Any]) -> dict[str, Any]:
    """`base`'s changes with some stages' settings changed further."""
    out = copy.deepcopy(base)
    for stage, fields in stages.items():
        out.setdefault("stages", {}).setdefault(stage, {}).update(fields)
    return out


# The second plan: distill at 3e-4 and text preservation 1.0 kept the text path; 224 px tiles, packs of 512
# tokens, align on captions only, the LLM at 0.1x the instruct LR.
ANCHORED = {
    "tile_size": None, "image_size": 224, "max_tokens": 512, "align_questions": 0,
    "stages": {
        "distill": {"steps": 30, "micro_batch_size": 4, "lr": 3e-4},
        "align": {"steps": 70, "micro_batch_size": 2, "lr": 5e-4, "text_preservation_weight": 1.0},
        "instruct": {"steps": 50, "micro_batch_size": 2, "lr": 1e-4, "llm_lr_ratio": 0.1,
                     "text_preservation_weight": 1.0},
    },
}  # fmt: skip
# The first plan: the second with distill at 1e-3 and text preservation 0.1 (which wrecked the text path).
FIRST_PLAN = on(
    ANCHORED,
    distill={"lr": 1e-3},
    align={"text_preservation_weight": 0.1},
    instruct={"text_preservation_weight": 0.1},
)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "first-plan": ("224 px, distill lr 1e-3, text preservation 0.1, LLM at 0.1x instruct LR", FIRST_PLAN),
    "december": (
        "the first plan with the LLM at the full instruct LR and no general text (the December demo)",
        {**on(FIRST_PLAN, instruct={"llm_lr_ratio": 1.0}), "general_text": False},
    ),
    "anchored": ("224 px, distill lr 3e-4, text preservation 1.0, captions-only align, LLM 0.1x", ANCHORED),
    "default": ("the demo's plan (jobs/demo.py PLANS)", {}),
    "llm-0.1": ("the default with the LLM at 0.1x the instruct LR", on({}, instruct={"llm_lr_ratio": 0.1})),
    "no-general-text": ("the default without the general text-only chats", {"general_text": False}),
    "no-preservation": (
        "the default without the text-preservation term",
        on({}, align=NO_PRESERVATION, instruct=NO_PRESERVATION),
    ),
    "no-distill": ("the default without stage 1 (align starts from the identity module)", {"distill": None}),
    "captions-only": ("the default, align on captions only", {"align_questions": 0}),
    "preservation-1": (
        "the default with text preservation 1.0 in align and instruct (the plan before preservation 10)",
        on({}, align={"text_preservation_weight": 1.0}, instruct={"text_preservation_weight": 1.0}),
    ),
}


def variant_plan(changes: dict[str, Any]) -> dict[str, Any]:
    """The demo's plan with `changes`: top-level plan keys replaced, stage settings updated field by field."""
    plan = copy.deepcopy(PLANS[PRESET])
    for key, value in changes.items():
        if key not in ("stages", "general_text", "distill"):
            plan[key] = value
    for stage, fields in changes.get("stages", {}).items():
        plan["stages"][stage].update(fields)
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "sweep")
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--import-demo", type=Path, metavar="WORKDIR", help="add a finished demo run's figures as a row"
    )
    parser.add_argument("--as", dest="row_name", default="demo", help="with --import-demo: the row's name")
    parser.add_argument("--what", default="the demo's plan, run by make demo", help="with --import-demo")
    args = parser.parse_args(argv)
    if args.import_demo:
        return import_demo(args.import_demo, args.row_name, args.what)
    setup_logging()
    for chatty in ("transformers", "ray", "ray.data", "ray.train", "mlflow", "py.warnings"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    import ray
    from mlflow import MlflowClient

    from jobs.evaluate import run_evaluation
    from jobs.run_config import EvalSettings
    from jobs.train import train

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    ray.init(include_dashboard=True, configure_logging=False, log_to_driver=True)
    prepared: dict[str, tuple[Any, dict[str, str]]] = {}

    def data_for(vplan: dict[str, Any], general: bool):
        """(corpora, prepared datasets) for a plan's data settings, made once per distinct setting."""
        fields = ("samples", "heldout", "image_size", "tile_size", "max_tokens", "skills", "align_questions")
        key = json.dumps([{k: vplan.get(k) for k in fields}, general], sort_keys=True)
        if key not in prepared:
            folder = workdir / f"data-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
            corpora = make_corpora(vplan, folder, vplan["samples"], args.seed)
            if not general:
                raw = corpora.raw.items()
                corpora.raw = {s: [p for p in paths if "general-text" not in p] for s, paths in raw}
            config = run_config(PRESET, vplan, folder, None, args.seed)
            reports = prepare_cycle(load_run_config(str(config)), corpora.raw, str(folder / "prepared"))
            prepared[key] = (corpora, {stage: report["output"] for stage, report in reports.items()})
        return prepared[key]

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("hovle") or client.get_experiment(
        client.create_experiment("hovle")
    )
    # one parent run for the sweep, found again by a later invocation that adds or reruns variants
    found = client.search_runs([experiment.experiment_id], "tags.`hovle.kind` = 'sweep'", max_results=1)
    tags = {"hovle.kind": "sweep"}
    if not found:
        found = [client.create_run(experiment.experiment_id, run_name="demo-sweep", tags=tags)]
    parent = found[0].info
    results_path = REPO / "results" / "demo_sweep.json"
    earlier = json.loads(results_path.read_text()) if results_path.is_file() else []
    rows, distilled = [r for r in earlier if r["variant"] not in names], {}
    for name in names:
        what, changes = VARIANTS[name]
        vplan = variant_plan(changes)
        # a variant's plan may change between invocations: its runs are named by the plan's hash
        digest = hashlib.sha256(json.dumps([vplan, changes], sort_keys=True).encode()).hexdigest()[:8]
        folder = workdir / f"{name}-{digest}"
        folder.mkdir(exist_ok=True)
        config_path = run_config(PRESET, vplan, folder, None, args.seed, run_name=f"sweep-{name}-{digest}")
        corpora, data = data_for(vplan, changes.get("general_text", True))
        run = load_run_config(str(config_path), {f"train.data.{s}": uri for s, uri in data.items()})
        started = time.perf_counter()
        init, seconds = None, {}
        if changes.get("distill", "yes") is not None:
            key = json.dumps(vplan["stages"]["distill"], sort_keys=True)  # in this invocation
            if key not in distilled:
                t0 = time.perf_counter()
                report = train(run, "distill", source=str(config_path))
                distilled[key] = (report["exports"]["distill"], time.perf_counter() - t0)
            init, seconds["distill"] = distilled[key]
        for stage in ("align", "instruct"):
            t0 = time.perf_counter()
            report = train(run, stage, init=init, source=str(config_path))
            init, seconds[stage] = report["exports"][stage], time.perf_counter() - t0
        run_id = report["mlflow_run_id"]
        client.set_tag(run_id, "mlflow.parentRunId", parent.run_id)
        base = f"preset:{config_path}"
        settings = EvalSettings(data=str(corpora.heldout), text=str(corpora.text), base=base)
        scores = run_evaluation(init, settings, tracking, run_id, folder / "eval")
        row = {
            "variant": name, "what": what, "train_s": sum(seconds.values()), "stage_s": seconds,
            "wall_s": time.perf_counter() - started,
            **{k: v for k, v in scores.items() if isinstance(v, float)},
        }  # fmt: skip
        rows.append(row)
        client.log_metric(parent.run_id, f"{name}/vqa_accuracy", row["vqa_accuracy"])
        client.log_metric(parent.run_id, f"{name}/text_retained", row.get("text_retained", float("nan")))
        results_path.parent.mkdir(exist_ok=True)
        results_path.write_text(json.dumps(rows, indent=2))
        write_table(rows, REPO / "docs" / "results" / "demo_sweep.md")
        print(json.dumps(row), flush=True)
    client.log_artifact(parent.run_id, str(REPO / "docs" / "results" / "demo_sweep.md"))
    client.set_terminated(parent.run_id)
    ray.shutdown()
    return 0


def import_demo(workdir: Path, name: str, what: str) -> int:
    """A `make demo` run (its summary.json and MLflow store) as a row of the table: its scores, and its
    training time from the stage runs' wall clock."""
    from mlflow import MlflowClient

    summary = json.loads((workdir / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    stages = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`hovle.kind` = 'stage'"
    )
    seconds = {r.data.tags["hovle.stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in stages}
    row = {
        "variant": name, "what": what, "train_s": sum(seconds.values()), "stage_s": seconds,
        "wall_s": summary["seconds"], **{k: v for k, v in summary["scores"].items() if isinstance(v, float)},
    }  # fmt: skip
    results_path = REPO / "results" / "demo_sweep.json"
    earlier = json.loads(results_path.read_text()) if results_path.is_file() else []
    rows = [r for r in earlier if r["variant"] != name]
    rows.append(row)
    results_path.write_text(json.dumps(rows, indent=2))
    write_table(rows, REPO / "docs" / "results" / "demo_sweep.md")
    print(json.dumps(row))
    return 0


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """The sweep's markdown table (generated from the run's figures, never typed)."""
    skills = sorted({k for row in rows for k in row if k.startswith("vqa_accuracy/")})
    head = ["variant", "VQA", *(s.removeprefix("vqa_accuracy/") for s in skills)]
    head += ["text kept", "text acc", "answer ppl ratio", "train s", "what"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["variant"],
            f"{row['vqa_accuracy']:.3f}",
            *(f"{row.get(s, float('nan')):.2f}" for s in skills),
        ]
        cells += [
            f"{row.get('text_retained', float('nan')):.3f}",
            f"{row.get('text_accuracy', float('nan')):.3f}",
        ]
        cells += [f"{row.get('answer_ppl_ratio', float('nan')):.2f}", f"{row['train_s']:.0f}", row["what"]]
        lines.append("| " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Demo sweep\n\nGenerated by `benchmarks/sweep_demo.py` (smollm2-135m preset, the demo's corpora; "
        "held-out questions on new images in unseen phrasings; language kept against the base LLM on "
        f"general text-only questions). {len(rows)} variants.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
