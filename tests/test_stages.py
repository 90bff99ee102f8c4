"""The three stages as data: what each trains, that its losses fall, and de-focus attention."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig

from jobs.train_loop import advance_drop_path
from model import STAGES, HoVLEConfig, apply_stage, stage_loss
from model.defocus import layer_drop_rates
from model.embedding import HolisticEmbedding
from model.losses import _image_distillation, text_distillation
from model.teachers import build_teacher
from tests.helpers import chat_batch, distill_batch, shapes_image, tiny_model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_steps(model, batch, spec, teacher=None, steps=8, lr=3e-3):
    params = apply_stage(model, spec)
    if teacher is not None:
        params += list(teacher.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        result = stage_loss(model, batch, spec, teacher)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.parts)
    return losses


@pytest.fixture(scope="module")
def teacher_factory():
    return lambda hidden: build_teacher("mobilenet_v2", student_hidden=hidden, input_size=112)


@pytest.mark.parametrize("stage", ["distill", "align", "instruct"])
def test_stage_trains_exactly_its_parameters_and_lowers_its_loss(stage, teacher_factory):
    model, processor = tiny_model(seed=1, init="random")
    spec = STAGES[stage]
    teacher = teacher_factory(model.config.text_config.hidden_size) if spec.needs_teacher else None
    batch = distill_batch(processor) if stage == "distill" else chat_batch(processor)
    before = snapshot(model)

    losses = train_steps(model, batch, spec, teacher)

    after = snapshot(model)
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if spec.is_trainable(name):
            assert changed or name.endswith("position_embedding"), f"{stage}: {name} did not train"
        else:
            assert not changed, f"{stage}: frozen {name} changed"
    assert losses[-1]["loss"] < losses[0]["loss"], losses
    if stage == "distill":
        assert losses[-1]["image_distill"] < losses[0]["image_distill"]
        assert losses[-1]["text_distill"] < losses[0]["text_distill"]
    else:
        assert losses[-1]["ce"] < losses[0]["ce"]
        assert "text_preservation" in losses[0]


def test_stage_trainable_sets():
    model, _ = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    for stage in ("distill", "align"):
        trainable = {n for n, _ in STAGES[stage].trainable_parameters(model)}
        assert trainable == {n for n in names if n.startswith("embedding.")}
    assert {n for n, _ in STAGES["instruct"].trainable_parameters(model)} == set(names)


def test_distill_teacher_backbone_stays_frozen(teacher_factory):
    model, processor = tiny_model(seed=2)
    teacher = teacher_factory(model.config.text_config.hidden_size)
    backbone = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    head = teacher.head.weight.detach().clone()
    train_steps(model, distill_batch(processor), STAGES["distill"], teacher, steps=2)
    assert all(torch.equal(v, teacher.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(head, teacher.head.weight)


def test_text_distillation_norm_term_penalises_drift():
    targets = torch.randn(10, 16)
    aligned = text_distillation(targets.clone(), targets, norm_weight=1.0)
    scaled = text_distillation(targets * 6.4, targets, norm_weight=1.0)
    assert aligned.item() == pytest.approx(0.0, abs=1e-5)
    assert scaled.item() == pytest.approx(torch.tensor(6.4).log().pow(2).item(), rel=1e-3)
    # cosine alone cannot see the drift
    assert text_distillation(targets * 6.4, targets, norm_weight=0.0).item() == pytest.approx(0.0, abs=1e-5)


def test_image_distillation_gives_one_shared_image_token_no_credit_and_keeps_tokens_text_sized():
    """ReLU features share a direction: uncentred, a student that puts the teacher's mean vector on every
    image token (blind: every image alike) scored about 0.3; centred, it scores what a random guess does."""
    model, processor = tiny_model(seed=2)
    teacher = build_teacher("mobilenet_v2", student_hidden=1280, input_size=112)  # head = identity
    batch = distill_batch(processor)
    image_mask = batch["input_ids"] == model.config.img_context_token_id
    grid = (model.config.image_grid, model.config.image_grid)
    targets = teacher.targets(batch["pixel_values"], grid)
    mean = targets.flatten(0, 1).mean(dim=0)
    uncentred = 1 - torch.nn.functional.cosine_similarity(mean.expand_as(targets), targets, dim=-1).mean()
    assert uncentred < 0.5  # the free credit centring takes away

    def loss(token: torch.Tensor, text_norm: float, norm_weight: float) -> float:
        states = torch.zeros(*batch["input_ids"].shape, 1280)
        states[image_mask] = token
        args = (batch["pixel_values"], teacher, norm_weight, torch.tensor(text_norm))
        return _image_distillation(model, states, image_mask, *args).item()

    blind = loss(mean, text_norm=mean.norm().item(), norm_weight=1.0)
    assert 0.8 < blind < 1.2
    # the size term: image tokens 10x the text embeddings' norm pay (log 10)^2 per unit of weight
    oversized = loss(mean, text_norm=mean.norm().item() / 10, norm_weight=1.0)
    assert oversized - blind == pytest.approx(math.log(10) ** 2, rel=1e-3)


def test_the_image_anchor_adds_stage_1s_image_term_to_the_next_token_loss(teacher_factory):
    model, processor = tiny_model(seed=2)
    teacher = teacher_factory(model.config.text_config.hidden_size)
    batch = chat_batch(processor)
    plain = stage_loss(model.eval(), batch, STAGES["align"])
    anchored = STAGES["align"].with_options(image_anchor_weight=2.0)
    assert anchored.needs_teacher
    apply_stage(model, anchored)
    result = stage_loss(model.eval(), batch, anchored, teacher)
    assert result.parts["ce"] == pytest.approx(plain.parts["ce"])
    assert result.parts["image_anchor"] > 0
    expected = plain.loss.item() + 2.0 * result.parts["image_anchor"]
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    result.loss.backward()
    assert teacher.head.weight.grad.abs().sum() > 0  # the (fresh) head learns with the module
    assert model.embedding.patch_embed.weight.grad.abs().sum() > 0


def _packed_text_and_image_samples(processor):
    """One packed row: an image question, then a text-only chat (its answer is what the KL term sees)."""
    from pipelines.packing import collate_packed

    image = processor(
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a red disc"}],
        images=[shapes_image(seed=1)],
    )
    text = processor(
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple, a pear."}]
    )
    length = image["input_ids"].numel() + text["input_ids"].numel()
    batch = collate_packed([image, text], length + 3, processor.tokenizer.pad_token_id, packs=[[0, 1]])
    return batch, image["input_ids"].numel()


def test_the_text_kl_term_holds_text_only_answers_to_the_base_llm_and_skips_samples_with_images():
    model, processor = tiny_model(seed=4, init_std=0.2)  # identity init: the module passes text through
    batch, split = _packed_text_and_image_samples(processor)
    spec = STAGES["align"].with_options(text_preservation_weight=0.0, text_kl_weight=3.0)
    assert stage_loss(model.eval(), batch, spec).parts["text_kl"] == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():  # the module now changes the text path: the LLM answers differently
        for layer in model.embedding.layers:
            layer.mlp.down_proj.weight.normal_(0, 0.5)
    apply_stage(model, spec)
    result = stage_loss(model.eval(), batch, spec)
    plain = stage_loss(model.eval(), batch, spec.with_options(text_kl_weight=0.0))
    assert result.parts["text_kl"] > 1e-3
    assert result.loss.item() == pytest.approx(plain.loss.item() + 3.0 * result.parts["text_kl"], rel=1e-5)

    # by hand, on the text-only sample alone: KL(base || model) over its answer tokens
    text = {k: v[:, split:] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}
    ids, labels = text["input_ids"], text["labels"]
    learnt = torch.zeros_like(labels, dtype=torch.bool)
    learnt[:, :-1] = labels[:, 1:] != -100
    with torch.no_grad():
        embeds = model.language_model.get_input_embeddings()(ids)
        base = model.language_model(inputs_embeds=embeds, position_ids=text["position_ids"]).logits[learnt]
        student = model(input_ids=ids, position_ids=text["position_ids"]).logits[learnt]
    expected = torch.nn.functional.kl_div(
        student.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert result.parts["text_kl"] == pytest.approx(expected.item(), rel=1e-4)
    result.loss.backward()
    assert model.embedding.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0

    images_only = chat_batch(processor)  # every sample holds an image: the base cannot see them
    assert stage_loss(model.eval(), images_only, spec).parts["text_kl"] == 0.0


def test_the_text_kl_term_of_a_stage_that_trains_the_llm_needs_a_frozen_base():
    model, processor = tiny_model(seed=4)
    batch, _ = _packed_text_and_image_samples(processor)
    spec = STAGES["instruct"].with_options(text_kl_weight=1.0)
    with pytest.raises(ValueError, match="frozen copy"):
        stage_loss(model, batch, spec)
    base = copy.deepcopy(model.language_model).requires_grad_(False)
    assert stage_loss(model, batch, spec, base_llm=base).parts["text_kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_stage_with_the_text_path_frozen_learns_images_and_leaves_text_only_answers_exactly_alone():
    model, processor = tiny_model(seed=5, init="random")
    text_only = processor([{"role": "user", "content": "Name a fruit."}])["input_ids"]
    with torch.no_grad():
        before = model(input_ids=text_only).logits
    spec = STAGES["align"].with_options(frozen=("embedding.layers.", "embedding.embed_tokens."))
    assert not spec.is_trainable("embedding.layers.0.mlp.down_proj.weight")
    assert spec.is_trainable("embedding.shuffle_mlp.0.weight")
    start = snapshot(model)
    train_steps(model, chat_batch(processor), spec, steps=3)
    after = snapshot(model)
    assert not torch.equal(start["embedding.patch_embed.weight"], after["embedding.patch_embed.weight"])
    for name in start:
        if name.startswith(("embedding.layers.", "embedding.embed_tokens.", "language_model.")):
            assert torch.equal(start[name], after[name]), name
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=text_only).logits, before)


def test_text_preservation_weight_is_configurable():
    model, processor = tiny_model(init="random")
    batch = chat_batch(processor)
    off = stage_loss(model, batch, STAGES["align"].with_options(text_preservation_weight=0.0), None)
    on = stage_loss(model, batch, STAGES["align"].with_options(text_preservation_weight=2.0), None)
    assert "text_preservation" not in off.parts
    assert on.loss.item() == pytest.approx(off.loss.item() + 2.0 * on.parts["text_preservation"], rel=1e-4)


@pytest.mark.parametrize("location", ["pre", "post"])
def test_defocus_variant_trains_and_its_parameters_get_gradients(location, teacher_factory):
    model, processor = tiny_model(seed=3, attention="defocus", shuffle_location=location, init="random")
    decay_before = [d.log_rate.detach().clone() for d in model.embedding.decay]
    freq_before = [r.log_inv_freq.detach().clone() for r in model.embedding.rotary]
    teacher = teacher_factory(model.config.text_config.hidden_size)

    apply_stage(model, STAGES["distill"])
    result = stage_loss(model, distill_batch(processor), STAGES["distill"], teacher)
    result.loss.backward()
    for decay, rotary in zip(model.embedding.decay, model.embedding.rotary, strict=True):
        assert decay.log_rate.grad is not None and decay.log_rate.grad.abs().sum() > 0
        assert rotary.log_inv_freq.grad is not None and rotary.log_inv_freq.grad.abs().sum() > 0

    losses = train_steps(model, chat_batch(processor), STAGES["align"], steps=8)
    assert losses[-1]["ce"] < losses[0]["ce"]
    assert any(
        not torch.equal(a, d.log_rate) for a, d in zip(decay_before, model.embedding.decay, strict=True)
    )
    assert any(
        not torch.equal(a, r.log_inv_freq) for a, r in zip(freq_before, model.embedding.rotary, strict=True)
    )


def test_defocus_pooled_auxiliary_term_changes_the_distill_loss(teacher_factory):
    losses = {}
    for aux in (True, False):
        model, processor = tiny_model(seed=4, attention="defocus", defocus_aux_loss=aux)
        teacher = teacher_factory(model.config.text_config.hidden_size)
        torch.manual_seed(0)
        teacher.head.reset_parameters()
        losses[aux] = stage_loss(model.eval(), distill_batch(processor), STAGES["distill"], teacher).parts
    assert losses[True]["text_distill"] == pytest.approx(losses[False]["text_distill"])
    assert losses[True]["image_distill"] != pytest.approx(losses[False]["image_distill"])


def test_defocus_drop_path_schedule_rises_over_training_and_depth():
    model, _ = tiny_model(attention="defocus")
    embedding = model.embedding
    embedding.set_drop_path_progress(0.0)
    assert embedding.drop_path_rates == pytest.approx(layer_drop_rates(0.1, 2))
    embedding.set_drop_path_progress(1.0)
    assert embedding.drop_path_rates == pytest.approx([0.35, 0.7])
    embedding.set_drop_path_progress(0.5)
    assert embedding.drop_path_rates == pytest.approx([0.2, 0.4])


def test_drop_path_is_stochastic_in_training_and_off_in_eval():
    model, processor = tiny_model(attention="defocus", init="random")
    model.embedding.set_drop_path_progress(1.0)
    ids = chat_batch(processor, n=1)
    inputs = dict(input_ids=ids["input_ids"], pixel_values=ids["pixel_values"])
    model.eval()
    assert torch.equal(model.embedding(**inputs), model.embedding(**inputs))
    model.train()
    outs = [model.embedding(**inputs) for _ in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_train_loop_sets_the_scheduled_drop_path_rate_before_each_step():
    model, _ = tiny_model(attention="defocus")  # 2 layers, rate 0.1 -> 0.7 over training
    rates = {step: advance_drop_path(model, step, 10) for step in (0, 5, 9)}
    assert rates == pytest.approx({0: 0.1, 5: 0.4, 9: 0.64})
    assert model.embedding.drop_path_rates == pytest.approx([0.32, 0.64])  # the last step's, over depth
    advance_drop_path(model, 5, 10)  # a run resumed at step 5 continues at step 5's rate
    assert model.embedding.drop_path_rates == pytest.approx([0.2, 0.4])
    standard, _ = tiny_model(drop_path_rate=0.2)
    assert advance_drop_path(standard, 5, 10) is None
    assert standard.embedding.drop_path_rates == pytest.approx(layer_drop_rates(0.2, 2))


def _one_layer_defocus(heads: int, kv_heads: int, attn: str) -> HolisticEmbedding:
    text = LlamaConfig(
        vocab_size=16,
        hidden_size=4 * heads,  # head_dim 4
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    text._attn_implementation = attn
    config = HoVLEConfig(
        text_config=text,
        embedding_num_layers=1,
        attention="defocus",
        tile_size=28,
        patch_size=7,
        img_context_token_id=15,
    )
    torch.manual_seed(0)
    return HolisticEmbedding(config).eval()


def _hand_worked_layer(x, layer, log_inv_freq, log_rate, image):
    """One decoder layer on x [L, hidden] with plain torch: each head rotates with its KV group's own
    frequencies, the decay lambda_h * (t - s) between image tokens, causal softmax."""
    attn = layer.self_attn
    length, heads, groups, d = x.shape[0], len(log_rate), log_inv_freq.shape[0], attn.head_dim
    normed = layer.input_layernorm(x)
    q = (normed @ attn.q_proj.weight.T).view(length, heads, d)
    k = (normed @ attn.k_proj.weight.T).view(length, groups, d)
    v = (normed @ attn.v_proj.weight.T).view(length, groups, d)
    positions = torch.arange(length, dtype=torch.float32)

    def rotate(vectors, log_freq):  # pairs (i, i + d/2) rotated by position * theta_i
        angle = positions[:, None] * log_freq.exp()[None, :]
        a, b = vectors[:, : d // 2], vectors[:, d // 2 :]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)

    heads_out = []
    for h in range(heads):
        g = h // (heads // groups)
        scores = rotate(q[:, h], log_inv_freq[g]) @ rotate(k[:, g], log_inv_freq[g]).T / math.sqrt(d)
        for t in range(length):
            for s in range(length):
                if s > t:
                    scores[t, s] = -math.inf
                elif image[t] and image[s]:
                    scores[t, s] = scores[t, s] - log_rate[h].exp() * (t - s)
        heads_out.append(scores.softmax(-1) @ v[:, g])
    x = x + torch.cat(heads_out, dim=-1) @ attn.o_proj.weight.T
    return x + layer.mlp(layer.post_attention_layernorm(x))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (4, 2)])
def test_defocus_layer_matches_hand_worked_attention(heads, kv_heads, attn):
    embedding = _one_layer_defocus(heads, kv_heads, attn)
    with torch.no_grad():  # every KV group its own frequencies, every head its own decay
        embedding.rotary[0].log_inv_freq.copy_(torch.tensor([[0.0, -1.0], [-0.5, -2.5]]))
        embedding.decay[0].log_rate.copy_(torch.linspace(-0.5, -3.0, heads))
    img = embedding.config.img_context_token_id
    ids = torch.tensor([[3, 4, img, img, img, img, 5]])
    seen = []
    embedding.layers[0].input_layernorm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = embedding(ids, pixel_values=torch.randn(1, 3, 28, 28))
        expected = _hand_worked_layer(
            seen[0][0],
            embedding.layers[0],
            embedding.rotary[0].log_inv_freq,
            embedding.decay[0].log_rate,
            (ids[0] == img).tolist(),
        )
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_defocus_rotary_frequencies_are_learned_per_kv_head_group():
    model, processor = tiny_model(attention="defocus", init="random")  # 4 heads reading 2 KV heads
    rotary = model.embedding.rotary[0]
    head_dim = model.embedding.layer_config.head_dim
    assert rotary.log_inv_freq.shape == (2, head_dim // 2)
    assert torch.equal(rotary.log_inv_freq[0], rotary.log_inv_freq[1])  # both start at standard RoPE

    apply_stage(model, STAGES["align"])
    optimizer = torch.optim.SGD([rotary.log_inv_freq], lr=1.0)
    stage_loss(model, chat_batch(processor), STAGES["align"], None).loss.backward()
    optimizer.step()
    assert not torch.allclose(rotary.log_inv_freq[0], rotary.log_inv_freq[1])


def test_standard_drop_path_steps_the_llama_layer_with_the_same_numerics():
    plain, processor = tiny_model(init="random")
    dropping, _ = tiny_model(init="random", drop_path_rate=0.5)
    dropping.load_state_dict(plain.state_dict())
    batch = chat_batch(processor, n=1)
    inputs = dict(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    torch.testing.assert_close(
        dropping.eval().embedding(**inputs), plain.eval().embedding(**inputs), atol=1e-6, rtol=1e-6
    )
    dropping.train()
    outs = [dropping.embedding(**inputs) for _ in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
