"""Scheduled retraining end to end on the tiny preset: prepare -> train -> evaluate -> register -> gate.

Real Ray, DeepSpeed (2 CPU workers), MLflow (SQLite) and the storage lock; few steps per stage.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from jobs.retrain import LOCKED
from jobs.retrain import main as retrain_main
from model.config_files import CONFIG_DIR
from pipelines.corpora.synthetic import generate
from tests import faults
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def run(config: Path, *extra: str) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = retrain_main(["--config", str(config), *extra])
    lines = out.getvalue().strip().splitlines()
    return status, json.loads(lines[-1])  # every outcome ends with its JSON line


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run config (tiny model + train + retrain + registry) over fresh raw corpora; the working folder."""
    root = tmp_path_factory.mktemp("retrain")
    raw = {}
    for stage in ("distill", "align", "instruct"):
        jsonl = generate(stage, 16, seed=0, output_dir=root / "raw" / stage, image_size=56)
        raw[stage] = [str(jsonl)] + ([str(jsonl.parent / "text.jsonl")] if stage == "distill" else [])
    held_out = generate("instruct", 4, seed=7, output_dir=root / "heldout", image_size=56)
    text = generate("distill", 4, seed=7, output_dir=root / "heldout-text", image_size=56)
    text = text.with_name("text.jsonl")
    document = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    document["data"] = {"max_tokens": 256, "val_fraction": 0.0}
    document["train"]["storage_path"] = str(root / "runs")
    for stage in document["train"]["stages"].values():
        stage["steps"] = 4  # logged and checkpointed at steps 2 and 4
    # relative, the way a person types it: Ray's workers do not run in this folder
    document["retrain"] = {"raw": raw, "prepared": "prepared"}
    document["eval"] = {"data": str(held_out), "text": str(text), "max_samples": 4}
    # a tiny random model has no language to keep nor skills: this test checks the cycle, not the gate's
    # floors (tests/test_registry.py does), so they are lowered here
    document["registry"] = {"name": "hovle-test", "floor": 0.0, "min_text_retained": None}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(document))
    return config, root


@pytest.fixture(scope="module")
def first_cycle(setup):
    config, root = setup
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        return run(config)


