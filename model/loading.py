"""Load any vision-language model this package defines from a saved folder, by its config's model_type.

    load_pretrained(folder, dtype=..., keep_adapter=False) -> HoVLEForConditionalGeneration | CompositionalVLM

Both classes are registered with transformers' Auto classes on import, so this is
`AutoModelForImageTextToText.from_pretrained` restricted to this package's model types (no remote code),
from safetensors only (a pickled `pytorch_model.bin` is never read). A folder with a LoRA adapter
(`<folder>/adapter`, model/lora.py) gets it applied: merged into the weights, or kept as live LoRA layers.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForImageTextToText, PreTrainedModel

from model.compositional import MODEL_TYPE as COMPOSITIONAL_MODEL_TYPE
from model.config import HoVLEConfig
from model.lora import apply_saved_adapter, has_adapter

MODEL_TYPES = (HoVLEConfig.model_type, COMPOSITIONAL_MODEL_TYPE)


def saved_model_type(folder: str | Path) -> str:
    """The model_type in `folder`'s config.json.

    Raises:
        FileNotFoundError: no config.json in `folder`.
    """
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")


def load_pretrained(folder: str | Path, keep_adapter: bool = False, **kwargs) -> PreTrainedModel:
    """The HoVLE or compositional model saved in `folder` (`from_pretrained` kwargs such as `dtype` pass on),
    its LoRA adapter (if any) merged, or kept as LoRA layers with `keep_adapter` (needs peft).

    Raises:
        FileNotFoundError: no config.json in `folder`.
        OSError: no model.safetensors (weights load from safetensors only).
        ValueError: the folder holds another kind of model, or an adapter this package cannot apply.
    """
    model_type = saved_model_type(folder)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{folder} holds a {model_type!r} model: expected one of {MODEL_TYPES}")
    model = AutoModelForImageTextToText.from_pretrained(
        str(folder), use_safetensors=True, trust_remote_code=False, **kwargs
    )
    return apply_saved_adapter(model, folder, keep_adapter) if has_adapter(folder) else model


__all__ = ["MODEL_TYPES", "load_pretrained", "saved_model_type"]
