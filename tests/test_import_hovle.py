"""`hovle import hovle`: converted tiny HoVLE and HoVLE-HD checkpoints reproduce the released code.

The goldens (tests/data/golden/hovle, tests/data/golden/hovle-hd) were made once by
tools/golden/make_hovle_golden.py, which ran the released HoVLE code on the committed tiny checkpoints;
nothing here runs it. Each variant has three inputs: the release's chat prompt (text only), random text
past max_position_embeddings (the dynamic rope scaling at work) and the chat prompt with a 3-tile image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from jobs import importer
from model import HoVLEConfig, HoVLEForConditionalGeneration, HoVLEProcessor, load_pretrained
from model.convert import ConversionError, shards
from model.convert.hovle import RUN_CONFIG_FILE, import_checkpoint
from model.presets import load_preset
from tests.helpers import shapes_image, track_conversion_memory

GOLDEN = Path(__file__).parent / "data" / "golden"
VARIANTS = ("hovle", "hovle-hd")
TEXT, LONG, IMAGE = 0, 1, 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hovle")
    return {
        v: import_checkpoint(GOLDEN / v / "checkpoint", root / v, max_shard_bytes=100_000) for v in VARIANTS
    }


def goldens(variant: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / variant / "golden_logits.safetensors"))


def logits(model, data: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=data[f"input_ids_{i}"][None], pixel_values=data.get(f"pixel_values_{i}")
        ).logits[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_model_reproduces_the_released_logits(converted, variant):
    folder = converted[variant]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "hovle" and "auto_map" not in config
    assert len(list(folder.glob("model-*.safetensors"))) >= 2  # written as shards, with an index
    model = load_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.shuffle_location == ("post" if variant == "hovle-hd" else "pre")
    im_end = HoVLEProcessor.from_pretrained(folder).tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id[0] == im_end and not model.generation_config.do_sample
    data = goldens(variant)
    for i in (TEXT, LONG, IMAGE):
        torch.testing.assert_close(logits(model, data, i), data[f"logits_{i}"], rtol=1e-5, atol=2e-5)


def test_hd_needs_the_released_raster_layout(converted):
    """With the project's slot layout (each slot's 2x2 block at one shared position) the same HD weights
    give other logits on the image input; text alone is unaffected."""
    data = goldens("hovle-hd")
    model = load_pretrained(converted["hovle-hd"], dtype=torch.float32, post_shuffle_layout="slot").eval()
    torch.testing.assert_close(logits(model, data, TEXT), data[f"logits_{TEXT}"], rtol=1e-5, atol=2e-5)
    assert (logits(model, data, IMAGE) - data[f"logits_{IMAGE}"]).abs().max() > 1e-2
    assert len(data[f"hd_input_ids_{IMAGE}"]) > len(data[f"input_ids_{IMAGE}"])  # the release's 16/tile


def test_the_embedding_modules_own_rope_scaling_and_norm_are_carried(converted):
    """The long golden passes the module's max_position_embeddings: without its dynamic scaling it is not
    reproduced; with the LLM's norm epsilon instead of the module's, nothing is."""
    data = goldens("hovle")
    unscaled = load_pretrained(converted["hovle"], dtype=torch.float32, embedding_rope_scaling=None).eval()
    torch.testing.assert_close(logits(unscaled, data, TEXT), data[f"logits_{TEXT}"], rtol=1e-5, atol=2e-5)
    assert (logits(unscaled, data, LONG) - data[f"logits_{LONG}"]).abs().max() > 1e-3
    other_eps = load_pretrained(converted["hovle"], dtype=torch.float32, embedding_rms_norm_eps=None).eval()
    assert (logits(other_eps, data, TEXT) - data[f"logits_{TEXT}"]).abs().max() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_yaml_and_processor_describe_the_converted_model(converted, variant):
    folder = converted[variant]
    saved = load_pretrained(folder, dtype=torch.float32).config
    section = yaml.safe_load((folder / RUN_CONFIG_FILE).read_text())["model"]
    assert section["llm"]["tokenizer"] == str(folder.resolve())
    from_yaml = load_preset(folder / RUN_CONFIG_FILE)
    assert from_yaml.embedding_layer_config().to_dict() == saved.embedding_layer_config().to_dict()
    for field in (
        "shuffle_location",
        "post_shuffle_layout",
        "tile_size",
        "patch_size",
        "img_context_token_id",
    ):
        assert getattr(from_yaml, field) == getattr(saved, field)
    assert from_yaml.text_config.rope_parameters == saved.text_config.rope_parameters
    assert from_yaml.chat_template == saved.chat_template  # the release's conversation template
    processor = HoVLEProcessor.from_pretrained(folder)
    assert processor.image_tokens_per_tile == saved.image_tokens_per_tile == 4
    # the released prompt (its conversation template + tokenizer) is what the converted template makes
    rendered = json.loads((GOLDEN / variant / "golden_inputs.json").read_text())
    messages = [
        {"role": "system", "content": rendered["system_message"]},
        {"role": "user", "content": "What is in the picture?"},
    ]
    text = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=saved.chat_template
    )
    assert text == "<s>" + rendered["inputs"][TEXT]["query"]
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == goldens(variant)[f"input_ids_{TEXT}"].tolist()
    # the processor builds the release's image prompt: a 2:1 picture is 2 tiles + the thumbnail
    messages[1]["content"] = "<image>\nWhat is in the picture?"
    batch = processor(messages, images=[shapes_image(56, 28)], add_generation_prompt=True)
    assert batch["pixel_values"].shape[0] == 3
    assert batch["input_ids"][0].tolist() == goldens(variant)[f"input_ids_{IMAGE}"].tolist()
    batch = processor(
        [*messages, {"role": "assistant", "content": "a red square"}], images=[shapes_image(56, 28)]
    )
    learnt = batch["input_ids"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(learnt) == "a red square<|im_end|>"


def test_hd_generation_with_a_cache_follows_the_uncached_model(converted):
    """Decoding steps carry the raster layout's position shift: greedy tokens with the KV cache are those
    of re-running the whole sequence without one."""
    data = goldens("hovle-hd")
    model = load_pretrained(converted["hovle-hd"], dtype=torch.float32).eval()
    ids, pixels = data[f"input_ids_{IMAGE}"][None], data[f"pixel_values_{IMAGE}"]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False)
        seq = ids
        for _ in range(5):
            step = model(input_ids=seq, pixel_values=pixels).logits[0, -1].argmax()
            seq = torch.cat([seq, step.view(1, 1)], dim=1)
    assert cached[0, ids.shape[1] :].tolist() == seq[0, ids.shape[1] :].tolist()


def test_hd_raster_samples_packed_in_one_row_match_them_alone(converted):
    """Packed samples (positions restarting) each get the positions and attention they get alone. The
    dynamic rope scaling is turned off here: it depends on the longest position in the row."""
    data = goldens("hovle-hd")
    config = HoVLEConfig.from_pretrained(converted["hovle-hd"])
    config.embedding_rope_scaling = None
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    model = HoVLEForConditionalGeneration.from_pretrained(converted["hovle-hd"], config=config).eval()
    first, second = data[f"input_ids_{IMAGE}"], data[f"input_ids_{TEXT}"]
    assert (second == config.img_context_token_id).sum() == 0
    packed = torch.cat([second[:9], first, second])[None]
    positions = torch.cat([torch.arange(9), torch.arange(len(first)), torch.arange(len(second))])[None]
    pixels = data[f"pixel_values_{IMAGE}"]
    with torch.no_grad():
        out = model(input_ids=packed, pixel_values=pixels, position_ids=positions).logits[0]
        alone_first = model(input_ids=first[None], pixel_values=pixels).logits[0]
        alone_second = model(input_ids=second[None]).logits[0]
    torch.testing.assert_close(out[9 : 9 + len(first)], alone_first, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out[-len(second) :], alone_second, rtol=1e-5, atol=2e-5)


def _one_tensor_per_shard(source: Path, dest: Path) -> int:
    """The golden checkpoint re-sharded one tensor per file (as a large release holds ~1 layer per shard)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weight_map, total = {}, 0
    for name, tensor in shards.iter_tensors(source):
        file = f"model-{len(weight_map) + 1:05d}.safetensors"
        save_file({name: tensor.contiguous()}, str(dest / file))
        weight_map[name] = file
        total += tensor.numel() * tensor.element_size()
    (dest / shards.SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return total


def test_conversion_streams_a_shard_at_a_time(tmp_path, monkeypatch):
    """Measured: the bytes of source tensors still alive (weak references on every tensor read) and what
    the shard writer buffers, over a conversion of a 47-shard checkpoint."""
    total = _one_tensor_per_shard(GOLDEN / "hovle-hd" / "checkpoint", tmp_path / "src")
    sizes = [t.numel() * t.element_size() for _, t in shards.iter_tensors(tmp_path / "src")]
    largest, tables = max(sizes), sorted(sizes)[-1] + sorted(sizes)[-2]
    alive, writers = track_conversion_memory(monkeypatch)
    budget = 20_000
    import_checkpoint(tmp_path / "src", tmp_path / "out", max_shard_bytes=budget)
    (writer,) = writers
    assert writer.total_bytes < total  # the class embedding and the class position row are dropped
    assert writer.peak_bytes <= budget + largest
    # an output shard's sources + the tensor in hand + the text tables, which wait for each other
    assert alive["peak"] <= budget + largest + tables
    assert alive["peak"] < total / 2 and alive["bytes"] == 0


def test_cli_imports_and_refuses_what_is_not_a_hovle_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    assert importer.main(["hovle", "--from", str(GOLDEN / "hovle" / "checkpoint"), "--to", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert load_pretrained(out).config.model_type == "hovle"
    # an InternLM2 checkpoint, a folder without config.json, a missing folder, a non-empty output
    internlm2 = GOLDEN / "internlm2" / "checkpoint"
    (tmp_path / "empty").mkdir()
    for source, dest, message in [
        (internlm2, tmp_path / "a", "not a HoVLE checkpoint"),
        (tmp_path / "empty", tmp_path / "b", "no config.json"),
        (tmp_path / "missing", tmp_path / "c", "no such folder"),
        (GOLDEN / "hovle" / "checkpoint", out, "not an empty folder"),
    ]:
        assert importer.main(["hovle", "--from", str(source), "--to", str(dest)]) == 2
        assert message in capsys.readouterr().err
        assert dest == out or not dest.exists()


def test_a_checkpoint_with_a_wrong_tensor_is_refused_and_leaves_nothing(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(GOLDEN / "hovle" / "checkpoint", source)
    config = json.loads((source / "config.json").read_text())
    config["embedding_config"]["num_hidden_layers"] = 1  # the checkpoint holds two layers
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="has no place"):
        import_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    config["embedding_config"]["num_hidden_layers"] = 2
    config["normalize_encoder_output"] = True
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="normalize_encoder_output"):
        import_checkpoint(source, tmp_path / "out")


def test_the_new_config_switches_are_validated_and_default_to_todays_model():
    from model.config import ConfigError
    from tests.helpers import tiny_config

    default = tiny_config()
    assert (default.post_shuffle_layout, default.embedding_rope_scaling) == ("slot", None)
    layer = default.embedding_layer_config()
    assert layer.rope_parameters["rope_type"] == "default" and layer.attention_bias is False
    scaled = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}, rms_norm_eps=1e-3)
    assert scaled.embedding_layer_config().rope_parameters["factor"] == 2.0
    assert scaled.embedding_layer_config().rms_norm_eps == 1e-3
    with pytest.raises(ConfigError, match="embedding_rope_scaling"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="embedding_rope_scaling"):
        tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, attention="defocus")
    with pytest.raises(ConfigError, match="post_shuffle_layout"):
        tiny_config(post_shuffle_layout="diagonal")
