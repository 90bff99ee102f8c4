"""The model card and licence of a registered version: README.md (+ LICENSE) beside its MLmodel.

    card = build_model_card(export_folder, name, tags, scores, client)   # the export and its init chain
    card.write(folder)                                                   # README.md, LICENSE when known

The card says what a user of the version must know: the base LLM (its source path or name) and its
licence, the data each stage trained on (dataset URI, the manifest's sha256, rows), the stages with their
settings (the run config's `train.stages.<stage>` as the pipeline's MLflow run logged it, and `train.lora`),
the evaluation scores and the source commit. The licence is looked up where the LLM came from: a LICENSE
file in its folder, the `license` field of its README front matter or config.json, or, for a
`package://NAME` path, the installed distribution's License metadata and licence file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
UNKNOWN = "unknown"
MAX_CHAIN = 8  # exports followed through their `init` links (a stage chain is three long)


@dataclass
class ModelCard:
    text: str
    base_model: str
    license: str = UNKNOWN
    license_text: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    def write(self, folder: str | Path) -> list[Path]:
        """README.md (and LICENSE when the licence text is known) into `folder`; returns the files."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        texts = {Path(folder) / "README.md": self.text, Path(folder) / "LICENSE": self.license_text}
        for path, text in texts.items():
            if text:
                path.write_text(text)
        return [path for path, text in texts.items() if text]


def llm_license(source: str | None) -> tuple[str, str | None, str]:
    """(licence name, licence text or None, where it was found) of the LLM at `source` (a local folder, a
    `package://NAME[/sub]` path, or None for a randomly initialised LLM)."""
    if not source:
        return UNKNOWN, None, "no source LLM (random init)"
    from model.presets import resolve_path

    try:
        folder = Path(resolve_path(source))
    except FileNotFoundError as err:
        return UNKNOWN, None, str(err)
    name, text, where = _folder_license(folder) if folder.is_dir() else (None, None, "")
    if source.startswith("package://") and (name is None or text is None):
        package_name, package_text, where = _package_license(source.removeprefix("package://").split("/")[0])
        name, text = name or package_name, text or package_text
    return name or UNKNOWN, text, where or f"nothing in {folder}"


def _folder_license(folder: Path) -> tuple[str | None, str | None, str]:
    text = next((f.read_text() for f in (folder / n for n in LICENSE_FILES) if f.is_file()), None)
    name = _front_matter(folder / "README.md").get("license")
    config = folder / "config.json"
    if name is None and config.is_file():
        name = json.loads(config.read_text()).get("license")
    return (str(name) if name else None), text, f"{folder}" if (name or text) else ""


def _front_matter(readme: Path) -> dict[str, Any]:
    text = readme.read_text() if readme.is_file() else ""
    parts = text.split("---", 2) if text.startswith("---") else []
    try:
        matter = yaml.safe_load(parts[1]) if len(parts) == 3 else None
    except yaml.YAMLError:
        matter = None
    return matter if isinstance(matter, dict) else {}


def _package_license(module: str) -> tuple[str | None, str | None, str]:
    """The licence of the installed distribution that provides import package `module`."""
    from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

    for dist_name in packages_distributions().get(module, []):
        try:
            dist = distribution(dist_name)
        except PackageNotFoundError:
            continue
        name = dist.metadata.get("License-Expression") or dist.metadata.get("License")
        files = [f for f in dist.files or [] if Path(str(f)).name.upper().startswith("LICENSE")]
        text = files[0].read_text() if files else None
        return name, text, f"the {dist_name} {dist.version} distribution's metadata"
    return None, None, f"no installed distribution provides {module}"


def export_chain(info: dict[str, Any]) -> list[dict[str, Any]]:
    """An export's export.json (`info`) and those of the exports it started from (`init`), first stage
    first; an export that can no longer be read ends the chain."""
    from jobs.export import ExportNotFound, read_export_info

    chain = [info]
    while chain[-1].get("init") and len(chain) < MAX_CHAIN:
        try:
            chain.append(read_export_info(chain[-1]["init"]))
        except (ExportNotFound, OSError, ValueError):
            break
    return chain[::-1]


