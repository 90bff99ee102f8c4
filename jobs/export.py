"""Stage exports: Hugging Face folders (safetensors weights, config, processor, chat template) at a URI.

    write_export(model, processor, weights, uri, info)   rank 0, after training; `export.json` lands last
    is_export(uri)                                       True once `export.json` is there (complete)
    load_export(uri) -> (model, processor)               what the next stage, evaluation and registry use
                                                         (an adapter export's adapter merged on load)

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
from model.lora import merge_adapter, save_adapter, split_adapter
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

    Weights with LoRA adapters (model/lora.py; `info["lora"]` holds train.lora's settings and the base)
    are merged into a plain export (`export: merged`), or kept: the base weights in model.safetensors and
    the adapters in `adapter/`, peft's format (`export: adapter`). The folder is written completely before
    `export.json`, so a reader never takes a half-written export.
    """
    storage.remove(storage.join(uri, EXPORT_INFO))  # a rewrite is incomplete until its info lands
    base, adapter = split_adapter(weights)
    lora = info.get("lora") or {}
    if adapter and not lora:
        raise ValueError("weights with LoRA adapters need info['lora'] (train.lora's settings)")
    if adapter and lora["export"] == "merged":
        base, adapter = merge_adapter(base, adapter, lora["lora_alpha"] / lora["r"]), {}
    with tempfile.TemporaryDirectory(prefix="hovle-export-") as scratch:
        model.save_pretrained(scratch, state_dict=base, safe_serialization=True)
        if adapter:
            save_adapter(scratch, adapter, model._hovle_lora_config, str(lora.get("base")))
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
