"""The MLflow registry side: a stage export -> a logged pyfunc model -> a registered version -> the gate.

    uri = log_hovle_model(export_uri, run_id, tracking_uri)    # pyfunc (jobs/serving.py) + the HF folder
    version = register(uri, name, tags, scores, tracking_uri)   # + model card; tags: hashes, commit, scores
    decision = promote(client, name, version, gate)             # challenger; champion only if it wins

The gate decides from evaluation scores, never by hand. A new version always takes `challenger`; it takes
`champion` only if it kept its LLM's language (jobs/language.py: `text_retained` at least
`min_text_retained`, `answer_ppl_ratio` at most `max_answer_ppl_ratio`; a version evaluated without a base,
or against a base that answers none of the questions, has shown nothing and is refused), and then, with no
champion yet, its `metric` reaches `floor`; with one, it beats the champion's by `min_improvement` and its
`text_retained` is not lower than the champion's by more than `max_text_retained_drop`. The domain text's
perplexity (`ppl_ratio`) never decides: it improves as the LLM is overwritten by that text. The reason is
tagged on the version (`hovle.promotion`), and on a crowned version the champion it replaced
(`hovle.previous_champion`), which `hovle registry rollback` returns to (jobs/registry_cli.py).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.tracking import use_tracking_uri

logger = logging.getLogger(__name__)

HF_ARTIFACT = "hf_model"  # as jobs.serving reads it (not imported: that module registers a model on import)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVING_CODE = Path(__file__).resolve().parent / "serving.py"
CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG_PREFIX = "eval."
PROMOTION_TAG = "hovle.promotion"
PREVIOUS_CHAMPION_TAG = "hovle.previous_champion"  # on a crowned version: whom it replaced ("none")
BASE_MODEL_TAG, LICENSE_TAG = "hovle.base_model", "hovle.license"  # from the model card (jobs/model_card.py)
# What a serving environment needs; exact pins of the versions this was built with.
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "pillow",
    "numpy",
    "pandas",
    "safetensors",
    "fsspec",
)


class GateSettings(BaseModel):
    """The `registry:` section of a run config."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("hovle", description="registered model name (one per model family)")
    metric: str = Field("vqa_accuracy", description="evaluation score that decides promotion (higher wins)")
    min_improvement: float = Field(0.0, ge=0, description="margin over the champion's metric")
    floor: float = Field(0.3, ge=0, description="the first champion's metric must reach this")
    min_text_retained: float | None = Field(
        0.9, ge=0, le=1, description="language kept: share of base-right text questions still right "
        "(null: not checked, for models without language, e.g. tests' random ones)",
    )  # fmt: skip
    max_text_retained_drop: float = Field(0.05, ge=0, description="how much lower than the champion's")
    max_answer_ppl_ratio: float | None = Field(
        2.0, gt=0, description="perplexity of the base's answers, model / base (null: not checked)"
    )


@dataclass
class Decision:
    version: str
    champion: bool
    reason: str
    previous_champion: str | None


def _requirements() -> list[str]:
    """The serving packages pinned at their installed public versions: a local build label (torch's
    `+cpu`) exists on no registry, so `mlflow models serve --env-manager virtualenv` or `build-docker`
    could not install it; `torch==2.13.0` resolves to the build the serving machine's index offers."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            pins.append(f"{name}=={Version(version(name)).public}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    image = [ColSpec("string", "image", required=False), ColSpec("binary", "image_bytes", required=False)]
    inputs, outputs = Schema([ColSpec("string", "prompt"), *image]), Schema([ColSpec("string", "answer")])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 32)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _example_image() -> str:
    """A small base64 PNG (a red square on grey) for the logged model's input example."""
    from PIL import Image, ImageDraw

    from jobs.gallery import thumbnail

    image = Image.new("RGB", (64, 64), (225, 225, 225))
    ImageDraw.Draw(image).rectangle([8, 8, 40, 40], fill=(220, 30, 30))
    return thumbnail(image)  # already under the thumbnail size: the PNG as drawn


