"""InternLM2 -> Llama: names, the fused `wqkv` split, and the config, as transformers 5 loads them natively.

InternLM2 is Llama with other names and one fused projection. Its attention reads `wqkv`'s output as
`(kv_heads, groups + 2, head_dim)`: for each key/value head, the `groups = heads / kv_heads` query heads
that share it, then its key head, then its value head. Splitting along that grouping gives Llama's
`q_proj` (query heads in order), `k_proj` and `v_proj`.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from model.convert import ConversionError, read_json_object, shards

logger = logging.getLogger(__name__)

MODEL_TYPE = "internlm2"

# InternLM2ForCausalLM's parameter names -> LlamaForCausalLM's (one to one; `wqkv` is split instead)
_TOP_LEVEL = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IN_LAYER = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_WQKV = re.compile(r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")
# non-persistent buffers some exports still carry; Llama recomputes them
_DROPPED = re.compile(r"model\.layers\.\d+\.attention\.rotary_emb\.inv_freq")

_ROPE_TYPES = ("dynamic", "linear")


def llama_name(internlm2_name: str) -> str:
    """The LlamaForCausalLM parameter name for a one-to-one InternLM2ForCausalLM parameter.

    `model.layers.3.feed_forward.w1.weight` -> `model.layers.3.mlp.gate_proj.weight`. The fused
    `attention.wqkv` has no single Llama name (see `split_wqkv` / `convert_tensor`); it and any name
    InternLM2 does not have raise KeyError."""
    if internlm2_name in _TOP_LEVEL:
        return _TOP_LEVEL[internlm2_name]
    match = _LAYER.fullmatch(internlm2_name)
    if match is None or match.group(2) not in _IN_LAYER:
        raise KeyError(f"{internlm2_name!r} is not a one-to-one InternLM2ForCausalLM parameter")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_IN_LAYER[module]}.{kind}"


def split_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused `wqkv` weight `[(heads + 2 * kv_heads) * head_dim, hidden]` (or its bias, 1-D) ->
    (q `[heads * head_dim, ...]`, k `[kv_heads * head_dim, ...]`, v `[kv_heads * head_dim, ...]`),
    each a new contiguous tensor."""
    if num_heads % num_kv_heads:
        raise ConversionError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads")
    groups = num_heads // num_kv_heads
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if wqkv.shape[0] != rows:
        raise ConversionError(
            f"wqkv has {wqkv.shape[0]} output rows; {num_heads} heads + 2 x {num_kv_heads} kv heads "
            f"of {head_dim} need {rows}"
        )
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _require(config: dict[str, Any], field: str) -> Any:
    if field not in config:
        raise ConversionError(f"InternLM2 config.json has no `{field}`")
    return config[field]


def check_config(internlm2_config: dict[str, Any]) -> None:
    """Raise ConversionError unless `internlm2_config` is an InternLM2 (causal LM) config."""
    model_type = internlm2_config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConversionError(f"config.json has model_type {model_type!r}, expected {MODEL_TYPE!r}")


def _head_dim(config: dict[str, Any]) -> int:
    hidden, heads = _require(config, "hidden_size"), _require(config, "num_attention_heads")
    if hidden % heads:
        raise ConversionError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    return hidden // heads


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """InternLM2's `rope_theta` + `rope_scaling` ({"type": "dynamic"|"linear", "factor": f} or None) as
    transformers 5's `rope_parameters`. Both scalings compute what transformers' own do: linear divides
    the positions by `factor`; dynamic NTK grows the base once a sequence passes
    `max_position_embeddings`, with the same formula. (One difference, by design: the released module
    keeps a grown base for later, shorter sequences; transformers returns to the original base below
    `max_position_embeddings`, which is what a fresh released model computes for them.)"""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    return {**params, **(rope_scaling(config.get("rope_scaling"), "rope_scaling") or {})}


def rope_scaling(scaling: Any, field: str) -> dict[str, Any] | None:
    """InternLM2's `rope_scaling` (None, or {"type" or "rope_type": "dynamic" | "linear", "factor": f}) ->
    {"rope_type": ..., "factor": f} or None; ConversionError naming `field` for anything else."""
    if scaling is None:
        return None
    kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if kind not in _ROPE_TYPES or "factor" not in scaling:
        raise ConversionError(
            f"{field} {scaling!r}: InternLM2 knows {{'type': 'dynamic' | 'linear', 'factor': f}} only"
        )
    return {"rope_type": kind, "factor": float(scaling["factor"])}


