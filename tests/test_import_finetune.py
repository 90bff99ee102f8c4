"""Instruction-tuning an imported model: `hovle import hovle` -> a run config extending the imported folder's
model.yaml, `retrain.stages: instruct` and `retrain.init: <imported folder>` -> prepare (the imported
processor) -> train instruct from the imported weights -> evaluate -> register -> a model that answers.
`hovle train --init <imported folder>` takes the same folder, checked the same way (jobs/init_model.py).

Real Ray, DeepSpeed (2 CPU workers), MLflow (SQLite); the tiny released-layout checkpoint of
tests/data/golden/hovle; few steps.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from jobs import importer
from jobs.retrain import main as retrain_main
from jobs.run_config import load_run_config
from jobs.train import main as train_main
from jobs.train import plan_run
from pipelines.corpora.synthetic import generate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

GOLDEN = Path(__file__).parent / "data" / "golden" / "hovle" / "checkpoint"
NAME = "hovle-imported"


def run(config: Path) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = retrain_main(["--config", str(config)])
    return status, json.loads(out.getvalue().strip().splitlines()[-1])  # every outcome ends with its JSON


def write_config(root: Path, imported: Path, **retrain) -> Path:
    """The user's run config: the imported model (extends its model.yaml), instruct only, from its weights."""
    raw = generate("instruct", 8, seed=0, output_dir=root / "raw" / "instruct", image_size=56)
    held_out = generate("instruct", 4, seed=7, output_dir=root / "heldout", image_size=56)
    text = generate("distill", 4, seed=7, output_dir=root / "heldout-text", image_size=56)
    text = text.with_name("text.jsonl")
    document = {
        "extends": str(imported / "model.yaml"),
        "data": {"max_tokens": 256, "val_fraction": 0.0},
        "train": {
            "storage_path": str(root / "runs"),
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every_n_steps": 100, "keep_last": 1},
            "log_every_n_steps": 2,
            "data": {"reader": "local"},
            "stages": {
                # the released image path kept as it is: the embedding module frozen, the LLM tuned
                "instruct": {
                    "steps": 2,
                    "lr": 1.0e-3,
                    "warmup_steps": 1,
                    "micro_batch_size": 2,
                    "max_tokens": 256,
                    "frozen": ["embedding."],
                },
            },
        },
        "retrain": {
            "raw": {"instruct": [str(raw)]},
            "prepared": str(root / "prepared"),
            "stages": "instruct",
            "init": str(imported),
            **retrain,
        },
        "eval": {"data": str(held_out), "text": str(text), "max_samples": 2, "max_new_tokens": 4},
        # a tiny random model has no skills: this checks the path, not the gate's floors (test_registry does)
        "registry": {"name": NAME, "floor": 0.0, "min_text_retained": None},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-finetune")
    imported = root / "imported"
    assert importer.main(["hovle", "--from", str(GOLDEN), "--to", str(imported)]) == 0
    config = write_config(root, imported)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        status, summary = run(config)
    return root, imported, config, status, summary


def test_the_run_config_extends_the_imported_model_and_its_processor(cycle):
    _, imported, config, _, _ = cycle
    run = load_run_config(str(config))
    assert run.model.llm.tokenizer == str(imported) and run.model.llm.chat_template == "own"
    assert run.retrain.init == str(imported)


def test_the_instruct_stage_starts_from_the_imported_weights(cycle):
    root, imported, _, status, summary = cycle
    assert status == 0 and summary["status"] == "promoted", summary
    export = Path(summary["export"])
    assert export.name == "instruct" and not (export.parent / "align").exists()  # instruct only
    info = json.loads((export / "export.json").read_text())
    start = Path(info["init"])
    assert start.parent == root / "runs" / "retrain"
    assert json.loads((start / "export.json").read_text())["base_model"] == str(imported)
    base, tuned = load_file(str(imported / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert set(tuned) == set(base)
    frozen = [k for k in base if k.startswith("embedding.")]
    trained = [k for k in base if k.startswith("language_model.")]
    assert frozen and trained
    for key in frozen:  # not trained: bit-identical to the imported (not random, not the preset's)
        assert torch.equal(tuned[key], base[key]), key
    assert sum(not torch.equal(tuned[k], base[k]) for k in trained) > len(trained) // 2


def test_the_cycle_evaluates_and_registers_a_version_whose_card_names_the_imported_base(cycle, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from jobs.tracking import use_tracking_uri

    root, imported, _, _, summary = cycle
    assert summary["version"] == "1" and "vqa_accuracy" in summary["scores"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == "1"
    assert version.tags["hovle.base_model"] == str(imported)
    assert "eval.vqa_accuracy" in version.tags
    assert "vqa_accuracy" in client.get_run(summary["mlflow_run_id"]).data.metrics
    with use_tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path)))
    card = (local / "README.md").read_text()
    assert f"base_model: {imported}" in card and "randomly initialised" not in card


def test_the_registered_model_answers_through_pyfunc(cycle):
    import mlflow

    from jobs.tracking import use_tracking_uri

    # in this process (tests/test_registry.py checks a plain process loads no training code)
    with use_tracking_uri(f"sqlite:///{cycle[0] / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict([{"prompt": "What is in the picture?"}], params={"max_new_tokens": 4})
    answers = list(out["answer"])
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.parametrize(
    "retrain, problem",
    [
        ({"init": "NOT_A_MODEL"}, "is not a model folder (no config.json"),
        ({"stages": "all"}, "goes with retrain.stages: instruct"),
        ({"extends": "tiny"}, "is another model than the `model:` section's"),  # forgot to extend it
    ],
)
def test_a_bad_init_is_a_config_error_naming_the_field(tmp_path, retrain, problem):
    imported = tmp_path / "imported"
    assert importer.main(["hovle", "--from", str(GOLDEN), "--to", str(imported)]) == 0
    if retrain.get("init") == "NOT_A_MODEL":
        retrain["init"] = str(tmp_path / "raw")  # a folder, but of data
    extends = retrain.pop("extends", None)
    config = write_config(tmp_path, imported, **retrain)
    if extends:
        config.write_text(config.read_text().replace(str(imported / "model.yaml"), extends))
    status, summary = run(config)
    assert status == 2 and summary["status"] == "bad_config"
    assert "retrain.init" in summary["reason"] and problem in summary["reason"]
    assert not (tmp_path / "prepared").exists()  # refused before anything was prepared


def test_train_init_takes_the_imported_folder_copied_once_onto_the_runs_storage(cycle, monkeypatch):
    root, imported, config, _, summary = cycle
    monkeypatch.chdir(root)
    prepared, exports = root / "prepared" / "instruct", Path(summary["export"]).parent
    # the CLI: accepted; the instruct export under --output is the cycle's, so no stage trains again
    argv = ["--config", str(config), "--stage", "instruct", "--init", str(imported), "--data", str(prepared)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_main([*argv, "--run-name", "cli", "--output", str(exports)]) == 0
    assert json.loads(out.getvalue().strip().splitlines()[-1])["exports"] == {"instruct": summary["export"]}
    [start] = (root / "runs" / "cli").glob("init-*")
    assert json.loads((start / "export.json").read_text()) == {
        "stage": "import", "base_model": str(imported), "steps": 0
    }  # fmt: skip
    assert (start / "model.safetensors").read_bytes() == (imported / "model.safetensors").read_bytes()
    # the plan: the stage starts from that copy, made once (a rerun reuses it)
    written = (start / "export.json").stat().st_mtime_ns
    run = load_run_config(str(config), {"train.run_name": "cli"})
    plan, init, model = plan_run(run, "instruct", str(prepared), str(imported), None)
    assert init == str(start) and (start / "export.json").stat().st_mtime_ns == written
    assert [(name, uri) for name, uri, *_ in plan] == [("instruct", str(prepared))]
    assert model == json.loads((imported / "config.json").read_text())


@pytest.mark.parametrize(
    "init, config, problem",
    [
        ("raw", None, "is not a model folder (no config.json"),  # a folder, but of data
        ("imported", "tiny", "is another model than the `model:`"),  # a run config not extending it
    ],
)
def test_a_bad_train_init_exits_2_naming_init_before_ray_starts(
    cycle, tmp_path, monkeypatch, capsys, init, config, problem
):
    import ray

    root, _, run_config, _, _ = cycle
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a bad --init"))
    argv = ["--config", config or str(run_config), "--stage", "instruct", "--init", str(root / init)]
    status = train_main([*argv, "--data", str(root / "prepared" / "instruct"), "--run-name", "bad"])
    err = capsys.readouterr().err
    assert status == 2 and f"--init: {root / init} " in err and problem in err, err
    assert not list(root.glob("runs/bad*")) and not list(tmp_path.glob("runs/bad*"))  # nothing copied
