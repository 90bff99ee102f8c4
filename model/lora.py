"""LoRA on the LLM (and optionally the embedding module) with peft, injected in place.

The adapters are injected into the model itself (`peft.inject_adapter_in_model`), not around it: the
model keeps its class and forward, parameter names keep their paths (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`), and the stage's trainable set (model/stages.py) selects them by name.
An adapter export holds the base weights (`model.safetensors`) and `adapter/` in peft's format, so
`PeftModel.from_pretrained(base, "<export>/adapter")` loads it too. Adapter weights load from safetensors
only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from model.config import ConfigError

ADAPTER_FOLDER = "adapter"  # not the export's root: transformers would take the root's adapter as the model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how a PeftModel's saved keys start
ADAPTER_NAME = "default"
# `train.lora.on` -> the module that carries adapters: the LLM whole; of the embedding module its causal
# layers (shaped as, and initialised from, the LLM's), while its patch embedding, text table and norms are
# small, new and train in full
PART_PREFIXES = {"llm": "language_model", "embedding": "embedding.layers"}


def target_pattern(target_modules: list[str] | tuple[str, ...], parts: list[str] | tuple[str, ...]) -> str:
    """peft's `target_modules` as one regex: the named layers inside the chosen parts only."""
    prefixes = "|".join(PART_PREFIXES[part].replace(".", r"\.") for part in parts)
    names = "|".join(target_modules)
    return rf"({prefixes})\..*\.({names})"


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | tuple[str, ...],
    parts: list[str] | tuple[str, ...],
) -> tuple[str, ...]:
    """Inject LoRA adapters (`lora_A`, `lora_B`; B starts at zero) into the linear layers named
    `target_modules` in `parts` ("llm", "embedding"); returns the adapted parts' parameter prefixes.

    Raises:
        ConfigError: a part the model does not have, or a name that matches no linear layer of a part.
    """
    from peft import LoraConfig, inject_adapter_in_model

    for part in parts:
        prefix = PART_PREFIXES[part]
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise ConfigError(
                f"train.lora.on: {part}: this {model.config.model_type!r} model has no {prefix}"
            ) from None
        linear = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
        missing = [name for name in target_modules if name not in linear]
        if missing:
            raise ConfigError(
                f"train.lora.target_modules: {missing} name no linear layer of the {part} "
                f"(its linear layers: {sorted(linear)})"
            )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(target_modules, parts)
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model._hovle_lora_config = config  # what save_adapter writes (peft keeps none on a bare model)
    return tuple(f"{PART_PREFIXES[part]}." for part in parts)


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def split_adapter(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA model's state dict -> (the base weights under the plain model's names, the adapter weights
    under peft's saved names: `base_model.model.<layer>.lora_A.weight`)."""
    base, adapter = {}, {}
    for name, tensor in weights.items():
        if is_adapter_key(name):
            adapter[PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")] = tensor
        else:
            base[name.replace(".base_layer.", ".")] = tensor
    return base, adapter


def merge_adapter(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """The base weights with every adapted layer merged: W + scaling * B @ A (in W's dtype).

    Raises:
        ValueError: an adapter layer whose base weight is missing or of another shape.
    """
    merged = dict(base)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        layer = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        weight = merged.get(f"{layer}.weight")
        delta = (b.float() @ a.float()) * scaling
        if weight is None or weight.shape != delta.shape:
            raise ValueError(f"adapter layer {layer}: no base weight of shape {tuple(delta.shape)}")
        merged[f"{layer}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def save_adapter(folder: str | Path, adapter: dict[str, torch.Tensor], config, base_reference: str) -> None:
    """`<folder>/adapter/` in peft's format (adapter_config.json, adapter_model.safetensors); the config's
    `base_model_name_or_path` records what the adapter was trained on."""
    from safetensors.torch import save_file

    target = Path(folder) / ADAPTER_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    config.base_model_name_or_path = base_reference
    config.save_pretrained(str(target))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(target / ADAPTER_WEIGHTS))


def saved_scaling(adapter_config: dict) -> float:
    """LoRA's scaling from a saved adapter_config.json: lora_alpha / r (/ sqrt(r) with rsLoRA).

    Raises:
        ValueError: a LoRA variant this package does not merge (per-layer ranks, DoRA, another peft type).
    """
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"adapter: peft_type {adapter_config.get('peft_type')!r}, expected LORA")
    if any(adapter_config.get(key) for key in ("rank_pattern", "alpha_pattern", "use_dora")):
        raise ValueError("adapter: per-layer ranks or DoRA are not supported; save a plain LoRA adapter")
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def has_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_FOLDER / ADAPTER_CONFIG).is_file()


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the adapter's weights) from `<folder>/adapter`, safetensors only.

    Raises:
        FileNotFoundError: no adapter_model.safetensors (a pickled adapter_model.bin is never read).
    """
    from safetensors.torch import load_file

    target = Path(folder) / ADAPTER_FOLDER
    weights = target / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{target}: no {ADAPTER_WEIGHTS} (adapters load from safetensors only)")
    return json.loads((target / ADAPTER_CONFIG).read_text()), load_file(str(weights))


def apply_saved_adapter(model: nn.Module, folder: str | Path, keep: bool = False) -> nn.Module:
    """Apply the adapter saved in `<folder>/adapter` to `model` (its base weights loaded): merged into the
    weights (default: a plain model, no peft needed), or kept as live LoRA layers (`keep`, with peft)."""
    adapter_config, adapter = read_adapter(folder)
    scaling = saved_scaling(adapter_config)
    if not keep:
        model.load_state_dict(merge_adapter(model.state_dict(), adapter, scaling))
        return model
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(Path(folder) / ADAPTER_FOLDER))
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model._hovle_lora_config = config
    stripped = {k.removeprefix(PEFT_PREFIX): v for k, v in adapter.items()}
    result = set_peft_model_state_dict(model, stripped, adapter_name=ADAPTER_NAME)
    unexpected = [k for k in result.unexpected_keys if is_adapter_key(k)]
    if unexpected:
        raise ValueError(f"adapter in {folder}: weights for layers the model lacks: {unexpected[:3]}")
    return model
