"""`hovle import internlm2`: the converted tiny checkpoint reproduces InternLM2's released code.

The goldens (tests/data/golden/internlm2) were made once by tools/golden/make_internlm2_golden.py, which
ran the released modelling and tokenizer code on the committed tiny checkpoint; nothing here runs it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import cli, importer
from model.convert import ConversionError, shards
from model.convert.internlm2 import convert_tensor, import_checkpoint, llama_config, llama_name, split_wqkv
from tests.helpers import track_conversion_memory

GOLDEN = Path(__file__).parent / "data" / "golden" / "internlm2"
SOURCE = GOLDEN / "checkpoint"
TOKENS = json.loads((GOLDEN / "golden_tokens.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return import_checkpoint(SOURCE, tmp_path_factory.mktemp("llama") / "out", max_shard_bytes=150_000)


def golden_logits() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_file(str(GOLDEN / "golden_logits.safetensors"))
    return [(data[f"input_ids_{i}"], data[f"logits_{i}"]) for i in range(len(data) // 2)]


def logits_of(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def test_converted_checkpoint_reproduces_the_released_models_logits(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert len(list(converted.glob("model-*.safetensors"))) >= 2  # written as shards, with an index
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    for ids, expected in golden_logits():
        with torch.no_grad():
            got = model(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5)


def test_the_longest_golden_needs_the_dynamic_rope_scaling(converted, tmp_path):
    """The 24-token golden passes max_position_embeddings (16): without the translated dynamic NTK scaling
    it is not reproduced, while the short ones still are."""
    plain = tmp_path / "plain"
    shutil.copytree(converted, plain)
    config = json.loads((plain / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "dynamic"
    config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": config["rope_parameters"]["rope_theta"],
    }
    (plain / "config.json").write_text(json.dumps(config))
    (short_ids, short), _, (long_ids, long) = golden_logits()[:3]
    assert long_ids.numel() > config["max_position_embeddings"] >= short_ids.numel()
    torch.testing.assert_close(logits_of(plain, short_ids), short, rtol=1e-5, atol=5e-5)
    assert (logits_of(plain, long_ids) - long).abs().max() > 1e-3


def test_converted_tokenizer_gives_the_released_ids_and_decodes_alike(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for text, ids, decoded in zip(TOKENS["texts"], TOKENS["ids"], TOKENS["decoded"], strict=True):
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == decoded, text


def test_converted_chat_template_renders_like_the_release(converted):
    release = json.loads((SOURCE / "tokenizer_config.json").read_text())["chat_template"]
    assert (converted / "chat_template.jinja").read_text() == release
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for chat in TOKENS["chat"]:
        kwargs = dict(add_generation_prompt=chat["add_generation_prompt"])
        assert tokenizer.apply_chat_template(chat["messages"], tokenize=False, **kwargs) == chat["rendered"]
        ids = tokenizer.apply_chat_template(chat["messages"], tokenize=True, **kwargs)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == chat["ids"]


def _source_tensors() -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(SOURCE.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}


def _write_internlm2(folder: Path, layers: int) -> int:
    """A random InternLM2 checkpoint with the golden's shapes and `layers` layers, one safetensors shard
    per layer (the first also holds the embedding, the last the final norm and head); its size in bytes."""
    folder.mkdir()
    config = json.loads((SOURCE / "config.json").read_text()) | {"num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(config))
    golden = _source_tensors()
    layer0 = {k: v for k, v in golden.items() if k.startswith("model.layers.0.")}
    weight_map, total = {}, 0
    for i in range(layers):
        shard = {k.replace("layers.0.", f"layers.{i}."): torch.randn_like(v) for k, v in layer0.items()}
        if i == 0:
            shard["model.tok_embeddings.weight"] = torch.randn_like(golden["model.tok_embeddings.weight"])
        if i == layers - 1:
            shard["model.norm.weight"] = torch.randn_like(golden["model.norm.weight"])
            shard["output.weight"] = torch.randn_like(golden["output.weight"])
        name = f"model-{i:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (folder / shards.SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return total


def test_conversion_holds_about_one_shard_at_a_time(tmp_path, monkeypatch):
    """Measured: the bytes of source tensors still alive (weak references on every tensor read) and the
    bytes the shard writer buffers, at every step of a 12-shard conversion."""
    total = _write_internlm2(tmp_path / "big", layers=12)
    layer_bytes = total // 12
    alive, writers = track_conversion_memory(monkeypatch)
    out = import_checkpoint(tmp_path / "big", tmp_path / "out", max_shard_bytes=layer_bytes)

    (writer,) = writers
    assert writer.total_bytes == total
    assert len(list(out.glob("model-*.safetensors"))) >= 10
    largest = max(t.numel() * t.element_size() for t in _source_tensors().values())
    assert writer.peak_bytes <= layer_bytes + largest
    assert alive["peak"] <= layer_bytes + 2 * largest  # one output shard's sources + the tensor in hand
    assert alive["peak"] < total / 4 and alive["bytes"] == 0


def test_safe_bin_checkpoint_converts_like_safetensors(converted, tmp_path):
    source = tmp_path / "bin"
    source.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SOURCE / name, source / name)
    torch.save(_source_tensors(), source / "pytorch_model.bin")
    out = import_checkpoint(source, tmp_path / "out")
    ids, expected = golden_logits()[0]
    torch.testing.assert_close(logits_of(out, ids), expected, rtol=1e-5, atol=5e-5)


def test_import_cli_writes_a_loadable_folder(tmp_path, capsys):
    assert importer.main(["internlm2", "--from", str(SOURCE), "--to", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()  # 2GB shards: one file
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("the cat")["input_ids"][0] == 1


def _cli(capsys, source: Path, dest: Path) -> tuple[int, str]:
    code = importer.main(["internlm2", "--from", str(source), "--to", str(dest)])
    return code, capsys.readouterr().err


def test_cli_missing_folder_exits_2(tmp_path, capsys):
    code, err = _cli(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert code == 2 and "no such folder" in err and "nowhere" in err
    # the same through `hovle import`
    assert cli.main(["import", "internlm2", "--from", str(tmp_path / "nowhere"), "--to", "x"]) == 2
    assert "hovle import internlm2: --from" in capsys.readouterr().err


def test_cli_refuses_a_corrupt_shard(tmp_path, capsys):
    shutil.copytree(SOURCE, tmp_path / "src")
    (tmp_path / "src" / "model-00002-of-00003.safetensors").write_bytes(b"not safetensors")
    code, err = _cli(capsys, tmp_path / "src", tmp_path / "out")
    assert code == 2 and "model-00002-of-00003.safetensors: not a readable safetensors file" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_config_that_is_not_internlm2(tmp_path, capsys):
    shutil.copytree(SOURCE, tmp_path / "src")
    config = json.loads((SOURCE / "config.json").read_text()) | {"model_type": "llama"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    code, err = _cli(capsys, tmp_path / "src", tmp_path / "out")
    assert code == 2 and "model_type 'llama', expected 'internlm2'" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_pickle_that_is_more_than_tensors(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(SOURCE / "config.json", source / "config.json")
    # a pickle naming a callable: weights_only loading refuses it without ever calling it
    torch.save({"model.norm.weight": torch.ones(4), "payload": os.system}, source / "pytorch_model.bin")
    code, err = _cli(capsys, source, tmp_path / "out")
    assert code == 2 and "pytorch_model.bin: refused" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_output_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = _cli(capsys, SOURCE, tmp_path / "out")
    assert code == 2 and "not an empty folder" in err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    from model.convert import internlm2_tokenizer

    def broken(source, dest):
        raise RuntimeError("disk full")

    monkeypatch.setattr(internlm2_tokenizer, "convert_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        import_checkpoint(SOURCE, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_split_wqkv_follows_the_per_kv_head_grouping():
    heads, kv_heads, head_dim = 4, 2, 3
    # row r of wqkv is filled with r; group g holds q heads 2g, 2g+1, then k head g, then v head g
    bias = torch.arange((heads + 2 * kv_heads) * head_dim, dtype=torch.float32)
    q, k, v = split_wqkv(bias, heads, kv_heads, head_dim)
    assert q.tolist() == [*range(0, 6), *range(12, 18)]
    assert k.tolist() == [*range(6, 9), *range(18, 21)]
    assert v.tolist() == [*range(9, 12), *range(21, 24)]
    weight = bias[:, None].repeat(1, 5)
    assert torch.equal(split_wqkv(weight, heads, kv_heads, head_dim)[1][:, 0], k)
    with pytest.raises(ConversionError, match="output rows"):
        split_wqkv(bias[:-1], heads, kv_heads, head_dim)


def test_names_and_config_translate_and_unknowns_are_refused():
    assert llama_name("model.layers.1.feed_forward.w2.weight") == "model.layers.1.mlp.down_proj.weight"
    assert llama_name("output.weight") == "lm_head.weight"
    for name in ("model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wk.weight", "lm_head"):
        with pytest.raises(KeyError):
            llama_name(name)
    source = json.loads((SOURCE / "config.json").read_text())
    names = [n for n, _ in convert_tensor("model.layers.1.attention.wqkv.bias", torch.zeros(128), source)]
    assert names == [f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv"]
    linear = llama_config(source | {"rope_scaling": {"type": "linear", "factor": 4.0}, "bias": True})
    assert linear["rope_parameters"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}
    assert linear["attention_bias"] is True and linear["mlp_bias"] is False
    with pytest.raises(ConversionError, match="rope_scaling"):
        llama_config(source | {"rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_converted_internlm2_serves_as_a_hovle_llm(converted):
    """A run config's `model.llm.path` may name the converted folder: with the identity-initialised
    embedding module, HoVLE's text-only logits are the converted LLM's."""
    from helpers import _tiny_spec

    from model.presets import build_model, config_from_spec, parse_model_spec

    spec = copy.deepcopy(_tiny_spec())
    spec["llm"] = {"path": str(converted), "attn_implementation": "eager"}
    spec["embedding"] |= {"init": "identity"}
    config = config_from_spec(parse_model_spec(spec))
    model = build_model(config).eval()
    llm = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = golden_logits()[3][0][None]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = llm(input_ids=ids).logits
    vocab = theirs.shape[-1]
    assert ours.shape[-1] > vocab  # HoVLE's image tokens were added
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=1e-5, atol=1e-5)
