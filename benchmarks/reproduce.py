"""`make reproduce`: HoVLE's claims at this scale, each row trained at equal CPU-seconds through the platform.

    .venv/bin/python benchmarks/reproduce.py [--preset smollm2-135m] [--cpu-seconds 540] [--only a,c]
                                             [--heldout 100] [--workdir outputs/reproduce] [--fresh]

Rows (the same corpora, prepared once, and the same held-out set for every row):
    a  HoVLE with the project's defaults: the demo's plan (jobs/demo.py PLANS), distill -> align -> instruct
    b  the paper-faithful recipe (`train.recipe: paper`: random init, no norm-matching, no text preservation)
    c  no stage 1: align -> instruct from the identity-initialised module (distill's share goes to align)
    d  the compositional baseline (MobileNetV2 -> MLP projector -> the same LLM): projector pretraining
       (align, on captions and questions) -> instruct
    e  HoVLE distilled from a compositional teacher (`teacher: compositional:<export>`): the teacher is
       `d-half`, the compositional baseline trained on half the row's budget (its own sub-run); e's stages
       get the other half, so e counts both (the issue: "rows that build on another count both")
    f  De-focus: the embedding module's attention set to `defocus` (decay + learnable RoPE + drop path)

Equal compute: every row gets `--cpu-seconds` of training, split across its stages by fixed shares, each
stage trained with `train.stages.<stage>.cpu_seconds` (jobs.budget: the worker process's CPU-seconds in the
training loop; model load, engine set-up, logging and checkpoints are not counted) and a generous `steps`
bound. Shares: distill 0.15, align 0.55, instruct 0.30. The demo's plan spends about 6 / 68 / 26 % of its
optimizer time on them (40 x 1.2 s, 100 x 5.45 s, 40 x 5.1 s a step); HOVLE.md's prototype reached 0.95 on
colour only with 3 minutes of distillation before 5 of alignment (~37 % distill). 0.15 sits between, leaving
align the bulk; instruct keeps about the demo's share. Rows without distill give its 0.15 to align (0.70 /
0.30). Warmup stays the plan's, in steps (planned steps // 10); the cosine then follows the CPU-seconds.

The default budget (540 CPU-s a row) is sized for about 60 minutes on 2 otherwise idle cores:
    fixed costs   corpora + prepare ~0.5 min; per stage run (Ray Train start, model load, DeepSpeed set-up,
                  the final checkpoint, export) ~35 s x 18 stage runs (a 3, b 3, c 2, d 2, d-half 2, e 3,
                  f 3) ~10.5 min; per evaluated row (400 held-out VQA questions and 72 general text
                  questions; the base's answers are cached after the first row) ~2.5 min x 6 ~15 min;
                  registration ~10 s a row  -> ~27 min
    training      the other ~33 min (~1980 s) of wall; the worker's 2 torch threads spend ~1.7 CPU-s per
                  wall second -> ~3370 CPU-s for 6 row budgets (a, b, c, d, d-half + e, f) -> 560; 540 a row,
                  i.e. ~30 align steps of the demo's plan (~9 CPU-s each) where the demo takes 100
Sources: the demo's own stage runs (its MLflow store: prepare 21 s; ~20 s start-up and ~15 s per checkpoint
a stage run; align 5.45 s a step; an evaluation of 160 VQA + 72 text questions, base not cached, 316 s) and
`--only a --cpu-seconds 200 --heldout 10` here on a machine shared with other jobs (load 10-35), where a stage
run took 45-100 s beyond its training and a step cost about twice its CPU-seconds (threads that wait for each
other burn CPU): on a busy machine the run takes longer and each row trains fewer steps. Every run writes its
own timings to docs/results/reproduce.md ("Time"): DEFAULT_CPU_SECONDS is the one number to retune.

Everything lands in `--workdir`: the corpora and prepared data (data/), each row's config, checkpoints and
exports (rows/<row>/), its evaluation and result (rows/<row>/result.json), and the reproduction's own MLflow
store (mlflow.db, mlruns/): one parent run `reproduce`; each row's pipeline run nested under it holds the
row's scores (its stage runs nested under that); each row's final model is registered, without the gate, as
`hovle-repro-<row>` (`models:/hovle-repro-a/1` loads like the champion). A rerun skips rows whose result
exists (`--fresh` forgets the chosen rows: folders, runs and registered models) and resumes a half-trained
one. The table (docs/results/reproduce.md), results/reproduce.json and the plots are generated from every
row result in the workdir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproduce_data import corpora_and_data, reproduction_plan  # noqa: E402
from benchmarks.reproduce_report import write_outputs  # noqa: E402
from jobs.demo import PLANS, Corpora, run_config  # noqa: E402
from jobs.logging_setup import setup_logging  # noqa: E402

logger = logging.getLogger("reproduce")

REPO = Path(__file__).resolve().parents[1]
SHARES = {"distill": 0.15, "align": 0.55, "instruct": 0.30}
SHARES_NO_DISTILL = {"align": 0.70, "instruct": 0.30}
DEFAULT_CPU_SECONDS = 540.0
STEP_BOUND = 100_000  # `steps` with a CPU budget: only an upper bound
CHECKPOINT_EVERY = 50  # steps; the last step always checkpoints
PARENT_KIND = "reproduce"
ROW_TAG = "hovle.repro_row"


@dataclass(frozen=True)
class Row:
    """One row of the reproduction: what it trains, on which share of the row budget."""

    key: str
    title: str
    shares: dict[str, float]  # stage -> share of the row's CPU-seconds (stages in training order)
    compositional: bool = False
    budget_share: float = 1.0  # of `--cpu-seconds`: 0.5 for a row that builds on another
    recipe: str = "project"
    attention: str = "standard"
    teacher: str | None = None  # the row whose instruct export is the distill teacher
    evaluated: bool = True  # d-half is a teacher, not a row of the table


ROWS: dict[str, Row] = {
    "a": Row("a", "HoVLE, the project's defaults", SHARES),
    "b": Row("b", "HoVLE, the paper's recipe", SHARES, recipe="paper"),
    "c": Row("c", "HoVLE without stage 1", SHARES_NO_DISTILL),
    "d": Row("d", "compositional baseline", SHARES_NO_DISTILL, compositional=True),
    "d-half": Row(
        "d-half", "compositional teacher for e", SHARES_NO_DISTILL, True, budget_share=0.5, evaluated=False
    ),
    "e": Row("e", "HoVLE distilled from d-half", SHARES, budget_share=0.5, teacher="d-half"),
    "f": Row("f", "HoVLE with De-focus attention", SHARES, attention="defocus"),
}


def stage_budgets(row: Row, cpu_seconds: float) -> dict[str, float]:
    """CPU-seconds per stage of `row` out of a row budget of `cpu_seconds`."""
    return {stage: cpu_seconds * row.budget_share * share for stage, share in row.shares.items()}


def rows_to_run(only: str | None) -> list[Row]:
    """The chosen rows in table order, with the rows they build on before them."""
    keys = [k.strip() for k in only.split(",")] if only else [k for k, r in ROWS.items() if r.evaluated]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"reproduce: unknown rows {unknown}; known: {', '.join(ROWS)}")
    wanted = set(keys) | {ROWS[k].teacher for k in keys if ROWS[k].teacher}
    return [row for key, row in ROWS.items() if key in wanted]


# ---- one row ----------------------------------------------------------------------------------------------
def row_config(
    row: Row, preset: str, plan: dict[str, Any], folder: Path, cpu_seconds: float, seed: int, tracking: str,
    teacher: str | None,
) -> Path:  # fmt: skip
    """The row's run config (the demo's, changed for the row) at folder/config.yaml."""
    model_preset = f"{preset}-compositional" if row.compositional else preset
    draft = run_config(model_preset, plan, folder, None, seed, run_name=f"repro-{row.key}")
    document = yaml.safe_load(draft.read_text())
    draft.unlink()
    train = document["train"]
    stages = {}
    for stage, budget in stage_budgets(row, cpu_seconds).items():
        settings = dict(train["stages"][stage])
        planned = plan["stages"][stage]["steps"]
        settings.update(steps=STEP_BOUND, cpu_seconds=round(budget, 3), warmup_steps=max(1, planned // 10))
        if row.compositional:  # no embedding module: its text-preservation term has nothing to keep
            settings["text_preservation_weight"] = 0.0
        if "distill" not in row.shares:  # no stage 1: no teacher anywhere, its image anchor neither
            settings["image_anchor_weight"] = 0.0
        stages[stage] = settings
    if teacher:  # distilled from it, and anchored to it
        for stage, settings in stages.items():
            if stage == "distill" or settings.get("image_anchor_weight"):
                settings["teacher"] = f"compositional:{teacher}"
    train.update(stages=stages, recipe=row.recipe, tracking={**train["tracking"], "uri": tracking})
    train["checkpoint"] = {"every_n_steps": CHECKPOINT_EVERY, "keep_last": 1}
    train["log_every_n_steps"] = 2  # loss curves with enough points (logging is outside the CPU budget)
    if row.attention != "standard":
        document["model"].setdefault("embedding", {})["attention"] = row.attention
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def train_row(row: Row, config_path: Path, datasets: dict[str, str], parent: str, tracking: str) -> dict:
    """Train the row's stages in order (each from the last one's export) as one Ray Train run under its
    pipeline run, nested under the reproduction's parent run; returns {"run_id", "exports", "stages":
    {stage: export info}} (the info holds the stage's CPU-seconds, tokens and wall_s)."""
    from jobs.export import read_export_info
    from jobs.run_config import load_run_config
    from jobs.tracking import PARENT_TAG, RunTracker
    from jobs.train import train

    run = load_run_config(str(config_path), {f"train.data.{s}": uri for s, uri in datasets.items()})
    config = run.train
    tracker = RunTracker(tracking, config.tracking.experiment)
    tags = {PARENT_TAG: parent, ROW_TAG: row.key, "hovle.config": str(config_path)}
    run_id = tracker.pipeline_run(config.run_name, config.flat(), tags)  # train() finds it by name
    exports = train(run, ",".join(row.shares), source=str(config_path))["exports"]
    # exported: its checkpoints (~1 GB a smollm2 stage) are never resumed from again
    shutil.rmtree(Path(config.storage_path) / config.train_run_name, ignore_errors=True)
    stages = {stage: read_export_info(uri) for stage, uri in exports.items()}
    return {"run_id": run_id, "exports": exports, "stages": stages}


def evaluate_row(
    export: str, corpora: Corpora, base_config: Path, run_id: str, tracking: str, out: Path,
    language_questions: Path | None = None,
) -> dict[str, float]:  # fmt: skip
    """The held-out VQA set and the general-language check against the base LLM, into the row's run."""
    from jobs.evaluate import run_evaluation
    from jobs.run_config import EvalSettings

    settings = EvalSettings(
        data=str(corpora.heldout), text=str(corpora.text), base=f"preset:{base_config}",
        language_questions=str(language_questions) if language_questions else None,
    )  # fmt: skip
    scores = run_evaluation(export, settings, tracking, run_id, out)
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


def register_row(row: Row, export: str, run_id: str, scores: dict, tracking: str, preset: str) -> str:
    """`hovle-repro-<row>`: one version per row run (a rerun reuses the one it registered); no gate."""
    from mlflow import MlflowClient

    from jobs.registry import log_hovle_model, register, source_commit

    name = registered_name(row.key)
    for version in MlflowClient(tracking).search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            return f"models:/{name}/{version.version}"
    model_uri = log_hovle_model(export, run_id, tracking)
    tags = {"hovle.source_commit": source_commit(), "hovle.preset": preset, ROW_TAG: row.key}
    version = register(model_uri, name, tags, scores, tracking)
    return f"models:/{name}/{version}"


def registered_name(key: str) -> str:
    return f"hovle-repro-{key}"


def spent(stages: dict[str, dict]) -> tuple[float, int]:
    """(CPU-seconds, tokens) the stages' exports record."""
    return sum(s["cpu_seconds"] for s in stages.values()), sum(int(s["tokens"]) for s in stages.values())


def forget_rows(rows: list[Row], workdir: Path, client) -> None:
    """--fresh: the rows' folders, MLflow runs (row runs and their stage runs) and registered models."""
    from mlflow.exceptions import MlflowException

    from jobs.tracking import PARENT_TAG

    experiments = [e.experiment_id for e in client.search_experiments()]
    for row in rows:
        shutil.rmtree(workdir / "rows" / row.key, ignore_errors=True)
        for run in client.search_runs(experiments, f"tags.`{ROW_TAG}` = '{row.key}'"):
            for child in client.search_runs(experiments, f"tags.`{PARENT_TAG}` = '{run.info.run_id}'"):
                client.delete_run(child.info.run_id)
            client.delete_run(run.info.run_id)
        with contextlib.suppress(MlflowException):  # not registered
            client.delete_registered_model(registered_name(row.key))


@contextlib.contextmanager
def environment(**values: str):
    """Environment variables set inside the block only."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- the study --------------------------------------------------------------------------------------------
def reproduce(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the chosen rows (see the module doc); returns every row result in the workdir."""
    import ray
    from mlflow import MlflowClient

    # absolute before the chdir into the workdir below
    args.workdir, args.docs_dir, args.results_file = (
        Path(p).resolve() for p in (args.workdir, args.docs_dir, args.results_file)
    )
    if args.language_questions:
        args.language_questions = args.language_questions.resolve()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    settings = {"preset": args.preset, "cpu_seconds": args.cpu_seconds, "heldout": args.heldout}
    settings.update(samples=args.samples, seed=args.seed, language_questions=str(args.language_questions))
    recorded = workdir / "settings.json"
    rows = rows_to_run(args.only)
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        if not args.fresh:
            raise SystemExit(
                f"reproduce: {workdir} holds a run with other settings ({recorded.read_text().strip()}): "
                "pass --fresh to start over there, or another --workdir"
            )
        shutil.rmtree(workdir)  # other data and budgets: nothing there can be reused
        workdir.mkdir(parents=True)
    client = MlflowClient(tracking)
    if args.fresh:
        forget_rows(rows, workdir, client)
    recorded.write_text(json.dumps(settings))
    plan = reproduction_plan(args.preset, args.heldout, args.samples)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=True, configure_logging=False, log_to_driver=True)
    with environment(MLFLOW_TRACKING_URI=tracking), contextlib.chdir(workdir):  # mlruns/ beside mlflow.db
        corpora, datasets, base_config = corpora_and_data(args.preset, plan, workdir / "data", args.seed)
        parent = parent_run(client, settings)
        for row in rows:
            if (workdir / "rows" / row.key / "result.json").is_file():
                logger.info("row %s: result exists, skipped (--fresh retrains it)", row.key)
                continue
            print(f"\n== row {row.key}: {row.title}", flush=True)
            result = run_row(row, args, settings, plan, corpora, datasets, base_config, parent, client)
            print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
        results = [
            json.loads(path.read_text())
            for key in ROWS
            if (path := workdir / "rows" / key / "result.json").is_file()
        ]
        made = json.loads((workdir / "data" / "corpora.json").read_text())
        meta = {**settings, "corpora_prepare_s": made["seconds"], "heldout_questions": corpora.heldout_count}
        outputs = write_outputs(results, meta, args.docs_dir, args.results_file, client)
        for path in outputs:
            client.log_artifact(parent, str(path))
        client.set_terminated(parent)
    if started_ray:
        ray.shutdown()
    return results


