"""HoVLE: a monolithic vision-language model (holistic embedding module + LLM). Pure PyTorch + transformers.

Importing this package registers model_type "hovle" with transformers' Auto classes, so
`AutoModelForImageTextToText.from_pretrained(export_dir)` works without `trust_remote_code`.
"""

from model.config import ConfigError, HoVLEConfig
from model.embedding import HolisticEmbedding, ImageTokenMismatch
from model.modeling import HoVLECache, HoVLEForConditionalGeneration, HoVLEOutput, register_auto_classes
from model.presets import build_model, build_processor, load_preset
from model.processor import HoVLEProcessor, ImagePlaceholderMismatch
from model.stages import STAGES, StageSpec, apply_stage, stage_loss

register_auto_classes()

__all__ = [
    "STAGES",
    "ConfigError",
    "HoVLECache",
    "HoVLEConfig",
    "HoVLEForConditionalGeneration",
    "HoVLEOutput",
    "HoVLEProcessor",
    "HolisticEmbedding",
    "ImagePlaceholderMismatch",
    "ImageTokenMismatch",
    "StageSpec",
    "apply_stage",
    "build_model",
    "build_processor",
    "load_preset",
    "stage_loss",
]