def log_hovle_model(export_uri: str, run_id: str, tracking_uri: str) -> str:
    """Log the export as a pyfunc model into `run_id`; returns its model URI (`models:/m-...`)."""
    import mlflow
    import pandas as pd

    from jobs.export import local_copy

    with use_tracking_uri(tracking_uri), tempfile.TemporaryDirectory(prefix="hovle-register-") as scratch:
        # MLflow keeps an artifact folder under its own name: copy the export to one named `hf_model`
        folder = str(Path(scratch) / HF_ARTIFACT)
        source = local_copy(export_uri, str(Path(scratch) / "download"))
        shutil.copytree(source, folder)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVING_CODE),
                artifacts={HF_ARTIFACT: folder},
                # pipelines/: storage.read_bytes, for an image named by an allowed path or URI
                code_paths=[str(REPO_ROOT / "model"), str(REPO_ROOT / "pipelines")],
                signature=signature(),
                input_example=pd.DataFrame(
                    [{"prompt": "What colour is the square?", "image": _example_image()}]
                ),
                pip_requirements=_requirements(),
            )
    logger.info("logged pyfunc model %s from %s", info.model_uri, export_uri)
    return info.model_uri


def download_hf_folder(uri: str, tracking_uri: str | None, scratch: str) -> Path:
    """Download the logged model at `uri` (runs:/..., models:/name@alias, models:/name/version) into
    `scratch` and return the path of its Hugging Face folder (which may not exist if `uri` is some other
    MLflow model). The registry is MLFLOW_REGISTRY_URI when set, else the tracking server's.

    Raises:
        MlflowException, OSError: no such model, version or alias, or the download failed.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=scratch, tracking_uri=tracking_uri, registry_uri=registry_uri
        )
    )
    # MLflow keeps an artifact under artifacts/<its folder's name>: the MLmodel file says where
    try:
        artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts") or {}
    except (MlflowException, OSError):  # no MLmodel: not a pyfunc model; callers check the default path
        artifacts = {}
    return local / artifacts.get(HF_ARTIFACT, {}).get("path", f"artifacts/{HF_ARTIFACT}")


def source_commit() -> str:
    """The commit the running code was built from: HOVLE_SOURCE_COMMIT when set (the container image
    bakes it in; a Ray runtime env uploads no .git), else this checkout's git commit (with `-dirty`
    when it has changes), else "unknown"."""
    if commit := os.environ.get("HOVLE_SOURCE_COMMIT", "").strip():
        return commit
    git = functools.partial(subprocess.run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    try:
        commit = git(["git", "rev-parse", "HEAD"], check=True).stdout.strip()
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register(
    model_uri: str, name: str, tags: dict[str, Any], scores: dict[str, float], tracking_uri: str
) -> str:
    """A new version of registered model `name` from `model_uri` (a `log_hovle_model` URI); returns the
    version number. The model first gets its card and licence (jobs/model_card.py: README.md, LICENSE)
    beside its MLmodel and in its Hugging Face folder; the version is tagged `hovle.base_model` and
    `hovle.license`.

    The registry is MLFLOW_REGISTRY_URI when set (MLflow reads it), else the tracking server's.
    """
    import mlflow

    all_tags = {k: str(v) for k, v in tags.items()}
    all_tags.update({f"{SCORE_TAG_PREFIX}{k}": repr(float(v)) for k, v in scores.items()})
    with use_tracking_uri(tracking_uri):
        card = _log_model_card(model_uri, name, all_tags, scores, tracking_uri)
        all_tags.update({BASE_MODEL_TAG: card.base_model, LICENSE_TAG: card.license})
        version = mlflow.register_model(model_uri, name, tags=all_tags)
    logger.info("registered %s version %s", name, version.version)
    return str(version.version)


def _log_model_card(
    model_uri: str, name: str, tags: dict[str, str], scores: dict[str, float], tracking_uri: str
):
    """Build the card of the logged model at `model_uri` (models:/m-...) and log README.md (+ LICENSE)
    into it: at its root and in its Hugging Face folder."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    from jobs.model_card import build_model_card

    if not model_uri.startswith("models:/m-"):
        raise ValueError(
            f"{model_uri}: expected a logged model's URI (models:/m-...), as log_hovle_model returns"
        )

    model_id, client = model_uri.removeprefix("models:/"), MlflowClient(tracking_uri)
    root = client.get_logged_model(model_id).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="hovle-card-") as scratch:
        # the card reads two small files: the weights are not downloaded back
        folder = Path(scratch) / HF_ARTIFACT
        for file in ("config.json", "export.json"):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/artifacts/{HF_ARTIFACT}/{file}", dst_path=str(folder),
                tracking_uri=tracking_uri,
            )  # fmt: skip
        card = build_model_card(folder, name, tags, scores, client)
        for path in card.write(Path(scratch) / "card"):
            client.log_model_artifact(model_id, str(path))
            client.log_model_artifact(model_id, str(path), f"artifacts/{HF_ARTIFACT}")
    return card


