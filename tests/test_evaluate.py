"""`jobs.evaluate` (with jobs.models, jobs.scoring, jobs.gallery): VQA accuracy per skill, language
preservation, the gallery, MLflow, model URIs."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from jobs import evaluate as ev
from jobs.export import write_export
from jobs.gallery import render_gallery
from jobs.language import BaseReference, preservation
from jobs.models import ModelNotFound, generate_answers
from jobs.scoring import normalize_answer
from pipelines.corpora.synthetic import generate
from tests.helpers import tiny_model

MAX_NEW_TOKENS = 4  # short answers keep each generate call fast on CPU


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny instruct export whose greedy output varies from token to token."""
    model, processor = tiny_model(init_std=0.3)
    folder = tmp_path_factory.mktemp("export") / "instruct"
    write_export(model, processor, model.state_dict(), str(folder), {"stage": "instruct"})
    return folder


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 held-out instruct records (images of 56 px: 2x2 tiles of the tiny preset)."""
    return generate("instruct", 8, seed=1, output_dir=tmp_path_factory.mktemp("heldout"), image_size=56)


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out text: the `text.jsonl` that the distill corpus writes beside its data."""
    jsonl = generate("distill", 3, seed=2, output_dir=tmp_path_factory.mktemp("distill"), image_size=56)
    return jsonl.with_name("text.jsonl")


@pytest.fixture(scope="module")
def loaded(export_dir: Path):
    return ev.resolve_model(str(export_dir))


