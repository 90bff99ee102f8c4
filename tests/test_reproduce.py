"""`make reproduce` (benchmarks/reproduce.py) on the tiny preset with budgets of a few CPU-seconds: rows
train at equal compute through the real pipeline, are evaluated, logged under one MLflow parent run and
registered per row; the table, JSON and plots come from the run."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from benchmarks.reproduce import ROWS, main, rows_to_run, stage_budgets

BUDGET = 6.0  # training CPU-seconds per row


def test_every_row_gets_the_same_budget_and_e_counts_its_teacher():
    for row in ROWS.values():
        assert sum(row.shares.values()) == pytest.approx(1.0)
        assert list(row.shares) == [s for s in ("distill", "align", "instruct") if s in row.shares]
    total = {key: sum(stage_budgets(row, 600.0).values()) for key, row in ROWS.items()}
    assert [total[k] for k in "abcdf"] == pytest.approx([600.0] * 5)
    assert total["e"] + total["d-half"] == pytest.approx(600.0)
    assert stage_budgets(ROWS["c"], 100.0)["align"] == pytest.approx(70.0)  # distill's share goes to align
    assert [r.key for r in rows_to_run("e,a")] == ["a", "d-half", "e"]  # e pulls in its teacher
    assert [r.key for r in rows_to_run(None)] == ["a", "b", "c", "d", "d-half", "e", "f"]
    with pytest.raises(SystemExit, match="unknown rows"):
        rows_to_run("a,z")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_row_e_trains_its_teacher_first_evaluates_logs_and_registers_counting_both(tmp_workdir):
    import mlflow
    from mlflow import MlflowClient

    from jobs.tracking import use_tracking_uri
    from tests.helpers import shapes_image

    language = tmp_workdir / "language.jsonl"
    package = Path(__import__("pipelines").__file__).parent / "data" / "language_eval.jsonl"
    language.write_text("".join(package.read_text().splitlines(keepends=True)[:6]))
    workdir, docs, results = tmp_workdir / "repro", tmp_workdir / "docs", tmp_workdir / "results.json"
    argv = [
        "--preset", "tiny", "--only", "e", "--cpu-seconds", str(BUDGET), "--heldout", "3",
        "--workdir", str(workdir), "--docs-dir", str(docs), "--results-file", str(results),
        "--language-questions", str(language),
    ]  # fmt: skip
    assert main(argv) == 0

    rows = {r["row"]: r for r in json.loads(results.read_text())["rows"]}
    assert set(rows) == {"d-half", "e"}  # e builds on d-half, which runs first (d is the same code path)
    for key in ("e",):
        row = rows[key]
        for field in ("vqa_accuracy", "vqa_accuracy/colour", "vqa_accuracy/shape", "vqa_accuracy/count"):
            assert 0.0 <= row[field] <= 1.0, (key, field)
        assert {"text_retained", "text_accuracy", "answer_ppl_ratio"} <= set(row)
        assert row["cpu_seconds_spent"] >= BUDGET and row["tokens"] > 0  # e: its teacher's and its own
        assert row["model_uri"] == f"models:/hovle-repro-{key}/1"
        for stage, info in row["stages"].items():
            assert info["stopped_by"] == "cpu_seconds" and info["steps"] < 100_000, (key, stage)
            assert info["cpu_seconds"] >= info["cpu_seconds_budget"]
    assert set(rows["e"]["stages"]) == {"distill", "align", "instruct"} and rows["e"]["built_on"] == "d-half"
    assert set(rows["d-half"]["stages"]) == {"align", "instruct"} and "vqa_accuracy" not in rows["d-half"]
    teacher = rows["d-half"]["cpu_seconds_spent"]
    assert teacher >= BUDGET / 2 and rows["e"]["cpu_seconds_spent"] - teacher >= BUDGET / 2
    if "vqa_accuracy/class" in rows["e"]:  # Fashion-MNIST installed: class questions on its test photos
        heldout = [json.loads(line) for line in (workdir / "data" / "heldout" / "reproduce.jsonl").open()]
        assert sum(r["skill"] == "class" for r in heldout) == 3
        assert [sum(r["skill"] == s for r in heldout) for s in ("colour", "shape", "count")] == [3, 3, 3]

    table = (docs / "reproduce.md").read_text()
    assert "| e | HoVLE distilled from d-half |" in table and "| d |" not in table
    assert "preset `tiny`" in table and f"{os.cpu_count()} cores" in table and "deepspeed " in table
    assert (docs / "reproduce_loss.png").stat().st_size > 0 and (docs / "reproduce_accuracy.png").is_file()

    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("hovle").experiment_id
    [parent] = client.search_runs([experiment], "tags.`hovle.kind` = 'reproduce'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_row = {run.data.tags["hovle.repro_row"]: run for run in children}
    assert set(by_row) == {"d-half", "e"}
    assert by_row["e"].data.metrics["vqa_accuracy"] == rows["e"]["vqa_accuracy"]
    stage_runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{by_row['e'].info.run_id}'")
    assert sorted(r.data.tags["hovle.stage"] for r in stage_runs) == ["align", "distill", "instruct"]
    assert parent.info.status == "FINISHED"
    assert {"reproduce.md", "results.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    [version] = client.search_model_versions("name = 'hovle-repro-e'")
    assert str(version.version) == "1" and version.run_id == by_row["e"].info.run_id
    shapes_image().save(tmp_workdir / "question.png")
    question = base64.b64encode((tmp_workdir / "question.png").read_bytes()).decode()  # no paths served
    with use_tracking_uri(tracking):
        answers = mlflow.pyfunc.load_model("models:/hovle-repro-e/1").predict(
            [{"prompt": "What colour is the circle?", "image": question}],
            params={"max_new_tokens": 2},
        )
    assert list(answers.columns) == ["answer"] and len(answers) == 1

    # a rerun skips the finished rows: no training, no new model versions
    assert main(argv) == 0
    assert len(client.search_model_versions("name = 'hovle-repro-e'")) == 1
    again = json.loads(results.read_text())["rows"]
    assert [(r["row"], r["run_id"], r.get("model_uri")) for r in again] == [
        (r["row"], r["run_id"], r.get("model_uri")) for r in rows.values()
    ]


def test_a_claim_is_judged_only_when_one_of_its_rows_learnt():
    from benchmarks.reproduce_report import _verdict

    def rows(a: float, d: float) -> dict:
        return {"a": {"vqa_accuracy": a, "vqa_samples": 400}, "d": {"vqa_accuracy": d, "vqa_samples": 400}}

    assert _verdict(rows(0.117, 0.058), "a", "d", "matches")[0] == "not shown at this size"  # both at chance
    assert _verdict(rows(0.60, 0.20), "a", "d", "better")[0] == "holds"
    assert _verdict(rows(0.10, 0.60), "a", "d", "matches")[0] == "does not hold"
