"""The registry: an export logged as a pyfunc model, registered with tags, promoted only by the gate.

A real MLflow SQLite store under the test's folder; tiny random models.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.export import write_export
from jobs.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION_TAG,
    PROMOTION_TAG,
    GateSettings,
    log_hovle_model,
    promote,
    register,
)
from tests.helpers import shapes_image, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, logged model URI) of a tiny export logged once."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, processor = tiny_model(init_std=0.5)
    export = root / "export"
    write_export(model, processor, model.state_dict(), str(export), {"stage": "instruct"})
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("registry-test", artifact_location=str(root / "artifacts"))
    run = client.create_run(experiment)
    return uri, log_hovle_model(str(export), run.info.run_id, uri)


@pytest.fixture
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(store[0])


def new_version(store, name: str, **scores: float) -> str:
    tags = {"hovle.config_hash": "c", "hovle.source_commit": "abc"}
    return register(store[1], name, tags, scores, store[0])


KEPT = {"text_retained": 1.0, "answer_ppl_ratio": 1.0}  # the language scores of a model that kept its LLM's


def test_the_first_version_becomes_champion_only_above_the_floors(store, client):
    gate = GateSettings(name="first", floor=0.5)
    low = new_version(store, "first", vqa_accuracy=0.2, **KEPT)
    decision = promote(client, "first", low, gate)
    assert not decision.champion and "floor" in decision.reason
    assert str(client.get_model_version_by_alias("first", CHALLENGER).version) == low
    mute = new_version(store, "first", vqa_accuracy=0.9, text_retained=0.5, answer_ppl_ratio=1.0)
    decision = promote(client, "first", mute, gate)
    assert not decision.champion and "text_retained 0.5000 is under 0.9" in decision.reason
    high = new_version(store, "first", vqa_accuracy=0.6, text_retained=0.95, answer_ppl_ratio=1.2)
    assert promote(client, "first", high, gate).champion
    assert str(client.get_model_version_by_alias("first", CHAMPION).version) == high
    tags = client.get_model_version("first", high).tags
    assert tags["eval.vqa_accuracy"] == "0.6" and tags["hovle.source_commit"] == "abc"
    assert tags[PROMOTION_TAG].startswith("champion:")


def test_the_default_floors_refuse_a_first_champion_that_learned_nothing(store, client):
    decision = promote(
        client, "floors", new_version(store, "floors", vqa_accuracy=0.1, **KEPT), GateSettings()
    )
    assert not decision.champion and "under the floor" in decision.reason


def test_a_wrecked_model_that_wins_on_skills_and_domain_perplexity_is_never_crowned(store, client):
    """Only the language check can refuse it: it beats the champion on VQA and on the training domain's
    perplexity (which improves as the LLM is overwritten by that text), as the broken December demo did."""
    gate = GateSettings(name="wrecked")  # the default floors
    champion = new_version(store, "wrecked", vqa_accuracy=0.5, ppl_ratio=1.0, **KEPT)
    assert promote(client, "wrecked", champion, gate).champion
    wrecked = new_version(
        store, "wrecked", vqa_accuracy=0.95, ppl_ratio=0.29, text_retained=0.1, answer_ppl_ratio=9.0
    )
    decision = promote(client, "wrecked", wrecked, gate)
    assert not decision.champion and decision.reason.startswith("language preservation")
    assert str(client.get_model_version_by_alias("wrecked", CHAMPION).version) == champion
    # losing a little more than the allowed drop against the champion is refused too
    slipping = new_version(store, "wrecked", vqa_accuracy=0.95, text_retained=0.92, answer_ppl_ratio=1.1)
    decision = promote(client, "wrecked", slipping, GateSettings(name="wrecked", max_text_retained_drop=0.05))
    assert not decision.champion and "lower than champion" in decision.reason
    assert str(client.get_model_version_by_alias("wrecked", CHAMPION).version) == champion
    # and the base's answers becoming unlikely (perplexity ratio over the bound) is refused on its own
    unlikely = new_version(store, "wrecked", vqa_accuracy=0.95, text_retained=1.0, answer_ppl_ratio=3.0)
    decision = promote(client, "wrecked", unlikely, gate)
    assert not decision.champion and "answer_ppl_ratio 3.0000 is over 2.0" in decision.reason


def test_a_version_whose_language_was_not_measured_is_never_crowned(store, client):
    unmeasured = new_version(store, "unmeasured", vqa_accuracy=1.0)  # evaluated without --base
    decision = promote(client, "unmeasured", unmeasured, GateSettings(name="unmeasured", floor=0.0))
    assert not decision.champion and "not measured" in decision.reason
    mute_base = new_version(store, "unmeasured", vqa_accuracy=1.0, text_retained=float("nan"))
    decision = promote(client, "unmeasured", mute_base, GateSettings(name="unmeasured", floor=0.0))
    assert not decision.champion and "base answers none" in decision.reason


def test_a_challenger_must_beat_the_champion(store, client):
    gate = GateSettings(name="gated", min_improvement=0.05, floor=0.0)
    first = new_version(store, "gated", vqa_accuracy=0.5, **KEPT)
    assert promote(client, "gated", first, gate).champion

    close = new_version(store, "gated", vqa_accuracy=0.53, **KEPT)  # better, but not by the margin
    decision = promote(client, "gated", close, gate)
    assert not decision.champion and decision.previous_champion == first
    assert "does not beat" in client.get_model_version("gated", close).tags[PROMOTION_TAG]

    better = new_version(store, "gated", vqa_accuracy=0.6, text_retained=0.97, answer_ppl_ratio=1.05)
    assert promote(client, "gated", better, gate).champion
    assert str(client.get_model_version_by_alias("gated", CHAMPION).version) == better
    assert str(client.get_model_version_by_alias("gated", CHALLENGER).version) == better


def test_without_a_margin_the_newer_version_wins_a_tie_and_says_so(store, client):
    gate = GateSettings(name="tied", floor=0.0)  # min_improvement 0
    first = new_version(store, "tied", vqa_accuracy=0.5, **KEPT)
    assert promote(client, "tied", first, gate).champion
    same = new_version(store, "tied", vqa_accuracy=0.5, **KEPT)
    decision = promote(client, "tied", same, gate)
    assert decision.champion and "ties champion" in decision.reason and "beats" not in decision.reason
    worse = new_version(store, "tied", vqa_accuracy=0.49, **KEPT)
    assert not promote(client, "tied", worse, gate).champion


def test_a_version_without_the_metric_is_never_promoted(store, client):
    version = new_version(store, "unscored")
    decision = promote(client, "unscored", version, GateSettings(name="unscored"))
    assert not decision.champion and "evaluate" in decision.reason


def test_the_registered_model_answers_in_a_plain_process_without_training_code(store, client, tmp_path):
    version = new_version(store, "served", vqa_accuracy=1.0, **KEPT)
    assert promote(client, "served", version, GateSettings(name="served")).champion
    buffer = io.BytesIO()
    shapes_image(56, 56).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    script = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/served@champion')\n"
        "rows = [{'prompt': 'What colour is the square?', 'image': sys.argv[1]},\n"
        "        {'prompt': 'Hello'}]\n"
        "out = model.predict(rows, params={'max_new_tokens': 4})\n"
        "training = ('ray', 'deepspeed', 'jobs', 'pipelines')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in training)\n"
        "print(json.dumps({'answers': list(out['answer']), 'loaded': loaded}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = store[0]
    done = subprocess.run(
        [sys.executable, "-c", script, image],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["answers"]) == 2 and all(isinstance(a, str) for a in result["answers"])
    assert result["loaded"] == []


def test_the_logged_model_carries_the_hugging_face_folder_and_a_signature(store, tmp_path):
    import mlflow

    from jobs.tracking import use_tracking_uri

    with use_tracking_uri(store[0]):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=store[1], dst_path=str(tmp_path)))
        info = mlflow.models.get_model_info(store[1])
    assert (local / "artifacts" / "hf_model" / "config.json").is_file()
    assert (local / "artifacts" / "hf_model" / "model.safetensors").is_file()
    assert {c.name for c in info.signature.inputs.inputs} == {"prompt", "image", "image_bytes"}
    assert [c.name for c in info.signature.outputs.inputs] == ["answer"]
    # installable from a package index: public versions only (this machine's torch is 2.13.0+cpu, a local
    # build label no index serves)
    from importlib.metadata import version

    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in (local / "requirements.txt").read_text().split()]
    pins = {r.name: str(r.specifier).removeprefix("==") for r in requirements}
    assert {"torch", "transformers", "mlflow"} <= set(pins)
    assert not any("+" in pin for pin in pins.values()), pins
    assert pins["torch"] == version("torch").split("+")[0]


def test_predict_answers_from_the_registry_and_from_an_export(store, client, tmp_path, monkeypatch, capsys):
    from jobs.predict import main as predict

    version = new_version(store, "asked", vqa_accuracy=1.0, **KEPT)
    assert promote(client, "asked", version, GateSettings(name="asked")).champion
    image = tmp_path / "shapes.png"
    shapes_image(56, 56).save(image)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    assert predict(["--model", "models:/asked@champion", "--image", str(image), "--prompt", "Hi?"]) == 0
    from_registry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_registry["model"] == "models:/asked@champion" and isinstance(from_registry["answer"], str)

    assert predict(["--model", "models:/asked@nobody", "--prompt", "Hi?"]) == 2
    assert "nobody" in capsys.readouterr().err
    assert predict(["--model", str(tmp_path / "missing"), "--prompt", "Hi?"]) == 2


def test_registry_calls_leave_the_process_tracking_uri_alone(store, tmp_path):
    import mlflow

    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    version = new_version(store, "untouched", vqa_accuracy=1.0)
    assert version
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before


def test_a_rollback_returns_to_the_champion_each_promotion_replaced_and_is_recorded_on_both(store, client):
    from datetime import UTC, datetime

    from jobs.registry_cli import ROLLBACK_TAG, RollbackRefused, history, rollback

    gate = GateSettings(name="rolled", floor=0.0)
    first, second, third = (new_version(store, "rolled", vqa_accuracy=a, **KEPT) for a in (0.5, 0.6, 0.7))
    for version in (first, second, third):
        assert promote(client, "rolled", version, gate).champion
    previous = {v: client.get_model_version("rolled", v).tags[PREVIOUS_CHAMPION_TAG] for v in (first, third)}
    assert previous == {first: "none", third: second}

    when = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)
    record = rollback(client, "rolled", "v3 answers\nin French", by="alice", now=when)
    assert record == {
        "model": "rolled", "from": third, "to": second, "by": "alice",
        "at": "2026-12-03T10:30:00+00:00", "reason": "v3 answers in French",
    }  # fmt: skip
    assert str(client.get_model_version_by_alias("rolled", CHAMPION).version) == second
    for version in (third, second):  # the same record on both versions
        kept = json.loads(client.get_model_version("rolled", version).tags[ROLLBACK_TAG])
        assert kept == [{k: v for k, v in record.items() if k != "model"}]
    assert rollback(client, "rolled", "v2 too", by="bob")["to"] == first  # v2 replaced v1
    with pytest.raises(RollbackRefused, match="first champion"):
        rollback(client, "rolled", "and again")
    with pytest.raises(RollbackRefused, match="already the champion"):
        rollback(client, "rolled", "no-op", to=first)
    with pytest.raises(RollbackRefused, match="no version '9'"):
        rollback(client, "rolled", "typo", to="9")
    with pytest.raises(RollbackRefused, match="--reason"):
        rollback(client, "rolled", "  ", to=third)
    assert rollback(client, "rolled", "v3 was fine after all", to=third)["from"] == first

    rows = {row["version"]: row for row in history(client, "rolled")}
    assert list(rows) == [first, second, third]
    assert rows[third]["aliases"] == [CHALLENGER, CHAMPION] and rows[third]["decision"] == "promoted"
    assert rows[third]["previous_champion"] == second and rows[third]["scores"]["vqa_accuracy"] == 0.7
    assert rows[third]["reason"].startswith("vqa_accuracy 0.7000 beats champion v2")
    assert [(r["from"], r["to"]) for r in rows[third]["rollbacks"]] == [(third, second), (first, third)]
    assert [(r["from"], r["to"]) for r in rows[second]["rollbacks"]] == [(third, second), (second, first)]


def test_a_champion_crowned_before_the_previous_one_was_recorded_rolls_back_to_the_last_crowned(
    store, client
):
    from jobs.registry_cli import rollback

    gate = GateSettings(name="older", floor=0.0, min_improvement=0.05)
    first, refused, crowned = (new_version(store, "older", vqa_accuracy=a, **KEPT) for a in (0.5, 0.52, 0.6))
    for version in (first, refused, crowned):
        promote(client, "older", version, gate)
    client.delete_model_version_tag("older", crowned, PREVIOUS_CHAMPION_TAG)  # as the gate used to leave it
    assert rollback(client, "older", "older registry", by="carol")["to"] == first  # not the refused v2


def test_the_registry_command_shows_the_history_and_rolls_back(store, client, capsys):
    from jobs.registry_cli import main as registry

    gate = GateSettings(name="cli", floor=0.0)
    first, second = (new_version(store, "cli", vqa_accuracy=a, **KEPT) for a in (0.5, 0.4))
    for version in (first, second):
        promote(client, "cli", version, gate)
    config = ["--config", "tiny", "--set", f"train.tracking.uri={store[0]}", "--set", "registry.name=cli"]
    assert registry(["rollback", *config, "--reason", "nothing to go back to"]) == 2
    assert "first champion" in capsys.readouterr().err  # v1 is the champion, and was the first

    assert registry(["rollback", *config, "--to", second, "--reason", "try v2 live"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [record[k] for k in ("model", "from", "to", "reason")] == ["cli", first, second, "try v2 live"]
    assert record["by"] and record["at"].endswith("+00:00")
    assert registry(["history", *config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"v{first}  ") and "promoted" in lines[0] and "vqa_accuracy=0.5000" in lines[0]
    assert lines[1] == f"    rollback v{first} -> v{second} by {record['by']} at {record['at']}: try v2 live"
    assert lines[2].startswith(f"v{second} [challenger, champion]") and "not_promoted" in lines[2]
    assert registry(["history", *config, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["decision"] for row in rows] == ["promoted", "not_promoted"]
    assert registry(["history", "--config", "tiny", "--set", f"train.tracking.uri={store[0]}",
                     "--set", "registry.name=nobody"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == "nobody: no versions"
