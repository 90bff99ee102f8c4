"""Make the InternLM2 goldens that `hovle import internlm2` is tested against (tests/data/golden/internlm2).

Run it ONCE, outside the project's environment, in a virtualenv where InternLM2's released code runs
(transformers 4.4x + sentencepiece + einops), giving it the folder holding the released
`configuration_internlm2.py`, `modeling_internlm2.py`, `tokenization_internlm2.py` and
`tokenization_internlm2_fast.py` (never committed here):

    python tools/golden/make_internlm2_golden.py --release-code /tmp/internlm2_ref \
        --out tests/data/golden/internlm2

It writes, in the released layout:
  checkpoint/    a tiny random InternLM2 (seeded): config.json with auto_map and the release's dynamic
                 rope scaling, fused `wqkv`, two safetensors shards + index, a sentencepiece BPE
                 tokenizer.model trained here on a fixed text, tokenizer_config.json with the chat
                 template and the chat special tokens
  golden_logits.safetensors   `input_ids_<i>` and the released model's `logits_<i>` (fp32), each input
                 run on a freshly loaded model (the released dynamic-NTK rotary cache is stateful)
  golden_tokens.json          the released tokenizer's ids for a fixed text set and its chat template
                 rendered (text and ids) for fixed conversations
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from safetensors.torch import save_file

RELEASE_FILES = (
    "configuration_internlm2.py",
    "modeling_internlm2.py",
    "tokenization_internlm2.py",
    "tokenization_internlm2_fast.py",
)
CHAT_TOKENS = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
]
# InternLM2-chat's template (tokenizer_config.json of the released chat models)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEED = 15
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 64
MAX_POSITIONS = 16  # small, so that a 24-token input exercises the dynamic NTK scaling
ROPE_SCALING = {"type": "dynamic", "factor": 2.0}  # as the released InternLM2(-chat) config.json files
ROPE_THETA = 1000000

WORDS = (
    "the a model image token vision language holistic embedding layer attention head query key value "
    "shard checkpoint train stage align distill instruct answer question picture cat dog red blue green "
    "small large 0 1 2 3 4 5 6 7 8 9 is are was of to in on with for and or not what which where how"
).split()

TEXTS = [
    "the model answers the question",
    "What is in the picture?",
    "  two leading spaces and  double   spaces ",
    "line one\nline two\n\nafter a blank line",
    "digits 2024 and 3.14159",
    "café naïve — 中文 😀 unseen bytes",
    "<|im_start|>user\nwhich cat is red?<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\ttrailing\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is in the picture?"}],
    [
        {"role": "system", "content": "You are a holistic vision language model."},
        {"role": "user", "content": "which dog is blue?"},
        {"role": "assistant", "content": "the small one"},
        {"role": "user", "content": "and the cat?"},
    ],
]


def training_text() -> str:
    """A fixed pseudo-random corpus for the tokenizer (seeded, so the text never changes)."""
    rng = random.Random(SEED)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    return "\n".join(lines + TEXTS[:5] + ["What is in the picture?"] * 5) + "\n"


def train_tokenizer(folder: Path, work: Path) -> int:
    corpus = work / "corpus.txt"
    corpus.write_text(training_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(work / "tokenizer"),
        model_type="bpe",
        vocab_size=448,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=CHAT_TOKENS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    # the trainer records its temporary paths in the model: drop them so reruns write the same bytes
    # transformers' copy of the proto module: the released fast tokenizer's converter loads that one too,
    # and protobuf refuses a second registration of the same .proto file
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((work / "tokenizer.model").read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {
        str(i): {
            "content": piece,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, piece in [(0, "<unk>"), (1, "<s>"), (2, "</s>")]
        + [(processor.piece_to_id(t), t) for t in CHAT_TOKENS]
    }
    config = {
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "added_tokens_decoder": added,
        "additional_special_tokens": CHAT_TOKENS,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "InternLM2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return processor.get_piece_size()


def write_checkpoint(folder: Path, vocab: int) -> None:
    head_dim = HIDDEN // HEADS
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "attn_implementation": "eager",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "internlm2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": ROPE_SCALING,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(SEED)

    def weight(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm() -> torch.Tensor:  # not all ones: a swapped norm would show in the logits
        return 1.0 + weight(HIDDEN, scale=0.2)

    qkv_rows = (HEADS + 2 * KV_HEADS) * head_dim
    shards: list[dict[str, torch.Tensor]] = [
        {"model.tok_embeddings.weight": weight(vocab, HIDDEN, scale=0.5)}
    ]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shards[-1].update(
            {
                p + "attention.wqkv.weight": weight(qkv_rows, HIDDEN),
                p + "attention.wo.weight": weight(HIDDEN, HEADS * head_dim),
                p + "feed_forward.w1.weight": weight(FFN, HIDDEN),
                p + "feed_forward.w3.weight": weight(FFN, HIDDEN),
                p + "feed_forward.w2.weight": weight(HIDDEN, FFN),
                p + "attention_norm.weight": norm(),
                p + "ffn_norm.weight": norm(),
            }
        )
        shards.append({})
    shards[-1].update({"model.norm.weight": norm(), "output.weight": weight(vocab, HIDDEN, scale=0.3)})
    weight_map = {}
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def golden_inputs(vocab: int, chat_ids: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED + 1)
    lengths = (7, MAX_POSITIONS, MAX_POSITIONS + 8)  # below, at and past max_position_embeddings
    randoms = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    return [*randoms, torch.tensor(chat_ids)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--release-code", required=True, type=Path, help="folder with InternLM2's released .py"
    )
    parser.add_argument("--out", required=True, type=Path, help="e.g. tests/data/golden/internlm2")
    args = parser.parse_args(argv)
    missing = [f for f in RELEASE_FILES if not (args.release_code / f).is_file()]
    if missing:
        parser.error(f"{args.release_code} lacks {', '.join(missing)}")
    checkpoint = args.out / "checkpoint"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    checkpoint.mkdir(parents=True)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vocab = train_tokenizer(checkpoint, work)
        write_checkpoint(checkpoint, vocab)
        # the released code runs from a copy: checkpoint + code side by side, as on the model hub
        runnable = work / "runnable"
        shutil.copytree(checkpoint, runnable)
        for name in RELEASE_FILES:
            shutil.copy(args.release_code / name, runnable / name)
        tokens = tokenizer_goldens(runnable)
        chat_ids = tokens["chat"][1]["ids"]
        logits = {}
        for i, ids in enumerate(golden_inputs(vocab, chat_ids)):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                runnable, trust_remote_code=True, torch_dtype=torch.float32
            ).eval()
            with torch.no_grad():
                out = model(input_ids=ids[None], use_cache=False).logits[0]
            logits[f"input_ids_{i}"] = ids
            logits[f"logits_{i}"] = out.contiguous()
    save_file(logits, str(args.out / "golden_logits.safetensors"), metadata={"format": "pt"})
    tokens["made_with"] = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sentencepiece": spm.__version__,
        "python": sys.version.split()[0],
    }
    (args.out / "golden_tokens.json").write_text(json.dumps(tokens, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: vocab {vocab}, {len(logits) // 2} logit goldens, {len(TEXTS)} texts")
    return 0


def tokenizer_goldens(runnable: Path) -> dict:
    """The released slow (sentencepiece) tokenizer's ids and chat renderings; the released fast one's
    ids alongside, for the record."""
    slow = transformers.AutoTokenizer.from_pretrained(runnable, trust_remote_code=True, use_fast=False)
    fast = transformers.AutoTokenizer.from_pretrained(runnable, trust_remote_code=True, use_fast=True)
    chats = []
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            rendered = slow.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            ids = slow.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
            chats.append(
                {"messages": messages, "add_generation_prompt": prompt, "rendered": rendered, "ids": ids}
            )
    return {
        "texts": TEXTS,
        "ids": [slow(text)["input_ids"] for text in TEXTS],
        "released_fast_ids": [fast(text)["input_ids"] for text in TEXTS],
        "decoded": [slow.decode(slow(text)["input_ids"], skip_special_tokens=True) for text in TEXTS],
        "chat": chats,
    }


if __name__ == "__main__":
    sys.exit(main())