def run_row(
    row: Row, args: argparse.Namespace, settings: dict[str, Any], plan: dict[str, Any], corpora: Corpora,
    datasets: dict[str, str], base_config: Path, parent: str, client,
) -> dict[str, Any]:  # fmt: skip
    """Train, evaluate and register one row; its result lands in rows/<row>/result.json (written last)."""
    workdir = args.workdir
    folder = workdir / "rows" / row.key
    folder.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    started = time.perf_counter()
    built_on = (
        json.loads((workdir / "rows" / row.teacher / "result.json").read_text()) if row.teacher else None
    )
    teacher = built_on["exports"]["instruct"] if built_on else None
    config = row_config(row, args.preset, plan, folder, args.cpu_seconds, args.seed, tracking, teacher)
    trained = train_row(row, config, datasets, parent, tracking)
    result = {"row": row.key, "title": row.title, **settings, **trained}
    result["cpu_seconds_spent"], result["tokens"] = spent(trained["stages"])
    if built_on:  # rows that build on another count both
        result["cpu_seconds_spent"] += built_on["cpu_seconds_spent"]
        result["tokens"] += built_on["tokens"]
        result["built_on"] = row.teacher
    if row.evaluated:
        t0 = time.perf_counter()
        export = trained["exports"][list(row.shares)[-1]]
        scores = evaluate_row(
            export,
            corpora,
            base_config,
            trained["run_id"],
            tracking,
            folder / "eval",
            args.language_questions,
        )
        result.update(scores, evaluate_s=time.perf_counter() - t0)
        result["model_uri"] = register_row(row, export, trained["run_id"], scores, tracking, args.preset)
        client.log_metric(trained["run_id"], "cpu_seconds", result["cpu_seconds_spent"])
        client.log_metric(trained["run_id"], "tokens", result["tokens"])
        for key in ("vqa_accuracy", "text_retained"):
            if key in scores:
                client.log_metric(parent, f"{row.key}/{key}", scores[key])
    result["wall_s"] = time.perf_counter() - started
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    return result