def test_a_cycle_trains_evaluates_registers_and_crowns_the_first_champion(setup, first_cycle):
    from mlflow import MlflowClient

    config, root = setup
    status, summary = first_cycle
    assert status == 0 and summary["status"] == "promoted"
    assert summary["version"] == "1" and summary["promoted"] is True
    assert "vqa_accuracy" in summary["scores"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("hovle-test", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["hovle.data_version"] == summary["data_version"]
    assert "eval.vqa_accuracy" in champion.tags and champion.tags["hovle.source_commit"]
    parent = client.get_run(summary["mlflow_run_id"])
    assert "vqa_accuracy" in parent.data.metrics  # the evaluation logged into the pipeline run


STAGES = ("distill", "align", "instruct")


def stage_exports(root: Path, summary: dict) -> dict[str, Path]:
    exports = root / "runs" / f"retrain-{summary['data_version']}" / "exports"
    return {stage: exports / stage for stage in STAGES}


def export_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# The first cycle trains all three stages through `hovle train`'s job (Ray Train, ZeRO-2, 2 workers): what
# the stages leave is checked on it rather than on a second three-stage run.
def test_three_stages_end_in_an_export_that_loads_and_generates_without_ray(setup, first_cycle):
    _, root = setup
    exports = stage_exports(root, first_cycle[1])
    assert all((folder / "model.safetensors").is_file() for folder in exports.values())
    script = (
        "import sys, torch\n"
        "from model import HoVLEForConditionalGeneration, HoVLEProcessor\n"
        f"model = HoVLEForConditionalGeneration.from_pretrained({str(exports['instruct'])!r})\n"
        f"processor = HoVLEProcessor.from_pretrained({str(exports['instruct'])!r})\n"
        "inputs = processor([{'role': 'user', 'content': 'hello'}], add_generation_prompt=True)\n"
        "out = model.generate(input_ids=inputs['input_ids'], attention_mask=inputs['attention_mask'], "
        "max_new_tokens=4, min_new_tokens=4)\n"
        "assert out.shape[1] == inputs['input_ids'].shape[1] + 4\n"
        "assert not {m.split('.')[0] for m in sys.modules} & {'ray', 'deepspeed'}, 'ray/deepspeed imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_align_leaves_the_llm_bit_identical_and_trains_the_embedding(setup, first_cycle):
    from model import build_model, load_preset

    _, root = setup
    exports = stage_exports(root, first_cycle[1])
    torch.manual_seed(0)  # the workers build the preset's random weights from train.seed
    base = build_model(load_preset("tiny")).state_dict()
    distill, align = export_weights(exports["distill"]), export_weights(exports["align"])
    llm = [k for k in base if k.startswith("language_model.") and k in align]
    assert llm
    for key in llm:
        assert torch.equal(align[key], base[key]), key
        assert torch.equal(distill[key], base[key]), key
    embedding = [k for k in align if k.startswith("embedding.")]
    assert any(not torch.equal(align[k], distill[k]) for k in embedding)
    instruct = export_weights(exports["instruct"])
    assert any(not torch.equal(instruct[k], align[k]) for k in llm)  # instruct trains the LLM


def test_mlflow_holds_one_parent_with_three_stage_runs(setup, first_cycle):
    from mlflow import MlflowClient

    _, root = setup
    parent_id = first_cycle[1]["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hovle").experiment_id])
    parents = [r for r in runs if r.data.tags.get("hovle.kind") == "pipeline"]
    assert [p.info.run_id for p in parents] == [parent_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    staged = [r for r in children if "hovle.stage" in r.data.tags]
    assert sorted(r.data.tags["hovle.stage"] for r in staged) == sorted(STAGES)
    for child in staged:
        assert child.info.status == "FINISHED"
        for metric in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_fraction"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert [m.step for m in history] == [2, 4], metric
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "data_manifest.json"} <= artifacts
    assert parents[0].data.params["stages.align.lr"] == "0.001"
    logged = {k for c in staged for k in client.get_run(c.info.run_id).data.metrics}
    assert "system/cpu_utilization_percentage" in logged


def test_nothing_new_exits_zero_without_training(setup, first_cycle, monkeypatch):
    config, root = setup
    monkeypatch.chdir(root)
    status, summary = run(config)
    assert status == 0 and summary["status"] == "nothing_to_do"
    assert summary["data_version"] == first_cycle[1]["data_version"]


def test_a_held_lock_stops_a_second_run_and_a_stale_one_is_taken_over(
    setup, first_cycle, monkeypatch, capsys
):
    config, root = setup
    monkeypatch.chdir(root)
    lock = root / "runs" / "retrain" / "lock.json"
    lock.write_text(json.dumps({"token": "other", "host": "elsewhere", "pid": 1, "time": time.time()}))
    status, line = run(config)
    assert status == LOCKED and line["status"] == "locked" and "another run holds" in line["reason"]
    assert "another run holds" in capsys.readouterr().err
    lock.write_text(json.dumps({"token": "dead", "host": "elsewhere", "pid": 1, "time": time.time() - 10**6}))
    status, summary = run(config)
    assert status == 0 and summary["status"] == "nothing_to_do"
    assert not lock.exists()  # released


def test_new_data_fine_tunes_the_champion_in_a_cycle_that_continues_after_a_crash(
    setup, first_cycle, monkeypatch
):
    config, root = setup
    monkeypatch.chdir(root)
    more = generate("instruct", 8, seed=3, output_dir=root / "raw" / "instruct-more", image_size=56)
    document = yaml.safe_load(config.read_text())
    document["retrain"]["raw"]["instruct"].append(str(more))
    document["retrain"]["stages"] = "instruct"  # fine-tune the champion on the new data
    document["train"]["max_failures"] = 0
    document["train"]["checkpoint"]["every_n_steps"] = 1
    document["retrain"]["retention"] = {"keep_cycles": 1}  # after this cycle: its files and the champion's
    config.write_text(yaml.safe_dump(document))

    # the last rank dies at step 2, after the step-1 checkpoint; the job fails (max_failures 0)
    monkeypatch.setenv("HOVLE_HOOKS", faults.spec("kill_last_rank_at_step_2"))
    status, line = run(config)
    assert status == 1 and line["status"] == "failed" and line["reason"]
    monkeypatch.delenv("HOVLE_HOOKS")
    status, summary = run(config)
    assert status == 0 and summary["status"] in ("promoted", "not_promoted")
    assert summary["data_version"] != first_cycle[1]["data_version"]
    assert summary["version"] == "2" and "reason" in summary
    exports = root / "runs" / f"retrain-{summary['data_version']}" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["instruct"]
    info = json.loads((exports / "instruct" / "export.json").read_text())
    assert info["resumed_from_step"] == 1  # the rerun went on from the crashed run's checkpoint
    # it started from the champion's registered export, copied to the shared storage every node reads
    # (not a folder on the driver's node); the copy says which version it is
    assert info["init"] == str(root / "runs" / "retrain" / "champion-v1"), info["init"]
    assert (root / "runs" / "retrain" / "champion-v1" / "_COPIED").read_text() == "models:/hovle-test/1\n"

    # retention, once the cycle is done: the first cycle's checkpoints go; the champion's lineage stays
    runs, first = root / "runs", first_cycle[1]["data_version"]
    assert summary["retention_removed"]
    assert not any((runs / f"retrain-{first}-{stage}").exists() for stage in ("distill", "align", "instruct"))
    assert (runs / f"retrain-{summary['data_version']}-train").is_dir()  # the cycle that just ran
    # the champion's lineage runs through the first cycle's exports either way: v1 is them, and v2 started
    # from v1's copy, whose export.json leads on to v1's align and distill exports
    assert (runs / "retrain" / "champion-v1" / "export.json").is_file()
    for stage in ("distill", "align", "instruct"):
        assert (runs / f"retrain-{first}" / "exports" / stage / "export.json").is_file()
