"""Load any vision-language model this package defines from a saved folder, by its config's model_type.

    load_pretrained(folder, dtype=...) -> HoVLEForConditionalGeneration | CompositionalVLM

Both classes are registered with transformers' Auto classes on import, so this is
`AutoModelForImageTextToText.from_pretrained` restricted to this package's model types (no remote code).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForImageTextToText, PreTrainedModel

from model.compositional import MODEL_TYPE as COMPOSITIONAL_MODEL_TYPE
from model.config import HoVLEConfig

MODEL_TYPES = (HoVLEConfig.model_type, COMPOSITIONAL_MODEL_TYPE)


def saved_model_type(folder: str | Path) -> str:
    """The model_type in `folder`'s config.json.

    Raises:
        FileNotFoundError: no config.json in `folder`.
    """
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")


def load_pretrained(folder: str | Path, **kwargs) -> PreTrainedModel:
    """The HoVLE or compositional model saved in `folder` (`from_pretrained` kwargs such as `dtype` pass on).

    Raises:
        FileNotFoundError: no config.json in `folder`.
        ValueError: the folder holds another kind of model.
    """
    model_type = saved_model_type(folder)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{folder} holds a {model_type!r} model: expected one of {MODEL_TYPES}")
    return AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs)


__all__ = ["MODEL_TYPES", "load_pretrained", "saved_model_type"]
