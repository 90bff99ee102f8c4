"""`HoVLEForConditionalGeneration`: holistic embedding module -> LLM (through `inputs_embeds`).

The LLM is any Hugging Face causal LM built from `config.text_config`. Generation uses transformers'
`GenerationMixin` with one KV cache shared by the LLM (slots 0..M-1) and the embedding module (slots
M..M+N-1), so a new token costs one step through both, never a re-encode of the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import ModelOutput

from model.config import HoVLEConfig
from model.defocus import ImageDecayBias, LearnableRotaryEmbedding
from model.embedding import HolisticEmbedding, default_position_ids
from model.processor import IGNORE_INDEX


class HoVLECache(DynamicCache):
    """A lazily grown `DynamicCache` for both halves of the model.

    With the shuffle after the embedding layers (HoVLE-HD) the embedding module's sequence is longer than
    the LLM's, so its 2D padding mask cannot be rebuilt from the LLM's; it is kept here and follows every
    batch reordering generation applies to the cache. So does, in the raster layout, each row's position
    shift (how far the module's positions run ahead of the LLM's).
    """

    def __init__(self):
        super().__init__()
        self.embedding_attention_mask: torch.Tensor | None = None
        self.embedding_position_shift: torch.Tensor | None = None

    def _rows(self, pick) -> None:
        if self.embedding_attention_mask is not None:
            self.embedding_attention_mask = pick(self.embedding_attention_mask)
        if self.embedding_position_shift is not None:
            self.embedding_position_shift = pick(self.embedding_position_shift)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t[beam_idx.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.embedding_attention_mask is not None and tokens_to_remove:
            self.embedding_attention_mask = self.embedding_attention_mask[:, :-tokens_to_remove]

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.embedding_attention_mask = None
        self.embedding_position_shift = None


@dataclass
class HoVLEOutput(ModelOutput):
    """loss: next-token loss when labels are given; logits [b, L, vocab]; embedding_states [b, L, hidden]
    (the module's outputs, i.e. the LLM's inputs) when requested."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DynamicCache | None = None
    embedding_states: torch.Tensor | None = None


def learnt_positions(labels: torch.LongTensor) -> torch.Tensor:
    """[b, L] bool: position p is learnt when token p + 1 is a label (its logits predict one)."""
    learnt = torch.zeros_like(labels, dtype=torch.bool)
    learnt[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return learnt


def language_model_output(
    language_model: nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor,
    cache: DynamicCache | None,
    labels: torch.LongTensor | None,
    use_cache: bool,
    logits_to_keep: int | torch.Tensor,
    output_embedding_states: bool,
    **kwargs,
) -> HoVLEOutput:
    """The LLM on input embeddings [b, L, hidden] (a monolithic or a compositional model's) -> HoVLEOutput.

    With `labels` (and no cache, all logits asked): the loss is the mean next-token cross-entropy over the
    labelled tokens, as the LLM's own loss computes it, but the vocabulary head runs only at the positions
    that predict one, and `logits` holds just those rows [learnt tokens, vocab]. Training samples learn a
    few answer tokens per pack of hundreds: skipping the 49k-word head elsewhere makes a SmolLM2-135M step
    1.21x faster (benchmarks/bench_head.py). The LLM's own head still makes the logits (final soft-capping
    and the like included)."""
    learnt = None
    if labels is not None and not use_cache and isinstance(logits_to_keep, int) and logits_to_keep == 0:
        learnt = learnt_positions(labels)
    out = language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        labels=labels if learnt is None else None,
        use_cache=use_cache,
        logits_to_keep=logits_to_keep if learnt is None else learnt,
        **kwargs,
    )
    loss = out.loss if learnt is None else F.cross_entropy(out.logits.float(), labels[:, 1:][learnt[:, :-1]])
    return HoVLEOutput(
        loss=loss,
        logits=out.logits,
        cache=out.cache if use_cache else None,
        embedding_states=embeds if output_embedding_states else None,
    )