def data_version(uri: str) -> dict[str, Any]:
    """{uri, manifest_sha256, rows} of a prepared dataset (the manifest lists every shard's sha256)."""
    from pipelines import storage
    from pipelines.manifest import MANIFEST, ShardManifest

    try:
        text = storage.read_text(storage.join(uri, MANIFEST))
        rows = ShardManifest.from_json(text).totals().get("written")
    except (OSError, ValueError):  # gone, or not a manifest this version reads
        return {"uri": uri, "manifest_sha256": UNKNOWN, "rows": None}
    return {"uri": uri, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": rows}


def stage_settings(client, run_id: str | None, stage: str) -> dict[str, Any]:
    """`stages.<stage>.*` and `lora.*` as the stage's pipeline (parent) run logged them; {} when unknown."""
    if client is None or not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        params = client.get_run(parent).data.params if parent else {}
    except MlflowException:
        return {}
    prefix = f"stages.{stage}."
    return {k.removeprefix(prefix): v for k, v in sorted(params.items()) if k.startswith(prefix)} | {
        k: v for k, v in sorted(params.items()) if k.startswith("lora.") or k == "lora"
    }


def build_model_card(
    export_folder: str | Path, name: str, tags: dict[str, Any], scores: dict[str, float], client=None
) -> ModelCard:
    """The card of the export in `export_folder` (a local folder), to be registered as `name` with `tags`
    (hovle.source_commit, hovle.config_hash, ...) and evaluation `scores`; `client` (MLflow) finds each
    stage's settings."""
    config = json.loads((Path(export_folder) / "config.json").read_text())
    chain = export_chain(json.loads((Path(export_folder) / "export.json").read_text()))
    # a model started from an imported folder (retrain.init: its export.json's `base_model`) names it
    source = config.get("llm_name_or_path") or chain[0].get("base_model")
    gguf = config.get("llm_gguf_file")
    base = f"{source} ({gguf})" if source and gguf else source or "none: randomly initialised LLM"
    licence, licence_text, found_in = llm_license(source)
    stages = [
        {
            "stage": info.get("stage", "?"),
            "steps": info.get("steps"),
            "tokens": info.get("tokens"),
            "data": data_version(info["data"]) if info.get("data") else None,
            "lora": info.get("lora"),
            "settings": stage_settings(client, info.get("run_id"), info.get("stage", "?")),
        }
        for info in chain
    ]
    text = _render(name, config, base, licence, found_in, bool(licence_text), stages, tags, scores)
    return ModelCard(text, base, licence, licence_text, stages)


def _render(name, config, base, licence, found_in, has_text, stages, tags, scores) -> str:
    front = {
        "license": licence,
        "base_model": base,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["hovle", config.get("model_type", "hovle")],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"A {config.get('model_type')} vision-language model trained by the HoVLE platform.",
        "",
        "## Base model",
        "",
        f"- LLM: `{base}` ({config.get('text_config', {}).get('model_type', '?')})",
        f"- licence: **{licence}** (from {found_in})" + ("; its text is in LICENSE" if has_text else ""),
        "",
        "## Training",
        "",
        "| stage | steps | tokens | LoRA | settings |",
        "|---|---|---|---|---|",
    ]
    for s in stages:
        lora = s["lora"]
        lora_text = f"r={lora['r']}, alpha={lora['lora_alpha']}, {lora['export']}" if lora else "no"
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if not k.startswith("lora"))
        lines.append(f"| {s['stage']} | {s['steps']} | {s['tokens']} | {lora_text} | {settings or '-'} |")
    lines += ["", "## Data", "", "| stage | dataset | manifest sha256 | rows |", "|---|---|---|---|"]
    for s in stages:
        if s["data"]:
            d = s["data"]
            lines.append(f"| {s['stage']} | `{d['uri']}` | `{d['manifest_sha256']}` | {d['rows']} |")
    lines += ["", "## Evaluation", "", "| score | value |", "|---|---|"]
    lines += [f"| {k} | {float(v):.4f} |" for k, v in sorted(scores.items())]
    lines += ["", "## Provenance", ""]
    for key in ("hovle.source_commit", "hovle.config_hash", "hovle.run_name"):
        lines.append(f"- {key.removeprefix('hovle.')}: `{tags.get(key, UNKNOWN)}`")
    return "\n".join(lines) + "\n"