def records(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def copy_heldout(heldout: Path, folder: Path) -> Path:
    """The held-out set copied into `folder` (so a test can add records and images of its own)."""
    shutil.copytree(heldout.parent, folder)
    return folder / heldout.name


def logits(model, processor) -> torch.Tensor:
    inputs = processor([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def test_normalize_answer():
    assert normalize_answer("Red.") == normalize_answer("red") == "red"
    assert normalize_answer("three") == normalize_answer("3") == "3"
    assert normalize_answer(" Left ") == "left"
    assert normalize_answer("The  First!") == "the first"
    assert normalize_answer("Ten") == "10"
    assert normalize_answer("red") != normalize_answer("blue")
    assert normalize_answer("stone") == "stone"  # "one" inside a word stays


def test_cli_prints_metrics_and_logs_the_run(
    export_dir, heldout, text_jsonl, tmp_workdir, capsys, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output = tmp_workdir / "out"
    argv = ["--model", str(export_dir), "--data", str(heldout), "--text", str(text_jsonl)]
    argv += ["--base", str(export_dir), "--max-new-tokens", str(MAX_NEW_TOKENS), "--output", str(output)]

    assert ev.main(argv) == 0

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    skills = {r["skill"] for r in records(heldout)}
    assert summary["vqa_samples"] == 8 and summary["vqa_skipped"] == 0
    assert 0.0 <= summary["vqa_accuracy"] <= 1.0
    assert {f"vqa_accuracy/{skill}" for skill in skills} <= summary.keys()
    assert summary["ppl_ratio"] == pytest.approx(1.0) and summary["text_agreement"] == 1.0
    assert -1.0 <= summary["image_token_cosine"] < 0.999 and summary["image_token_norm_ratio"] > 0
    assert summary["output"] == str(output)
    results = json.loads((output / "eval_results.json").read_text())
    assert [r["id"] for r in results["records"]] == [r["id"] for r in records(heldout)]
    assert set(results["records"][0]) == {"id", "skill", "question", "expected", "given", "correct"}
    language_fields = {"id", "question", "keys", "answer", "base_answer", "correct", "base_correct"}
    assert set(results["language"][0]) == language_fields
    assert (output / "gallery.html").read_text().count('src="data:image/png;base64,') == 8 + sum(
        isinstance(r["image"], list) for r in records(heldout)
    )

    client = MlflowClient(f"sqlite:///{tmp_workdir / 'mlflow.db'}")  # the default: the working folder's
    run = client.get_run(summary["run_id"])
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "hovle"
    metric_keys = {k for k in summary if k not in ("run_id", "output")}
    assert {k: run.data.metrics[k] for k in metric_keys} == pytest.approx(
        {k: summary[k] for k in metric_keys}, nan_ok=True
    )
    # a random tiny base answers no keyed question right: nothing can be said to be kept (the gate refuses)
    assert math.isnan(summary["text_retained"]) and summary["base_text_accuracy"] == 0.0
    assert run.data.params == {
        "model": str(export_dir),
        "data": str(heldout),
        "base": str(export_dir),
        "max_samples": "all",
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"gallery.html", "eval_results.json"}


def test_cli_logs_into_a_given_run_and_omits_preservation_without_base(
    export_dir, heldout, tmp_path, capsys, caplog
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("pipeline")).info.run_id
    argv = ["--model", str(export_dir), "--data", str(heldout), "--max-samples", "3"]
    argv += ["--max-new-tokens", "2", "--tracking-uri", uri, "--run-id", run_id]

    with caplog.at_level("INFO", logger="jobs.evaluate"):
        assert ev.main(argv) == 0

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["run_id"] == run_id and summary["vqa_samples"] == 3 and summary["output"] is None
    assert not {"text_ppl", "ppl_ratio", "text_agreement"} & summary.keys()
    assert "no --base model given" in caplog.text
    assert "vqa 3/3 records" in caplog.text  # the progress line
    run = client.get_run(run_id)
    assert run.data.params["max_samples"] == "3" and run.data.params["base"] == ""
    assert run.data.metrics["vqa_samples"] == 3
    assert run.info.status == "RUNNING"  # someone else's run: left for its owner to close


def test_a_record_is_read_as_prepare_reads_it_no_image_outside_its_folder_nor_a_fifo(tmp_path):
    """The held-out file's images resolve inside its folder and are read only as bounded regular files,
    so a hostile held-out set cannot make evaluation read /etc or hang on a FIFO."""
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    os.mkfifo(tmp_path / "data" / "pipe.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    for ref, reason in (
        ("../secret.png", "unsafe_path"),
        ("/etc/hostname", "unsafe_path"),
        ("pipe.png", "not_a_file"),
    ):
        with pytest.raises(ev.UnusableRecord, match=reason):
            ev.parse_record(json.dumps({"image": ref, "conversations": turns}), str(tmp_path / "data"))


def test_missing_or_unreadable_images_are_skipped_and_counted(loaded, heldout, tmp_path, caplog):
    jsonl = copy_heldout(heldout, tmp_path / "data")
    (jsonl.parent / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = records(heldout)
    bad = [
        dict(good[0], id="missing", image="images/gone.png"),
        dict(good[0], id="broken", image="images/broken.png"),
    ]
    write_records(jsonl, bad + good[:2])

    with caplog.at_level("WARNING", logger="jobs.evaluate"):
        report = ev.evaluate_vqa(*loaded, str(jsonl), max_new_tokens=2)

    assert report.skipped == 2 and len(report.results) == 2
    assert report.metrics()["vqa_skipped"] == 2 and report.metrics()["vqa_samples"] == 2
    assert "gone.png" in caplog.text and "broken.png" in caplog.text


def test_no_evaluable_record_is_a_data_error(loaded, heldout, tmp_path):
    jsonl = copy_heldout(heldout, tmp_path / "data")
    write_records(jsonl, [dict(records(heldout)[0], image="images/gone.png")])
    with pytest.raises(ev.DataNotFound, match="none of the 1 records"):
        ev.evaluate_vqa(*loaded, str(jsonl))


def test_accuracy_is_1_for_the_models_own_answers_and_0_for_wrong_ones(loaded, heldout, tmp_path):
    model, processor = loaded
    rows = records(heldout)
    own = []
    for row in rows:
        prompt = ev.parse_record(json.dumps(row), str(heldout.parent))
        own += generate_answers(model, processor, [(prompt.messages, prompt.images)], MAX_NEW_TOKENS)
    assert len({normalize_answer(a) for a in own}) > 1  # real, varied outputs, not one empty string
    right = write_records(heldout.with_name("right.jsonl"), [dict(r, answer=a) for r, a in zip(rows, own)])
    wrong = write_records(heldout.with_name("wrong.jsonl"), [dict(r, answer="no such answer") for r in rows])

    accurate = ev.evaluate_vqa(model, processor, str(right), max_new_tokens=MAX_NEW_TOKENS).metrics()
    mistaken = ev.evaluate_vqa(model, processor, str(wrong), max_new_tokens=MAX_NEW_TOKENS).metrics()

    assert accurate["vqa_accuracy"] == 1.0 and mistaken["vqa_accuracy"] == 0.0
    for skill in {r["skill"] for r in rows}:
        assert accurate[f"vqa_accuracy/{skill}"] == 1.0 and mistaken[f"vqa_accuracy/{skill}"] == 0.0


def test_conversations_in_the_roles_training_reads_are_evaluated_alike(loaded, heldout, tmp_path):
    """user/assistant/system (the roles `prepare` trains on) read as human/gpt do; an implicit single image
    goes before the first question, as in training; an unknown role is skipped with its reason."""
    jsonl = copy_heldout(heldout, tmp_path / "data")
    original = next(row for row in records(heldout) if isinstance(row["image"], str))  # one image
    renamed = {"human": "user", "gpt": "assistant"}
    turns = [{"role": renamed[t["from"]], "content": t["value"]} for t in original["conversations"]]
    system = [{"from": "system", "value": "Answer in one word."}]
    implicit = [dict(t, value=t["value"].replace("<image>\n", "")) for t in original["conversations"]]
    rows = [
        original,
        dict(original, id="roles", conversations=turns),
        dict(original, id="system", conversations=system + original["conversations"]),
        dict(original, id="implicit", conversations=implicit),
        dict(original, id="odd", conversations=[{"from": "narrator", "value": "once"}]),
    ]
    write_records(jsonl, rows)

    prompts = [ev.parse_record(json.dumps(row), str(jsonl.parent)) for row in rows[:4]]
    assert prompts[1].messages == prompts[0].messages == prompts[3].messages
    assert prompts[2].messages[0] == {"role": "system", "content": "Answer in one word."}
    with pytest.raises(ev.UnusableRecord, match="unknown_role"):
        ev.parse_record(json.dumps(rows[4]), str(jsonl.parent))
    report = ev.evaluate_vqa(*loaded, str(jsonl), max_new_tokens=2)
    assert report.skipped == 1 and [r.id for r in report.results] == [r["id"] for r in rows[:4]]
    assert len({r.given for r in report.results if r.id != "system"}) == 1  # the same chat, the same answer


def test_evaluate_is_a_plain_function_that_returns_its_report(export_dir, heldout, text_jsonl, tmp_path):
    """No MLflow and no files: `evaluate(model, EvalSettings)` answers, scores and compares; `write` puts
    the gallery and the results where asked."""
    from jobs.run_config import EvalSettings

    settings = EvalSettings(
        data=str(heldout), text=str(text_jsonl), base=str(export_dir), max_samples=3,
        max_new_tokens=MAX_NEW_TOKENS,
    )  # fmt: skip
    report = ev.evaluate(str(export_dir), settings)

    assert report.metrics["vqa_samples"] == 3 and len(report.vqa.results) == 3
    assert report.metrics["ppl_ratio"] == pytest.approx(1.0) and report.metrics["text_agreement"] == 1.0
    assert len(report.language) >= 50 and not list(tmp_path.iterdir())
    files = report.write(tmp_path / "out")
    assert [f.name for f in files] == ["gallery.html", "eval_results.json"]
    assert json.loads(files[1].read_text())["metrics"] == pytest.approx(report.metrics, nan_ok=True)
    with pytest.raises(ev.DataNotFound, match="text file"):
        ev.evaluate(str(export_dir), settings.model_copy(update={"text": str(tmp_path / "none.jsonl")}))


def test_records_without_skill_count_only_overall(loaded, heldout, tmp_path):
    jsonl = copy_heldout(heldout, tmp_path / "data")
    write_records(jsonl, [{k: v for k, v in row.items() if k != "skill"} for row in records(heldout)[:2]])
    metrics = ev.evaluate_vqa(*loaded, str(jsonl), max_new_tokens=1).metrics()
    assert set(metrics) == {"vqa_accuracy", "vqa_samples", "vqa_skipped"}


def test_preservation_is_exact_against_itself_and_not_against_another_model(loaded, text_jsonl):
    model, processor = loaded
    texts = ev.read_texts(str(text_jsonl))
    same, records = preservation(model, processor, BaseReference.of(model, processor), texts)
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["text_agreement"] == 1.0
    assert same["answer_ppl_ratio"] == pytest.approx(1.0)
    assert same["text_ppl"] == pytest.approx(same["base_text_ppl"]) and same["text_ppl"] > 1.0
    assert len(records) == same["text_questions"] >= 50

    other_model, other_processor = tiny_model(seed=1, init_std=0.3)
    other, _ = preservation(model, processor, BaseReference.of(other_model.eval(), other_processor), texts)
    assert other["ppl_ratio"] != pytest.approx(1.0, abs=1e-3)
    assert other["answer_ppl_ratio"] != pytest.approx(1.0, abs=1e-3)
    assert other["text_ppl"] == pytest.approx(same["text_ppl"])  # the evaluated model's own number


def test_gallery_escapes_text_and_shrinks_images(loaded, heldout, tmp_path):
    jsonl = copy_heldout(heldout, tmp_path / "data")
    Image.new("RGB", (448, 112), (200, 30, 30)).save(jsonl.parent / "images" / "wide.png")
    row = {
        "id": "x<b>",
        "image": "images/wide.png",
        "conversations": [{"from": "human", "value": "<image>\n<script>alert(1)</script> colour?"}],
        "answer": "<i>red</i>",
        "skill": "colour",
    }
    write_records(jsonl, [row])

    report = ev.evaluate_vqa(*loaded, str(jsonl), max_new_tokens=2)
    page = render_gallery(report.results, report.thumbnails, report.skipped)

    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;i&gt;red&lt;/i&gt;" in page and "x&lt;b&gt;" in page and "✗" in page
    encoded = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (224, 56)


def test_missing_model_or_data_exits_2_with_a_message(heldout, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing_model = ["--model", str(tmp_path / "nope"), "--data", str(heldout), "--tracking-uri", uri]
    assert ev.main(missing_model) == 2
    err = capsys.readouterr().err
    assert f"no model at {tmp_path / 'nope'}" in err and "Traceback" not in err

    missing_data = [
        "--model",
        str(tmp_path / "nope"),
        "--data",
        str(tmp_path / "gone.jsonl"),
        "--tracking-uri",
        uri,
    ]
    assert ev.main(missing_data) == 2
    assert "data file" in capsys.readouterr().err

    assert ev.main([*missing_model[:4], "--tracking-uri", uri, "--run-id", "0" * 32]) == 2
    assert f"MLflow run {'0' * 32} not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "message"),
    [("binary", "not UTF-8 text"), ("device", "not a regular file"), ("folder", "not a regular file")],
)
def test_data_that_is_not_a_text_file_exits_2_in_one_line_before_any_model_loads(
    kind, message, tmp_path, capsys
):
    """A binary file, /dev/zero (it would be read until memory runs out) or a folder as --data or --text."""
    data = {"binary": tmp_path / "data.bin", "device": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "binary":
        data.write_bytes(bytes(range(256)) * 64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for flag in ("--data", "--text"):
        argv = ["--model", str(tmp_path / "nope"), "--data", str(data), "--tracking-uri", uri]
        if flag == "--text":
            good = tmp_path / "heldout.jsonl"
            good.write_text('{"id": "a"}\n')
            argv[3], argv = str(good), [*argv, "--text", str(data)]
        assert ev.main(argv) == 2, flag
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(data) in err[0], (flag, err)  # not "no model at"


def test_resolve_model_from_an_export_and_a_plain_folder(export_dir, loaded, tmp_path):
    model, processor = loaded
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    processor.save_pretrained(plain)

    again, again_processor = ev.resolve_model(str(plain))

    assert not (plain / "export.json").exists()
    assert torch.equal(logits(again, again_processor), logits(model, processor))
    assert again_processor == processor and not again.training


def test_models_and_data_on_s3(export_dir, loaded, heldout, s3_bucket):
    from pipelines import storage

    model, processor = loaded
    storage.put_directory(str(export_dir), f"{s3_bucket}/export")
    model.save_pretrained(export_dir.parent / "plain")
    processor.save_pretrained(export_dir.parent / "plain")
    storage.put_directory(str(export_dir.parent / "plain"), f"{s3_bucket}/plain")
    storage.put_directory(str(heldout.parent), f"{s3_bucket}/heldout")

    for uri in (f"{s3_bucket}/export", f"{s3_bucket}/plain"):
        assert torch.equal(logits(*ev.resolve_model(uri)), logits(model, processor)), uri
    remote = ev.evaluate_vqa(model, processor, f"{s3_bucket}/heldout/{heldout.name}", 3, MAX_NEW_TOKENS)
    local = ev.evaluate_vqa(model, processor, str(heldout), 3, MAX_NEW_TOKENS)
    assert remote.results == local.results and remote.skipped == 0


def test_resolve_model_from_mlflow_runs_and_registry_uris(export_dir, loaded, tmp_workdir, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    class Holder(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    uri = f"sqlite:///{tmp_workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(
            name="model",
            python_model=Holder(),
            artifacts={"hf_model": str(export_dir)},
            pip_requirements=["mlflow"],
        )
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "hovle-test")
    MlflowClient(uri).set_registered_model_alias("hovle-test", "champion", version.version)

    expected = logits(*loaded)
    for model_uri in (
        f"runs:/{run.info.run_id}/model",
        "models:/hovle-test@champion",
        "models:/hovle-test/1",
    ):
        model, processor = ev.resolve_model(model_uri, tracking_uri=uri)
        assert torch.equal(logits(model, processor), expected), model_uri

    with pytest.raises(ModelNotFound, match="models:/hovle-test@nobody"):
        ev.resolve_model("models:/hovle-test@nobody", tracking_uri=uri)
