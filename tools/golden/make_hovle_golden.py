"""Make the HoVLE / HoVLE-HD goldens `hovle import hovle` is tested against (tests/data/golden/hovle*/).

Run it ONCE, outside the project's environment, in a virtualenv where the released HoVLE code runs
(transformers 4.4x, einops, sentencepiece), giving it the folder holding the released
`configuration_holistic_embedding.py`, `configuration_internlm2.py`, `configuration_internvl_chat.py`,
`conversation.py`, `modeling_holistic_embedding.py`, `modeling_internlm2.py`,
`modeling_internvl_chat.py` and `tokenization_internlm2.py` (never committed here):

    python tools/golden/make_hovle_golden.py --release-code /tmp/hovle_ref/hovle --out tests/data/golden

For each variant (`hovle`: shuffle before the embedding layers; `hovle-hd`: after them) it writes, in the
released layout:
  <variant>/checkpoint/   a tiny random InternVLChatModel (seeded): config.json (embedding_config +
                 llm_config with the release's dynamic rope scaling, template `internlm2-chat`), the
                 released parameter names (fused `wqkv`, `vision_embeddings`, `llm_text_embeddings`, and for
                 HD a `special_text_embeddings` table), three safetensors shards + index, InternLM2's
                 sentencepiece tokenizer (the InternLM2 golden's tokenizer.model) with HoVLE's nine added
                 tokens and chat template
  <variant>/golden_logits.safetensors   per input i: `input_ids_<i>` (the LLM's sequence), for HD
                 `hd_input_ids_<i>` (1024/16-slot tiles: the embedding module's), `pixel_values_<i>` when it
                 has an image, and the released model's fp32 `logits_<i>`; each input on a freshly loaded
                 model (the released dynamic-NTK rotary cache is stateful)
  <variant>/golden_inputs.json   the prompts as the released conversation template renders them

The released code needs three imports this CPU venv cannot or need not satisfy; they are stood in for,
never used on the path run here: `flash_attn` (imported at module load; the goldens run the eager
attention), `timm`'s DropPath (only built for drop_path_rate > 0), `peft` (only for LoRA wrapping). The
released eager attention of the embedding module stops in `pdb.set_trace()`; it is made a no-op here.
The eager path applies the causal mask only when given a 2-D attention mask, so every call passes one
(all ones), which reproduces the released flash-attention (causal) semantics.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import pdb
import shutil
import sys
import tempfile
import types
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

RELEASE_FILES = (
    "configuration_holistic_embedding.py",
    "configuration_internlm2.py",
    "configuration_internvl_chat.py",
    "conversation.py",
    "modeling_holistic_embedding.py",
    "modeling_internlm2.py",
    "modeling_internvl_chat.py",
    "tokenization_internlm2.py",
)
PACKAGE = "hovle_release"
ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SEED = 15
HIDDEN, HEADS, KV_HEADS, FFN = 32, 4, 2, 48
LLM_LAYERS, EMBEDDING_LAYERS = 2, 2
IMAGE_SIZE, PATCH = 28, 7  # 4x4 patches per tile -> 4 image tokens per tile after the shuffle
MAX_POSITIONS = 48  # small: the HD image input and the long text pass it (dynamic NTK scaling)
ROPE_SCALING = {"type": "dynamic", "factor": 2.0}
ROPE_THETA = 1000000.0
TILES = 3
QUESTION = "What is in the picture?"
SYSTEM = "You are a holistic vision language model."


def install_stand_ins() -> None:
    """Modules the released files import but this run never uses (see the docstring). transformers'
    own modules the release imports are imported first, so they see the real environment."""
    from transformers import GenerationConfig, LlamaForCausalLM, LlamaTokenizer, Qwen2ForCausalLM  # noqa: F401

    flash = types.ModuleType("flash_attn")
    padding = types.ModuleType("flash_attn.bert_padding")

    def unavailable(*args, **kwargs):
        raise RuntimeError("flash_attn is not available: the goldens run the eager attention")

    flash.flash_attn_func = flash.flash_attn_varlen_func = unavailable
    padding.pad_input = padding.index_first_axis = padding.unpad_input = unavailable
    flash.bert_padding = padding
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_layers = types.ModuleType("timm.models.layers")

    class DropPath(nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("DropPath is only built for drop_path_rate > 0")

    timm_layers.DropPath = DropPath
    peft = types.ModuleType("peft")
    peft.LoraConfig = peft.get_peft_model = unavailable
    for module in (flash, padding, timm, timm_models, timm_layers, peft):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    sys.modules.update(
        {
            "flash_attn": flash,
            "flash_attn.bert_padding": padding,
            "timm": timm,
            "timm.models": timm_models,
            "timm.models.layers": timm_layers,
            "peft": peft,
        }
    )
    pdb.set_trace = lambda *args, **kwargs: None


def import_release(code: Path, work: Path):
    """The released files as a package of their own (they import each other relatively)."""
    package = work / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in RELEASE_FILES:
        shutil.copy(code / name, package / name)
    sys.path.insert(0, str(work))
    chat = __import__(f"{PACKAGE}.modeling_internvl_chat", fromlist=["InternVLChatModel"])
    tokenization = __import__(f"{PACKAGE}.tokenization_internlm2", fromlist=["InternLM2Tokenizer"])
    conversation = __import__(f"{PACKAGE}.conversation", fromlist=["get_conv_template"])
    return chat.InternVLChatModel, tokenization.InternLM2Tokenizer, conversation.get_conv_template


def write_tokenizer(folder: Path, internlm2: Path) -> int:
    """The InternLM2 golden's tokenizer + HoVLE's added tokens (ids after the base vocabulary)."""
    shutil.copy(internlm2 / "tokenizer.model", folder / "tokenizer.model")
    config = json.loads((internlm2 / "tokenizer_config.json").read_text())
    base = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    added = {token: base + i for i, token in enumerate(ADDED_TOKENS)}
    for token, i in added.items():
        config["added_tokens_decoder"][str(i)] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    special["additional_special_tokens"] = config.get("additional_special_tokens", [])
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return base + len(ADDED_TOKENS)


def release_config(variant: str, vocab: int, img_context: int) -> dict:
    hd = variant == "hovle-hd"
    # HD: the embedding module's text table is split as the release allows (base vocabulary + a
    # special-token table for the added tokens); plain HoVLE keeps one table
    base_vocab = vocab - len(ADDED_TOKENS)
    special = {t: base_vocab + i for i, t in enumerate(ADDED_TOKENS)} if hd else {}
    embedding = {
        "architectures": ["HolisticEmbedding"],
        "model_type": "holistic_embedding",
        "num_hidden_layers": EMBEDDING_LAYERS,
        "num_channels": 3,
        "patch_size": PATCH,
        "image_size": IMAGE_SIZE,
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": ROPE_SCALING,
        "intermediate_size": FFN,
        "mlp_bias": False,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,  # not the LLM's 1e-5: the importer must carry the module's own
        "use_ls": False,
        "use_img_start_end_tokens": True,
        "special_token_maps": special,
        "llm_vocab_size": base_vocab if hd else vocab,
        "llm_hidden_size": HIDDEN,
        "attn_implementation": "eager",
        "downsample_ratio": 0.5,
        "img_context_token_id": img_context,
        "pixel_shuffle_loc": "post" if hd else "pre",
        "use_pixel_shuffle_proj": True,
        "drop_path_rate": 0.0,
    }
    llm = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LLM_LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": ROPE_SCALING,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": vocab,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "embedding_config": embedding,
        "llm_config": llm,
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": IMAGE_SIZE,
        "max_dynamic_patch": 12 if hd else 6,
        "min_dynamic_patch": 1,
        "normalize_encoder_output": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "torch_dtype": "float32",
        "use_thumbnail": True,
    }


def randomise(model: nn.Module) -> dict[str, torch.Tensor]:
    """Seeded weights for every tensor of the released model (norms around 1, not all ones)."""
    gen = torch.Generator().manual_seed(SEED)
    state = {}
    for name, tensor in model.state_dict().items():
        scale = 0.5 if "embeddings.weight" in name or "tok_embeddings" in name else 0.15
        if "position_embedding" in name:
            scale = 0.3
        value = torch.randn(tensor.shape, generator=gen) * scale
        if name.endswith("norm.weight"):
            value = 1.0 + torch.randn(tensor.shape, generator=gen) * 0.2
        state[name] = value
    model.load_state_dict(state)
    return state


def write_shards(folder: Path, state: dict[str, torch.Tensor]) -> None:
    groups = [
        {k: v for k, v in state.items() if k.startswith("embedding_model.")},
        {k: v for k, v in state.items() if k.startswith("language_model.model.layers.")},
        {k: v for k, v in state.items() if k.startswith("language_model.") and ".layers." not in k},
    ]
    assert sum(len(g) for g in groups) == len(state)
    weight_map = {}
    for i, tensors in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def prompts(get_conv_template, tiles: int, tokens_per_tile: int) -> list[str]:
    """The released chat() prompt: its template, `<image>` replaced by the image tokens."""
    out = []
    for question, with_image in ((QUESTION, False), ("<image>\n" + QUESTION, True)):
        template = get_conv_template("internlm2-chat")
        template.system_message = SYSTEM
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        if with_image:
            query = query.replace(
                "<image>", "<img>" + "<IMG_CONTEXT>" * tokens_per_tile * tiles + "</img>", 1
            )
        out.append(query)
    return out


def released_text_only(model, ids: torch.Tensor) -> torch.Tensor:
    """HD on text alone: the released forward then pixel-shuffles an empty image feature and fails
    (`pixel_shuffle_loc: post`), so the same released modules are stepped here as its forward steps them
    up to that point (text table, encoder layers with the causal 2-D mask and arange positions), and the
    released LLM runs on their output, as the forward would hand it on."""
    mask = torch.ones(1, len(ids), dtype=torch.long)
    hidden = model.embedding_model.get_input_embeddings(ids[None])
    positions = torch.arange(len(ids))[None]
    for layer in model.embedding_model.encoder:
        hidden = layer(hidden_states=hidden, attention_mask=mask, position_ids=positions)[0]
    return model.language_model(inputs_embeds=hidden, attention_mask=mask, return_dict=True).logits[0]


def make_variant(variant: str, args, classes) -> None:
    chat_model, tokenizer_class, get_conv_template = classes
    out = args.out / variant
    checkpoint = out / "checkpoint"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    checkpoint.mkdir(parents=True)
    vocab = write_tokenizer(checkpoint, args.internlm2)
    tokenizer = tokenizer_class.from_pretrained(str(checkpoint))  # as the release loads it (its configs)
    img_context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    config = release_config(variant, vocab, img_context)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(SEED)
    config_class = chat_model.config_class
    model = chat_model(config_class(**{k: v for k, v in config.items() if k != "auto_map"}))
    state = randomise(model)
    write_shards(checkpoint, state)

    per_tile = (IMAGE_SIZE // PATCH) ** 2 // 4
    hd = variant == "hovle-hd"
    gen = torch.Generator().manual_seed(SEED + 1)
    text, image = prompts(get_conv_template, TILES, per_tile)
    hd_image = prompts(get_conv_template, TILES, per_tile * 4)[1]
    cases = [
        {"query": text},
        {"ids": torch.randint(3, vocab - len(ADDED_TOKENS), (MAX_POSITIONS + 4,), generator=gen)},
        {
            "query": image,
            "hd_query": hd_image,
            "pixels": torch.randn(TILES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
        },
    ]
    goldens, rendered = {}, []
    for i, case in enumerate(cases):
        ids = case["ids"] if "ids" in case else torch.tensor(tokenizer(case["query"])["input_ids"])
        hd_ids = torch.tensor(tokenizer(case["hd_query"])["input_ids"]) if "hd_query" in case else ids
        pixels = case.get("pixels")
        model = chat_model.from_pretrained(str(checkpoint), torch_dtype=torch.float32).eval()
        model.img_context_token_id = img_context
        with torch.no_grad():
            if hd and pixels is None:
                logits = released_text_only(model, ids)
            else:
                logits = model(
                    pixel_values=pixels,
                    input_ids=ids[None],
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    hd_input_ids=hd_ids[None],
                    hd_attention_mask=torch.ones(1, len(hd_ids), dtype=torch.long),
                    use_cache=False,
                    return_dict=True,
                ).logits[0]
        goldens[f"input_ids_{i}"] = ids
        goldens[f"logits_{i}"] = logits.contiguous()
        if hd:
            goldens[f"hd_input_ids_{i}"] = hd_ids.clone()
        if pixels is not None:
            goldens[f"pixel_values_{i}"] = pixels
        rendered.append({"query": case.get("query"), "length": len(ids), "embedding_length": len(hd_ids)})
    save_file(goldens, str(out / "golden_logits.safetensors"), metadata={"format": "pt"})
    made_with = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    (out / "golden_inputs.json").write_text(
        json.dumps({"inputs": rendered, "system_message": SYSTEM, "made_with": made_with}, indent=1) + "\n"
    )
    print(f"wrote {out}: vocab {vocab}, {len(cases)} inputs, lengths {[r['length'] for r in rendered]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release-code", required=True, type=Path, help="folder with HoVLE's released .py")
    parser.add_argument("--out", required=True, type=Path, help="e.g. tests/data/golden")
    parser.add_argument(
        "--internlm2",
        type=Path,
        default=Path("tests/data/golden/internlm2/checkpoint"),
        help="the InternLM2 golden checkpoint whose tokenizer is reused",
    )
    args = parser.parse_args(argv)
    missing = [f for f in RELEASE_FILES if not (args.release_code / f).is_file()]
    if missing:
        parser.error(f"{args.release_code} lacks {', '.join(missing)}")
    install_stand_ins()
    with tempfile.TemporaryDirectory() as tmp:
        classes = import_release(args.release_code, Path(tmp))
        for variant in ("hovle", "hovle-hd"):
            make_variant(variant, args, classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
