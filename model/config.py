"""`HoVLEConfig`: the HoVLE model's Hugging Face config.

The config has two halves:
- `text_config`, the LLM's own Hugging Face config (any causal LM; Llama-shaped at paper scale);
- the holistic embedding module's fields (`embedding_*`, the image geometry, the attention variant).

It also carries the ids of the added special tokens, the chat template and where the LLM came from, so
an exported folder is self-describing. Paper-scale defaults follow HOVLE.md.
"""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from model.errors import ConfigError, config_problems  # noqa: F401  (re-exported)


class HoVLEConfig(PreTrainedConfig):
    r"""Configuration of `HoVLEForConditionalGeneration`.

    Embedding-module fields left at `None` take the LLM's value (same layer shape as the LLM).
    """

    model_type = "hovle"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None

    # holistic embedding module: decoder layers of the LLM's kind
    embedding_num_layers: int = 8
    embedding_num_heads: int | None = None
    embedding_num_kv_heads: int | None = None
    embedding_intermediate_size: int | None = None
    embedding_rope_theta: float | None = None
    # layer details an imported checkpoint may set apart from the LLM's (None / False: as the LLM / none)
    embedding_rope_scaling: dict | None = None  # e.g. {"rope_type": "dynamic", "factor": 2.0}
    embedding_max_position_embeddings: int | None = None
    embedding_rms_norm_eps: float | None = None
    embedding_hidden_act: str | None = None
    embedding_attention_bias: bool = False
    embedding_init: Literal["random", "identity", "copy"] = "identity"
    drop_path_rate: float = 0.0
    attention: Literal["standard", "defocus"] = "standard"
    # de-focus attention (HOVLE.md, last section): drop path rising linearly over training
    defocus_drop_path_start: float = 0.1
    defocus_drop_path_end: float = 0.7
    defocus_aux_loss: bool = True

    # images
    tile_size: int = 448
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    shuffle_location: Literal["pre", "post"] = "pre"
    # with the shuffle after the layers: "slot" expands each image slot to its k x k patches sharing the
    # slot's position; "raster" (the released HoVLE-HD's) runs each tile's patches in raster order, each
    # at a position of its own
    post_shuffle_layout: Literal["slot", "raster"] = "slot"
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True

    # tokens and chat
    img_context_token_id: int | None = None
    img_start_token_id: int | None = None
    img_end_token_id: int | None = None
    chat_template: str | None = None

    # where the LLM and tokenizer come from (provenance; exports hold their own weights and tokenizer)
    llm_name_or_path: str | None = None
    llm_gguf_file: str | None = None
    tokenizer_name_or_path: str | None = None

    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate()

    # ---- derived geometry -------------------------------------------------------------------------
    @property
    def patch_grid(self) -> int:
        """Patches per tile side (448 / 14 = 32 at paper scale)."""
        return self.tile_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """Patches merged into one image token by the pixel shuffle (4 for ratio 0.5)."""
        return round(1 / (self.pixel_shuffle_ratio**2))

    @property
    def image_grid(self) -> int:
        """Image tokens per tile side after the shuffle (16 at paper scale)."""
        return int(self.patch_grid * self.pixel_shuffle_ratio)

    @property
    def image_tokens_per_tile(self) -> int:
        """`<IMG_CONTEXT>` tokens per tile in the LLM's sequence (256 at paper scale)."""
        return self.image_grid**2

    def embedding_layer_config(self) -> LlamaConfig:
        """The Llama config that shapes the embedding module's decoder layers (hidden = the LLM's)."""
        text = self.text_config
        heads = self.embedding_num_heads or text.num_attention_heads
        kv_heads = self.embedding_num_kv_heads or getattr(text, "num_key_value_heads", None) or heads
        text_rope = getattr(text, "rope_parameters", None) or {}
        theta = self.embedding_rope_theta or text_rope.get("rope_theta") or getattr(text, "rope_theta", 1e4)
        rope = {"rope_type": "default", "rope_theta": float(theta), **(self.embedding_rope_scaling or {})}
        config = LlamaConfig(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=self.embedding_intermediate_size or text.intermediate_size,
            num_hidden_layers=self.embedding_num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=text.hidden_size // heads,
            hidden_act=self.embedding_hidden_act or getattr(text, "hidden_act", "silu"),
            rms_norm_eps=self.embedding_rms_norm_eps or getattr(text, "rms_norm_eps", 1e-5),
            max_position_embeddings=self.embedding_max_position_embeddings
            or getattr(text, "max_position_embeddings", 4096),
            rope_parameters=rope,
            attention_bias=self.embedding_attention_bias,
            initializer_range=getattr(text, "initializer_range", 0.02),
        )
        requested = getattr(text, "_attn_implementation", None) or "sdpa"
        # the de-focus decay is an additive bias on the logits: flash kernels take no bias
        flash = self.attention == "defocus" and requested not in ("sdpa", "eager")
        config._attn_implementation = "sdpa" if flash else requested
        return config

    # ---- validation --------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"HoVLEConfig.{field}={getattr(self, field)!r}: expected {expected}")

        choices = {
            "embedding_init": ("random", "identity", "copy"),
            "attention": ("standard", "defocus"),
            "shuffle_location": ("pre", "post"),
            "post_shuffle_layout": ("slot", "raster"),
        }
        for field, allowed in choices.items():
            need(getattr(self, field) in allowed, field, f"one of {allowed}")
        for field in ("embedding_num_layers", "tile_size", "patch_size", "min_tiles", "max_tiles"):
            need(isinstance(getattr(self, field), int), field, "an integer")
        text = self.text_config
        need(self.embedding_num_layers >= 1, "embedding_num_layers", "an integer >= 1")
        tiled = self.patch_size > 0 and self.tile_size % self.patch_size == 0
        need(tiled, "tile_size", f"a multiple of patch_size={self.patch_size}")
        need(0 < self.pixel_shuffle_ratio <= 1, "pixel_shuffle_ratio", "a ratio in (0, 1], e.g. 0.5")
        scaled = self.patch_grid * self.pixel_shuffle_ratio
        whole = abs(scaled - round(scaled)) < 1e-6 and abs(1 / self.pixel_shuffle_ratio % 1) < 1e-6
        divisor = f"1/k for an integer k dividing the patch grid ({self.patch_grid})"
        need(whole, "pixel_shuffle_ratio", divisor)
        ordered = 1 <= self.min_tiles <= self.max_tiles
        need(ordered, "min_tiles", f"1 <= min_tiles <= max_tiles={self.max_tiles}")
        for field in ("drop_path_rate", "defocus_drop_path_start", "defocus_drop_path_end"):
            need(0.0 <= getattr(self, field) < 1.0, field, "a rate in [0, 1)")
        scaling = self.embedding_rope_scaling
        kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
        known = scaling is None or (kind in ("dynamic", "linear") and "factor" in scaling)
        need(known, "embedding_rope_scaling", 'None or {"rope_type": "dynamic" | "linear", "factor": f}')
        learnt = "None with attention='defocus' (its rotary frequencies are learnt)"
        need(scaling is None or self.attention == "standard", "embedding_rope_scaling", learnt)
        if text is not None:
            heads = self.embedding_num_heads or text.num_attention_heads
            divides = text.hidden_size % heads == 0
            need(divides, "embedding_num_heads", f"a divisor of the LLM hidden size {text.hidden_size}")
            kv = self.embedding_num_kv_heads or getattr(text, "num_key_value_heads", None) or heads
            need(heads % kv == 0, "embedding_num_kv_heads", f"a divisor of embedding_num_heads={heads}")
            if self.embedding_init == "copy":
                need(
                    self.embedding_num_layers <= text.num_hidden_layers,
                    "embedding_num_layers",
                    f"<= the LLM's {text.num_hidden_layers} layers when embedding_init='copy'",
                )


__all__ = ["ConfigError", "HoVLEConfig"]
