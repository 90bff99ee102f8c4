"""The HoVLE network: shapes, geometry, generation with a KV cache, save/load, initialisation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from model import (
    ConfigError,
    HoVLEForConditionalGeneration,
    HoVLEProcessor,
    ImageTokenMismatch,
    build_model,
    load_preset,
)
from model.embedding import group_patches, pixel_shuffle
from tests.helpers import chat_batch, shapes_image, tiny_config, tiny_model


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["hovle-2.6b", "hovle-hd"])
def test_paper_presets_count_2_6b_parameters_on_meta(preset):
    model = build_model(load_preset(preset), device="meta")
    total, embedding, llm = count(model), count(model.embedding), count(model.language_model)
    assert abs(total - 2.6e9) / 2.6e9 <= 0.03, total
    assert total == embedding + llm
    assert abs(llm - 1.89e9) / 1.89e9 <= 0.02, llm  # InternLM2-1.8B: untied head, 92,553 tokens
    assert abs(embedding - 0.72e9) / 0.72e9 <= 0.03, embedding
    assert model.config.image_tokens_per_tile == 256


def test_tiny_preset_is_under_5m_parameters():
    model, _ = tiny_model()
    assert count(model) < 5_000_000


def test_pixel_shuffle_hand_worked():
    # a 4x4 grid of scalar features 0..15 (row-major); each 2x2 block becomes one token of 4 channels
    grid = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = pixel_shuffle(grid, 0.5)
    assert out.shape == (1, 2, 2, 4)
    assert out[0, 0, 0].tolist() == [0, 1, 4, 5]
    assert out[0, 0, 1].tolist() == [2, 3, 6, 7]
    assert out[0, 1, 0].tolist() == [8, 9, 12, 13]
    assert out[0, 1, 1].tolist() == [10, 11, 14, 15]
    # two channels: channel order is (dy, dx, c)
    two = torch.stack([grid[..., 0], -grid[..., 0]], dim=-1)
    assert pixel_shuffle(two, 0.5)[0, 0, 0].tolist() == [0, -0, 1, -1, 4, -4, 5, -5]
    assert group_patches(grid, 0.5)[0, 3, :, 0].tolist() == [10, 11, 14, 15]


@pytest.mark.parametrize("location", ["pre", "post"])
def test_forward_backward_shapes(location):
    model, processor = tiny_model(shuffle_location=location)
    batch = chat_batch(processor)
    out = model(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")},
        output_embedding_states=True,
    )
    b, length = batch["input_ids"].shape
    learnt = int((batch["labels"][:, 1:] != -100).sum())  # with labels: logits only where a label is learnt
    assert out.logits.shape == (learnt, model.config.text_config.vocab_size)
    assert out.embedding_states.shape == (b, length, model.config.text_config.hidden_size)
    out.loss.backward()
    assert model.embedding.patch_embed.weight.grad.abs().sum() > 0
    assert model.embedding.shuffle_mlp[0].weight.grad.abs().sum() > 0
    assert torch.isfinite(out.loss)


def test_the_loss_with_the_head_at_learnt_positions_only_is_the_llms_own():
    """The vocabulary head runs only where a label is learnt: the same loss and gradients as the LLM's own
    loss over logits at every position."""
    model, processor = tiny_model()
    batch = chat_batch(processor, n=3)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    out = model(**inputs, labels=batch["labels"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model(**inputs)  # no labels: logits at every position, the LLM's loss function on them
    reference = model.language_model.loss_function(
        logits=full.logits, labels=batch["labels"], vocab_size=model.config.text_config.vocab_size
    )
    reference.backward()

    b, length = batch["input_ids"].shape
    assert out.logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum()) < b * length
    torch.testing.assert_close(out.loss, reference, atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("location", ["pre", "post"])
def test_image_tokens_reach_the_output(location):
    model, processor = tiny_model(shuffle_location=location, init="random")
    batch = chat_batch(processor, n=1)
    a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    b = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].flip(-1)).logits
    assert not torch.allclose(a, b)


def test_slot_count_mismatch_raises():
    model, processor = tiny_model()
    batch = chat_batch(processor, n=1)
    with pytest.raises(ImageTokenMismatch, match="IMG_CONTEXT"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1].repeat(5, 1, 1, 1))
    with pytest.raises(ImageTokenMismatch, match="no pixel_values"):
        model(input_ids=batch["input_ids"])


@pytest.mark.parametrize(
    ("location", "attention"),
    [("pre", "standard"), ("post", "standard"), ("pre", "defocus"), ("post", "defocus")],
)
def test_greedy_generation_with_cache_equals_without(location, attention):
    model, processor = tiny_model(init_std=0.3, shuffle_location=location, attention=attention, init="random")
    model.eval()
    one = processor(
        [{"role": "user", "content": "<image>\nWhat colour is the ellipse?"}],
        images=[shapes_image()],
        add_generation_prompt=True,
    )
    two = processor(
        [{"role": "user", "content": "Hi <image> there"}],
        images=[shapes_image(28, 28, 3)],
        add_generation_prompt=True,
    )
    batch = processor.collate([one, two], padding_side="left")  # rows with different numbers of tiles
    kwargs = dict(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        eos_token_id=None,
    )
    cached = model.generate(**kwargs)
    recomputed = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    new = cached.sequences[:, batch["input_ids"].shape[1] :]
    assert len(set(new[0].tolist())) > 3  # a real continuation, not one repeated token
    alone = model.generate(
        input_ids=one["input_ids"],
        pixel_values=one["pixel_values"],
        attention_mask=one["attention_mask"],
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(alone[0, -12:], new[0])


def test_save_load_gives_identical_logits(tmp_path):
    model, processor = tiny_model(init_std=0.3, init="random")
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, HoVLEForConditionalGeneration)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded_processor, HoVLEProcessor)
    batch = chat_batch(reloaded_processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)
    assert torch.equal(batch["input_ids"], chat_batch(processor)["input_ids"])


def test_export_loads_without_ray_or_deepspeed(tmp_path):
    model, processor = tiny_model(init_std=0.3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import json, sys
        from model import HoVLEForConditionalGeneration, HoVLEProcessor
        model = HoVLEForConditionalGeneration.from_pretrained({str(tmp_path)!r})
        processor = HoVLEProcessor.from_pretrained({str(tmp_path)!r})
        q = processor([{{"role": "user", "content": "hello"}}], add_generation_prompt=True)
        out = model.generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"], max_new_tokens=3)
        heavy = sorted(m for m in ("ray", "deepspeed", "mlflow") if m in sys.modules)
        print(json.dumps({{"heavy": heavy, "new": out.shape[1] - q["input_ids"].shape[1]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "new": 3}


def test_identity_init_passes_text_embeddings_through():
    model, processor = tiny_model(init="identity")
    q = processor([{"role": "user", "content": "no image here"}])
    states = model.embedding(q["input_ids"])
    assert torch.equal(states, model.language_model.get_input_embeddings()(q["input_ids"]))


def test_random_init_changes_text_embeddings():
    model, processor = tiny_model(init="random")
    q = processor([{"role": "user", "content": "no image here"}])
    assert not torch.allclose(
        model.embedding(q["input_ids"]), model.language_model.get_input_embeddings()(q["input_ids"])
    )


def test_copy_init_takes_the_llms_first_layers():
    model, _ = tiny_model(init="copy")
    for layer, source in zip(model.embedding.layers, model.language_model.model.layers, strict=False):
        for (name, a), (_, b) in zip(layer.state_dict().items(), source.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_bad_config_fields_are_named():
    with pytest.raises(ConfigError, match="shuffle_location"):
        tiny_config(shuffle_location="middle")
    with pytest.raises(ConfigError, match="model.embedding.num_layerz"):
        tiny_config(num_layerz=3)
    with pytest.raises(ConfigError, match="tile_size"):
        tiny_config().__class__(tile_size=30, patch_size=14)


@pytest.mark.slow
def test_smollm2_identity_init_answers_like_smollm2_alone():
    from transformers import AutoModelForCausalLM

    from model import build_processor
    from model.presets import resolve_path

    config = load_preset("smollm2-135m")
    model = build_model(config).eval()
    processor = build_processor(config)
    assert config.embedding_init == "identity"
    q = processor([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    ours = model.generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"], max_new_tokens=16)

    smollm2 = AutoModelForCausalLM.from_pretrained(
        resolve_path(config.llm_name_or_path), gguf_file=config.llm_gguf_file, dtype=torch.float32
    ).eval()
    theirs = smollm2.generate(
        input_ids=q["input_ids"],
        attention_mask=q["attention_mask"],
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
    )
    assert torch.equal(ours, theirs)
    answer = processor.decode(ours[0, q["input_ids"].shape[1] :])
    assert "Paris" in answer
