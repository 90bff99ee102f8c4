"""HoVLE: a monolithic vision-language model (holistic embedding module + LLM). Pure PyTorch + transformers.

The package's names load on first use (PEP 562), so a process that only needs the processor (a Ray Data
preprocessing actor: `model.processor`, `model.tokenizer`) imports neither torch nor transformers'
modelling code; that start-up (~3 s on 2 cores) would otherwise be paid by every actor.

Importing `model.modeling` - which using any of the package's model names does, e.g.
`from model import HoVLEForConditionalGeneration` - registers model_type "hovle" with transformers' Auto
classes, so `AutoModelForImageTextToText.from_pretrained(export_dir)` works without `trust_remote_code`;
`model.compositional` registers the compositional baseline ("hovle-compositional") the same way, and
`model.load_pretrained(folder)` loads either, by the folder's model_type.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CompositionalConfig": "model.compositional",
    "CompositionalVLM": "model.compositional",
    "ConfigError": "model.config",
    "HoVLEConfig": "model.config",
    "HolisticEmbedding": "model.embedding",
    "ImageTokenMismatch": "model.embedding",
    "HoVLECache": "model.modeling",
    "HoVLEForConditionalGeneration": "model.modeling",
    "HoVLEOutput": "model.modeling",
    "register_auto_classes": "model.modeling",
    "load_pretrained": "model.loading",
    "build_model": "model.presets",
    "build_processor": "model.presets",
    "load_preset": "model.presets",
    "HoVLEProcessor": "model.processor",
    "ImagePlaceholderMismatch": "model.processor",
    "STAGES": "model.stages",
    "StageSpec": "model.stages",
    "apply_stage": "model.stages",
    "stage_loss": "model.losses",
    "stage_spec": "model.stages",
    "stages_for": "model.stages",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors: the names, eagerly
    from model.compositional import CompositionalConfig, CompositionalVLM  # noqa: F401
    from model.config import ConfigError, HoVLEConfig  # noqa: F401
    from model.embedding import HolisticEmbedding, ImageTokenMismatch  # noqa: F401
    from model.loading import load_pretrained  # noqa: F401
    from model.losses import stage_loss  # noqa: F401
    from model.modeling import HoVLECache, HoVLEForConditionalGeneration, HoVLEOutput, register_auto_classes  # noqa: F401
    from model.presets import build_model, build_processor, load_preset  # noqa: F401
    from model.processor import HoVLEProcessor, ImagePlaceholderMismatch  # noqa: F401
    from model.stages import STAGES, StageSpec, apply_stage, stage_spec, stages_for  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