def llama_config(internlm2_config: dict[str, Any]) -> dict[str, Any]:
    """An InternLM2 config.json (as a dict) -> the LlamaConfig dict (`LlamaConfig(**d)` or config.json)
    computing the same function: attention bias from `bias`, rope scaling as `rope_parameters`, the
    vocabulary, tied embeddings and special token ids kept."""
    check_config(internlm2_config)
    c = internlm2_config
    heads = _require(c, "num_attention_heads")
    out = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _require(c, "vocab_size"),
        "hidden_size": _require(c, "hidden_size"),
        "intermediate_size": _require(c, "intermediate_size"),
        "num_hidden_layers": _require(c, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": c.get("num_key_value_heads") or heads,
        "head_dim": _head_dim(c),
        "hidden_act": c.get("hidden_act", "silu"),
        "max_position_embeddings": c.get("max_position_embeddings", 2048),
        "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
        "initializer_range": c.get("initializer_range", 0.02),
        # InternLM2's `bias` covers wqkv and wo, which is exactly Llama's attention_bias; its MLP has none
        "attention_bias": bool(c.get("bias", True)),
        "mlp_bias": False,
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "rope_parameters": _rope_parameters(c),
        "bos_token_id": c.get("bos_token_id", 1),
        "eos_token_id": c.get("eos_token_id", 2),
        "pad_token_id": c.get("pad_token_id", 0),
        "use_cache": c.get("use_cache", True),
    }
    dtype = c.get("dtype", c.get("torch_dtype"))
    if dtype is not None:
        out["dtype"] = dtype
    return out


def convert_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """One InternLM2ForCausalLM tensor -> its LlamaForCausalLM tensors (`config`: the InternLM2
    config.json dict). `wqkv` becomes q/k/v projections; a stale `rotary_emb.inv_freq` buffer is
    dropped; anything else is renamed (KeyError for a name InternLM2 does not have)."""
    if _DROPPED.fullmatch(name):
        return []
    fused = _WQKV.fullmatch(name)
    if fused is None:
        return [(llama_name(name), tensor)]
    layer, kind = fused.groups()
    heads = _require(config, "num_attention_heads")
    q, k, v = split_wqkv(tensor, heads, config.get("num_key_value_heads") or heads, _head_dim(config))
    prefix = f"model.layers.{layer}.self_attn"
    return [(f"{prefix}.q_proj.{kind}", q), (f"{prefix}.k_proj.{kind}", k), (f"{prefix}.v_proj.{kind}", v)]


def llama_tensor_names(llama: dict[str, Any]) -> set[str]:
    """Every tensor a LlamaForCausalLM checkpoint for the config dict `llama` holds."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not llama["tie_word_embeddings"]:
        names.add("lm_head.weight")
    kinds = ("weight", "bias") if llama["attention_bias"] else ("weight",)
    for i in range(llama["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {f"{p}self_attn.{proj}_proj.{kind}" for proj in "qkvo" for kind in kinds}
        names |= {f"{p}mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return names


def read_config(source: Path) -> dict[str, Any]:
    """The InternLM2 config.json of the checkpoint folder `source` (ConversionError if it is not one)."""
    path = source / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no config.json (expected an InternLM2 checkpoint folder)")
    config = read_json_object(path)
    check_config(config)
    return config


def import_checkpoint(
    source: Path, dest: Path, max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Convert the InternLM2 checkpoint folder `source` into a Llama checkpoint folder `dest` (created
    atomically; it must not exist or be empty): config.json, safetensors shards of at most
    ~`max_shard_bytes` (+ index), generation_config.json when there is one, and the fast tokenizer with
    its chat template when `source` has a tokenizer.model. Streams one shard at a time."""
    from transformers import LlamaConfig

    from model.convert.internlm2_tokenizer import SPM_FILE, convert_tokenizer

    config = read_config(source)
    llama = llama_config(config)
    expected = llama_tensor_names(llama)
    with shards.atomic_output_folder(dest) as out:
        LlamaConfig(**llama).save_pretrained(str(out))
        writer = shards.ShardWriter(out, max_shard_bytes)
        for name, tensor in shards.iter_tensors(source):
            try:
                converted = convert_tensor(name, tensor, config)
            except KeyError as err:
                raise ConversionError(f"{source}: {name!r} is not an InternLM2ForCausalLM tensor") from err
            for new_name, new_tensor in converted:
                writer.add(new_name, new_tensor)
            del tensor, converted
        missing = sorted(expected - writer.names)
        if missing:
            raise ConversionError(f"{source}: {len(missing)} Llama tensors lack a source, e.g. {missing[:3]}")
        files = writer.close()
        if (source / "generation_config.json").is_file():
            shutil.copy(source / "generation_config.json", out / "generation_config.json")
        if (source / SPM_FILE).is_file():
            convert_tokenizer(source, out)
        else:
            logger.warning("%s has no %s: the output has no tokenizer", source, SPM_FILE)
    logger.info("wrote %s: %d shard(s), %.1f MB", dest, len(files), writer.total_bytes / 1e6)
    return dest