def version_scores(version) -> dict[str, float]:
    """The evaluation scores registered on a model version (its `eval.*` tags)."""
    return {
        k.removeprefix(SCORE_TAG_PREFIX): float(v)
        for k, v in version.tags.items()
        if k.startswith(SCORE_TAG_PREFIX)
    }


def champion_version(client, name: str):
    """The version holding the champion alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(client, name: str, version: str, gate: GateSettings) -> Decision:
    """Give `version` the challenger alias, and the champion alias if it passes the gate (see module doc)."""
    scores = version_scores(client.get_model_version(name, version))
    client.set_registered_model_alias(name, CHALLENGER, version)
    current = champion_version(client, name)
    held = version_scores(current) if current is not None else None
    champion = str(current.version) if current is not None else None
    win, reason = _verdict(scores, held, champion, gate)
    if win:
        client.set_registered_model_alias(name, CHAMPION, version)
    if win and champion != str(version):  # a resumed cycle may judge its own, already crowned, version
        # what a rollback returns to (jobs/registry_cli.py)
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, champion or "none")
    verdict = ("champion: " if win else "not promoted: ") + reason
    client.set_model_version_tag(name, version, PROMOTION_TAG, verdict)
    logger.info("%s v%s: %s", name, version, reason)
    return Decision(str(version), win, reason, champion)


def _verdict(
    scores: dict[str, float], held: dict[str, float] | None, champion: str | None, gate: GateSettings
) -> tuple[bool, str]:
    """(promote?, why) for a candidate's `scores` against the champion's (`held`; None: no champion)."""
    metric = scores.get(gate.metric)
    if metric is None:
        return False, f"no {gate.metric} score on the version: evaluate before promoting"
    language = _language_problem(scores, gate)
    if language:
        return False, f"language preservation: {language}"
    if held is None:
        if metric < gate.floor:
            return False, f"no champion yet and {gate.metric} {metric:.4f} is under the floor {gate.floor}"
        return True, f"first champion: {gate.metric} {metric:.4f} >= floor {gate.floor}"
    best = held.get(gate.metric, float("-inf"))
    if metric < best + gate.min_improvement:
        return False, (
            f"{gate.metric} {metric:.4f} does not beat champion v{champion}'s {best:.4f} "
            f"by {gate.min_improvement}"
        )
    kept, held_kept = scores.get("text_retained"), held.get("text_retained")
    if gate.min_text_retained is not None and held_kept is not None and not math.isnan(held_kept):
        if kept < held_kept - gate.max_text_retained_drop:
            return False, (
                f"language preservation: text_retained {kept:.4f} is lower than champion v{champion}'s "
                f"{held_kept:.4f} by more than {gate.max_text_retained_drop}"
            )
    if metric == best:  # only with min_improvement 0: the newer version takes a tie
        return True, f"{gate.metric} {metric:.4f} ties champion v{champion}'s; the newer version wins a tie"
    return True, f"{gate.metric} {metric:.4f} beats champion v{champion}'s {best:.4f}"


def _language_problem(scores: dict[str, float], gate: GateSettings) -> str | None:
    """Why `scores` show a model that lost (or never showed) its LLM's language; None when it kept it."""
    if gate.min_text_retained is not None:
        kept = scores.get("text_retained")
        if kept is None:
            return "not measured (evaluate with --base, the untrained preset or the base LLM's model)"
        if math.isnan(kept):
            return "the base answers none of the general text questions right: nothing shows it was kept"
        if kept < gate.min_text_retained:
            return f"text_retained {kept:.4f} is under {gate.min_text_retained}"
    ratio = scores.get("answer_ppl_ratio")
    if gate.max_answer_ppl_ratio is not None and ratio is not None and ratio > gate.max_answer_ppl_ratio:
        return f"answer_ppl_ratio {ratio:.4f} is over {gate.max_answer_ppl_ratio}"
    return None
