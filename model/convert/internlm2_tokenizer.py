"""InternLM2's sentencepiece tokenizer (`tokenizer.model` + tokenizer_config.json) -> a `tokenizers` fast
tokenizer with the same ids, its special tokens and chat template, which transformers loads natively.

The sentencepiece model is read with protobuf (no sentencepiece package). It is a BPE model with byte
fallback: the vocabulary keeps sentencepiece's ids, merges are derived from the pieces (a piece is the
merge of any two pieces that spell it, ranked by the merged piece's id, as sentencepiece merges the
best-scoring piece first), and the normalizer does what sentencepiece does before its BPE: normalize,
prepend the dummy-prefix `▁`, turn spaces into `▁`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from model.convert import ConversionError

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPACE = "\u2581"  # sentencepiece's visible space
_BPE, _NORMAL, _USER_DEFINED = 2, 1, 4  # sentencepiece_model.proto enum values


def _read_spm(path: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError is not importable under one stable name
        raise ConversionError(f"{path}: not a sentencepiece model ({err})") from err
    if proto.trainer_spec.model_type != _BPE:
        raise ConversionError(f"{path}: a sentencepiece BPE model was expected (InternLM2's is BPE)")
    return proto


def _merges(pieces: list[str], kinds: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of pieces whose concatenation is a normal piece, ranked by that piece's id
    (then the parts' ids): the order in which sentencepiece's BPE prefers merges."""
    ids = {piece: i for i, piece in enumerate(pieces) if kinds[i] == _NORMAL}
    ranked = []
    for piece, merged_id in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((merged_id, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(spec) -> normalizers.Normalizer:
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:  # a non-identity rule (e.g. nmt_nfkc) ships its table
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer equivalent to the InternLM2 tokenizer in `folder` (tokenizer.model and,
    when present, tokenizer_config.json with its added tokens and chat template)."""
    proto = _read_spm(folder / SPM_FILE)
    config = _tokenizer_config(folder)
    pieces = [p.piece for p in proto.pieces]
    kinds = [p.type for p in proto.pieces]
    spec = proto.trainer_spec
    unk = pieces[spec.unk_id] if spec.unk_id >= 0 else None
    model = BPE(
        {piece: i for i, piece in enumerate(pieces)},
        _merges(pieces, kinds),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=spec.byte_fallback,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(proto.normalizer_spec)
    strip = [decoders.Strip(content=" ", left=1)] if proto.normalizer_spec.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )

    # sentencepiece matches user-defined pieces atomically; tokenizer_config.json may name more
    added: dict[int, AddedToken] = {
        i: AddedToken(piece, special=False, normalized=False)
        for i, piece in enumerate(pieces)
        if kinds[i] == _USER_DEFINED
    }
    for key, entry in config.get("added_tokens_decoder", {}).items():
        i, content = int(key), entry["content"]
        if i < len(pieces) and pieces[i] != content:
            raise ConversionError(f"{CONFIG_FILE}: added token {i} is {content!r}, the piece {pieces[i]!r}")
        added[i] = AddedToken(
            content,
            special=entry.get("special", True),
            normalized=entry.get("normalized", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            single_word=entry.get("single_word", False),
        )
    beyond = [i for i in added if i >= len(pieces)]
    if beyond and sorted(beyond) != list(range(len(pieces), len(pieces) + len(beyond))):
        raise ConversionError(f"{CONFIG_FILE}: added token ids {sorted(beyond)} leave gaps after the pieces")
    tokenizer.add_tokens([added[i] for i in sorted(added) if not added[i].special])
    tokenizer.add_special_tokens([added[i] for i in sorted(added) if added[i].special])

    bos, eos = config.get("bos_token", "<s>"), config.get("eos_token", "</s>")
    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    used = [t for t in (bos,) * add_bos + (eos,) * add_eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(used)]
    )
    specials = [added[i].content for i in sorted(added) if added[i].special]
    named = {bos, eos, config.get("unk_token", unk), config.get("pad_token", eos)}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=config.get("unk_token", unk),
        pad_token=config.get("pad_token", eos),
        additional_special_tokens=[t for t in specials if t not in named],
        chat_template=config.get("chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=config.get("model_max_length", 1_000_000_000_000_000_000_000_000_000),
    )


def convert_tokenizer(source: Path, dest: Path) -> PreTrainedTokenizerFast:
    """Write the fast tokenizer for the InternLM2 tokenizer in `source` into `dest` (tokenizer.json,
    tokenizer_config.json, chat_template.jinja when there is a template)."""
    tokenizer = build_tokenizer(source)
    tokenizer.save_pretrained(str(dest))
    template = tokenizer.chat_template
    if template and not (dest / CHAT_TEMPLATE_FILE).is_file():
        (dest / CHAT_TEMPLATE_FILE).write_text(template)
    logger.info("tokenizer: %d tokens, chat template: %s", len(tokenizer), "yes" if template else "no")
    return tokenizer