def parent_run(client, settings: dict[str, Any]) -> str:
    """The reproduction's parent run in the `hovle` experiment: found again by a rerun, else created."""
    from jobs.tracking import KIND_TAG, log_params

    experiment = client.get_experiment_by_name("hovle")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("hovle")
    found = client.search_runs([experiment_id], f"tags.`{KIND_TAG}` = '{PARENT_KIND}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name="reproduce", tags={KIND_TAG: PARENT_KIND})
    log_params(
        client, run.info.run_id, {**settings, "shares": SHARES, "shares_no_distill": SHARES_NO_DISTILL}
    )
    return run.info.run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PLANS))
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "reproduce")
    parser.add_argument(
        "--cpu-seconds", type=float, default=DEFAULT_CPU_SECONDS, help="training CPU-seconds per row"
    )
    parser.add_argument("--heldout", type=int, default=100, help="held-out questions per skill (and photos)")
    parser.add_argument("--samples", type=int, default=None, help="samples per stage (default: the plan's)")
    parser.add_argument("--only", help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    parser.add_argument(
        "--fresh", action="store_true", help="retrain the chosen rows even if they have results"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--language-questions", type=Path, help="keyed general questions JSONL (default: the package's 72)"
    )
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs" / "results", help="table and plots")
    parser.add_argument("--results-file", type=Path, default=REPO / "results" / "reproduce.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    for chatty in ("transformers", "ray", "ray.data", "ray.train", "mlflow", "py.warnings"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    started = time.perf_counter()
    results = reproduce(args)
    seconds = time.perf_counter() - started
    print(f"\n{len(results)} row results in {args.docs_dir / 'reproduce.md'}; done in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