class HoVLEPreTrainedModel(PreTrainedModel):
    """The base of both VLMs (HoVLE and the compositional baseline): the LLM on the input embeddings that
    the subclass's `_llm_inputs` makes, with a `cache_class` cache when generating."""

    config: HoVLEConfig
    config_class = HoVLEConfig
    base_model_prefix = "hovle"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    cache_class = HoVLECache

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HolisticEmbedding):
            nn.init.normal_(module.position_embedding, std=self.config.text_config.initializer_range)
        elif isinstance(module, (ImageDecayBias, LearnableRotaryEmbedding)):
            module.reset_parameters()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_embedding_states: bool = False,
        **kwargs,
    ) -> HoVLEOutput:
        """input_ids [b, L] -> logits [b, L, vocab]; `labels` [b, L] (-100 = ignored) -> next-token loss."""
        # training calls leave use_cache unset: no cache, so packed samples stay apart (generate sets it)
        use_cache = bool(use_cache)
        if use_cache and cache is None:
            cache = self.cache_class()
        if position_ids is None:
            position_ids = default_position_ids(input_ids, cache)
        embeds = self._llm_inputs(input_ids, pixel_values, attention_mask, position_ids, cache, use_cache)
        return language_model_output(
            self.language_model, embeds, attention_mask, position_ids, cache, labels, use_cache,
            logits_to_keep, output_embedding_states, **kwargs,
        )  # fmt: skip


class HoVLEForConditionalGeneration(HoVLEPreTrainedModel, GenerationMixin):
    """The monolithic VLM. Inputs come from `HoVLEProcessor`: input_ids with <IMG_CONTEXT> slots and the
    tiles' pixel_values [tiles, 3, T, T] in slot order."""

    def __init__(self, config: HoVLEConfig):
        super().__init__(config)
        self.embedding = HolisticEmbedding(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.embed_tokens

    def _llm_inputs(self, input_ids, pixel_values, attention_mask, position_ids, cache, use_cache):
        return self.embedding(input_ids, pixel_values, attention_mask, position_ids, cache, use_cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # The cache must hold the embedding module's layers too, which a cache sized from the LLM's config
        # cannot: start generation with a lazily grown HoVLECache.
        if (
            model_kwargs.get("cache") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            model_kwargs["cache"] = HoVLECache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # ---- initialisation of the embedding module from the LLM ---------------------------------------
    @torch.no_grad()
    def initialize_embedding_from_llm(self, mode: str | None = None) -> None:
        """Copy the LLM's input embeddings into the module's text table and set up its layers.

        mode (default `config.embedding_init`): "random" keeps the random layers; "identity" zeroes each
        layer's attention output and MLP down projections, so the module starts by passing text embeddings
        through unchanged; "copy" loads the LLM's first N decoder layers (Llama-shaped LLMs).
        """
        mode = mode or self.config.embedding_init
        llm_embeddings = self.language_model.get_input_embeddings().weight
        self.embedding.embed_tokens.weight.copy_(llm_embeddings)
        if mode == "identity":
            for layer in self.embedding.layers:
                for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
        elif mode == "copy":
            llm_layers = self.language_model.get_decoder().layers
            for layer, source in zip(self.embedding.layers, llm_layers, strict=False):
                layer.load_state_dict(source.state_dict())
        elif mode != "random":
            raise ValueError(f"embedding_init={mode!r}: expected 'random', 'identity' or 'copy'")


def register_auto_classes(
    config_class: type[HoVLEConfig] = HoVLEConfig,
    model_class: type[PreTrainedModel] = HoVLEForConditionalGeneration,
) -> None:
    """Make the Auto classes (config, model, processor) resolve `config_class.model_type` ("hovle", or
    model.compositional's "hovle-compositional") to `model_class` without `trust_remote_code`."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from model.processor import HoVLEProcessor

    try:
        AutoConfig.register(config_class.model_type, config_class)
    except ValueError:  # already registered in this process
        return
    AutoModel.register(config_class, model_class)
    AutoModelForImageTextToText.register(config_class, model_class)
    AutoProcessor.register(config_class, HoVLEProcessor)


register_auto_classes()  # on import: see the package docstring
