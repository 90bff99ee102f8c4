"""HoVLE / HoVLE-HD as released (OpenGVLab's `InternVLChatModel`: a holistic embedding module + InternLM2)
-> this project's `HoVLEForConditionalGeneration` folder, which `model.load_pretrained` and
`HoVLEProcessor.from_pretrained` read natively (no remote code).

The released layout and every difference from this project's model are in
docs/results/hovle-release-layout.md. In short: the embedding module's InternLM2 layers (fused `wqkv`)
become Llama layers, its text tables (`llm_text_embeddings` [+ `special_text_embeddings`]) one table, the
position embedding loses its unused class row, and the InternLM2 LLM becomes a Llama
(`model.convert.internlm2`). Its config.json becomes a `HoVLEConfig` (the module's own rope scaling, norm
epsilon and positions carried; HD's raster patch layout selected), written with the weights, and as a run
config `model:` section (model.yaml) beside them. Conversion streams one source shard at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from model.convert import ConversionError, internlm2, read_json_object, shards

logger = logging.getLogger(__name__)

MODEL_TYPE = "internvl_chat"
RUN_CONFIG_FILE = "model.yaml"
_EMBEDDING = "embedding_model."
_LLM = "language_model."
_LAYER = re.compile(r"encoder\.(\d+)\.(.+)")
_RENAMED = {
    "vision_embeddings.patch_embedding.weight": "embedding.patch_embed.weight",
    "vision_embeddings.patch_embedding.bias": "embedding.patch_embed.bias",
    "pixel_shuffle_proj.0.weight": "embedding.shuffle_mlp.0.weight",
    "pixel_shuffle_proj.0.bias": "embedding.shuffle_mlp.0.bias",
    "pixel_shuffle_proj.2.weight": "embedding.shuffle_mlp.2.weight",
    "pixel_shuffle_proj.2.bias": "embedding.shuffle_mlp.2.bias",
}
_TEXT_TABLES = ("llm_text_embeddings.weight", "special_text_embeddings.weight")

# InternVL's conversation templates the release names in config.json `template`, as chat templates
# rendering the same prompt (system turn first, `<|im_end|>` right after each turn, no newline)
_SYSTEM_INTERNLM2 = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_CHAT_TEMPLATES = {
    "internlm2-chat": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '" + _SYSTEM_INTERNLM2 + "' %}{% set turns = messages %}{% endif %}"
        "{{ '<|im_start|>system\n' + system + '<|im_end|>' }}"
        "{% for message in turns %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def _need(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise ConversionError(f"{path}: {message}")


def read_config(source: Path) -> dict[str, Any]:
    """The released config.json of `source`, checked to be a HoVLE checkpoint this importer converts
    exactly (ConversionError naming what is not)."""
    path = source / "config.json"
    _need(path.is_file(), source, "no config.json: not a HoVLE checkpoint folder")
    config = read_json_object(path)
    emb, llm = config.get("embedding_config"), config.get("llm_config")
    _need(
        config.get("model_type") == MODEL_TYPE and isinstance(emb, dict) and isinstance(llm, dict),
        path,
        f"model_type {config.get('model_type')!r}: not a HoVLE checkpoint (expected {MODEL_TYPE!r} with "
        "embedding_config and llm_config, as OpenGVLab/HoVLE and HoVLE-HD)",
    )
    arch = (llm.get("architectures") or [None])[0]
    _need(arch == "InternLM2ForCausalLM", path, f"llm_config is {arch!r}: only InternLM2ForCausalLM")
    _need(
        emb.get("use_pixel_shuffle_proj") is True,
        path,
        "embedding_config.use_pixel_shuffle_proj must be true",
    )
    _need(not emb.get("use_ls", False), path, "embedding_config.use_ls (layer scale) is not supported")
    _need(not config.get("normalize_encoder_output"), path, "normalize_encoder_output: true is not supported")
    loc = emb.get("pixel_shuffle_loc", "pre")
    _need(loc in ("pre", "post"), path, f"embedding_config.pixel_shuffle_loc={loc!r}: expected pre or post")
    hidden = llm.get("hidden_size")
    _need(
        emb.get("hidden_size") == emb.get("llm_hidden_size", hidden) == hidden,
        path,
        f"embedding hidden_size {emb.get('hidden_size')} must equal the LLM's {hidden}",
    )
    table = emb.get("llm_vocab_size", 0) + len(emb.get("special_token_maps") or {})
    _need(
        table == llm.get("vocab_size"),
        path,
        f"the embedding module's text tables hold {table} tokens, the LLM {llm.get('vocab_size')}",
    )
    ratio = emb.get("downsample_ratio", 0.5)
    _need(
        config.get("downsample_ratio", ratio) == ratio, path, "downsample_ratio differs between the configs"
    )
    tile = config.get("force_image_size") or emb.get("image_size")
    _need(tile == emb.get("image_size"), path, f"force_image_size {tile} != embedding image_size")
    internlm2.check_config(llm)
    return config


def model_section(config: dict[str, Any], tokenizer: str) -> dict[str, Any]:
    """The run config `model:` section describing the released model (`model.presets` reads it)."""
    emb, llm = config["embedding_config"], config["llm_config"]
    llama = internlm2.llama_config(llm)
    llama.pop("architectures", None)
    llama.pop("dtype", None)
    post = emb.get("pixel_shuffle_loc", "pre") == "post"
    return {
        "llm": {"config": llama, "tokenizer": tokenizer, "chat_template": "own"},  # the release's, saved
        "embedding": {
            "num_layers": emb["num_hidden_layers"],
            "num_heads": emb["num_attention_heads"],
            "num_kv_heads": emb.get("num_key_value_heads") or emb["num_attention_heads"],
            "intermediate_size": emb["intermediate_size"],
            "rope_theta": float(emb.get("rope_theta", 10000.0)),
            "rope_scaling": internlm2.rope_scaling(emb.get("rope_scaling"), "embedding_config.rope_scaling"),
            "max_position_embeddings": emb.get("max_position_embeddings", 4096),
            "rms_norm_eps": float(emb.get("rms_norm_eps", 1e-5)),
            "hidden_act": emb.get("hidden_act", "silu"),
            "attention_bias": bool(emb.get("attention_bias", False)),
            "init": "random",  # the weights come from the checkpoint
            "drop_path_rate": float(emb.get("drop_path_rate", 0.0)),
            "shuffle_location": "post" if post else "pre",
            "post_shuffle_layout": "raster" if post else "slot",
        },
        "image": {
            "tile_size": emb["image_size"],
            "patch_size": emb["patch_size"],
            "pixel_shuffle_ratio": emb.get("downsample_ratio", 0.5),
            "min_tiles": config.get("min_dynamic_patch", 1),
            "max_tiles": config.get("max_dynamic_patch", 6),
            "use_thumbnail": bool(config.get("use_thumbnail", True)),
        },
    }


def hovle_config(config: dict[str, Any], tokenizer, chat_template: str | None):
    """The `HoVLEConfig` computing what the released model computes."""
    from transformers import LlamaConfig

    from model.config import HoVLEConfig
    from model.presets import embedding_config_fields
    from model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

    section = model_section(config, "")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}
    released = config["embedding_config"].get("img_context_token_id")
    if released is not None and released != ids[IMG_CONTEXT]:
        raise ConversionError(f"img_context_token_id {released} is not the tokenizer's {IMG_CONTEXT} ({ids})")
    return HoVLEConfig(
        text_config=LlamaConfig(**internlm2.llama_config(config["llm_config"])),
        **embedding_config_fields(section["embedding"]),
        **section["image"],
        img_start_token_id=ids[IMG_START],
        img_end_token_id=ids[IMG_END],
        img_context_token_id=ids[IMG_CONTEXT],
        chat_template=chat_template,
    )


def convert_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """One released tensor -> this project's tensors (KeyError for a name the release does not have).
    The text tables are joined by the caller (`import_checkpoint`); here they raise KeyError too."""
    if name.startswith(_LLM):
        converted = internlm2.convert_tensor(name.removeprefix(_LLM), tensor, config["llm_config"])
        return [(_LLM + new, t) for new, t in converted]
    if not name.startswith(_EMBEDDING):
        raise KeyError(name)
    rest = name.removeprefix(_EMBEDDING)
    layer = _LAYER.fullmatch(rest)
    if layer is not None:  # an InternLM2 decoder layer: converted as the LLM's are, with the module's shapes
        as_llm = f"model.layers.{layer.group(1)}.{layer.group(2)}"
        converted = internlm2.convert_tensor(as_llm, tensor, config["embedding_config"])
        return [("embedding." + new.removeprefix("model."), t) for new, t in converted]
    if rest == "vision_embeddings.position_embedding":  # [1, 1 + g*g, C]: row 0 is the unused class slot
        return [("embedding.position_embedding", tensor[:, 1:].contiguous())]
    if rest == "vision_embeddings.class_embedding":  # only for use_cls_token, which HoVLE never sets
        return []
    return [(_RENAMED[rest], tensor)]


def _chat_template(config: dict[str, Any], tokenizer) -> str | None:
    template = _CHAT_TEMPLATES.get(config.get("template"))
    if template is None:
        logger.warning(
            "conversation template %r has no chat-template translation: keeping the tokenizer's",
            config.get("template"),
        )
        return tokenizer.chat_template
    return template


def import_checkpoint(
    source: Path, dest: Path, max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Convert the released HoVLE(-HD) folder `source` into this project's model folder `dest` (created
    atomically; it must not exist or be empty): config.json, safetensors shards of at most
    ~`max_shard_bytes` (+ index), generation_config.json, the processor (fast tokenizer with the added
    tokens, chat template, processor_config.json) and model.yaml (the `model:` run-config section).
    Streams one shard at a time; only the text tables wait for each other (they are joined into one)."""
    from model.convert.internlm2_tokenizer import SPM_FILE, build_tokenizer
    from model.modeling import HoVLEForConditionalGeneration
    from model.presets import generation_config_for, processor_for

    config = read_config(source)
    _need((source / SPM_FILE).is_file(), source, f"no {SPM_FILE}: the released tokenizer is missing")
    tokenizer = build_tokenizer(source)
    hovle = hovle_config(config, tokenizer, _chat_template(config, tokenizer))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in HoVLEForConditionalGeneration(hovle).state_dict().items()}
    tables: dict[str, torch.Tensor] = {}
    special = bool(config["embedding_config"].get("special_token_maps"))
    with shards.atomic_output_folder(dest) as out:
        writer = shards.ShardWriter(out, max_shard_bytes)

        def add(new_name: str, tensor: torch.Tensor) -> None:
            if new_name not in expected:
                raise ConversionError(f"{source}: {new_name!r} has no place in the converted model")
            if tuple(tensor.shape) != tuple(expected[new_name]):
                raise ConversionError(
                    f"{source}: {new_name} has shape {tuple(tensor.shape)}, the config implies "
                    f"{tuple(expected[new_name])}"
                )
            writer.add(new_name, tensor)

        for name, tensor in shards.iter_tensors(source):
            if name.removeprefix(_EMBEDDING) in _TEXT_TABLES and name.startswith(_EMBEDDING):
                tables[name.removeprefix(_EMBEDDING)] = tensor
                del tensor
                if len(tables) == 1 + special:  # both halves here: ids >= llm_vocab_size read the second
                    joined = torch.cat([tables.pop(t) for t in _TEXT_TABLES[: 1 + special]])
                    add("embedding.embed_tokens.weight", joined)
                    del joined
                continue
            try:
                converted = convert_tensor(name, tensor, config)
            except KeyError as err:
                raise ConversionError(f"{source}: {name!r} is not a tensor of the released HoVLE") from err
            for new_name, new_tensor in converted:
                add(new_name, new_tensor)
            del tensor, converted
        missing = sorted(set(expected) - writer.names)
        if missing:
            raise ConversionError(f"{source}: {len(missing)} tensors lack a source, e.g. {missing[:3]}")
        files = writer.close()
        hovle.save_pretrained(str(out))
        processor_for(hovle, tokenizer).save_pretrained(out)
        # greedy, stopping at the template's end of turn, never generating image tokens (as built models)
        generation_config_for(tokenizer, hovle.chat_template).save_pretrained(str(out))
        section = model_section(config, str(dest.resolve()))
        header = f"# `model:` section of the HoVLE checkpoint imported from {source.resolve()}\n"
        (out / RUN_CONFIG_FILE).write_text(header + yaml.safe_dump({"model": section}, sort_keys=False))
    logger.info("wrote %s: %d shard(s), %.1f MB", dest, len(files), writer.total_bytes / 1e6)
    return dest
