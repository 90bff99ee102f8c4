"""Stage exports: Hugging Face folders (safetensors weights, config, processor, chat template) at a URI.

    write_export(model, processor, weights, uri, info)   rank 0, after training; `export.json` lands last
    is_export(uri)                                       True once `export.json` is there (complete)
    load_export(uri) -> (model, processor)               what the next stage, evaluation and registry use

An export loads with `HoVLEForConditionalGeneration.from_pretrained(folder)` (a compositional model's with
`CompositionalVLM.from_pretrained`; `model.load_pretrained` picks by model_type) and nothing of Ray or
DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from typing import Any

import torch

from model import HoVLEForConditionalGeneration, HoVLEProcessor, load_pretrained
from pipelines import storage

logger = logging.getLogger(__name__)

EXPORT_INFO = "export.json"


class ExportNotFound(FileNotFoundError):
    """No complete export at the URI (no export.json: never written, or the writer died midway)."""


def is_export(uri: str) -> bool:
    return storage.exists(storage.join(uri, EXPORT_INFO))


def read_export_info(uri: str) -> dict[str, Any]:
    if not is_export(uri):
        raise ExportNotFound(f"no complete export at {uri} ({EXPORT_INFO} missing)")
    return json.loads(storage.read_text(storage.join(uri, EXPORT_INFO)))


def write_export(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    weights: dict[str, torch.Tensor],
    uri: str,
    info: dict[str, Any],
) -> None:
    """Save `model`'s config with `weights` (a full state dict) and the processor to `uri`.

    The folder is written completely before `export.json`, so a reader never takes a half-written export.
    """
    storage.remove(storage.join(uri, EXPORT_INFO))  # a rewrite is incomplete until its info lands
    with tempfile.TemporaryDirectory(prefix="hovle-export-") as scratch:
        model.save_pretrained(scratch, state_dict=weights, safe_serialization=True)
        processor.save_pretrained(scratch)
        storage.put_directory(scratch, uri)
    storage.write_text_atomic(storage.join(uri, EXPORT_INFO), json.dumps(info, indent=2, sort_keys=True))
    logger.info("exported %s to %s", info.get("stage", "model"), uri)


def local_copy(uri: str, scratch: str) -> str:
    """A local folder holding the export at `uri` (itself when local; else downloaded into `scratch`)."""
    if not storage.is_remote(uri):
        return uri.removeprefix("file://")
    storage.get_directory(uri, scratch)
    return scratch


def load_export(uri: str, dtype: torch.dtype = torch.float32) -> tuple[HoVLEForConditionalGeneration, Any]:
    """(model, processor) from a complete export (local or s3://), HoVLE or compositional.

    Raises:
        ExportNotFound: no export.json at `uri`.
    """
    read_export_info(uri)
    with tempfile.TemporaryDirectory(prefix="hovle-export-") as scratch:
        folder = local_copy(uri, scratch)
        model = load_pretrained(folder, dtype=dtype)
        processor = HoVLEProcessor.from_pretrained(folder)
    return model, processor
