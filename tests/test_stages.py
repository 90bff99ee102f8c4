"""The three stages as data: what each trains, that its losses fall, and de-focus attention."""

from __future__ import annotations

import pytest
import torch

from model import STAGES, apply_stage, stage_loss
from model.defocus import layer_drop_rates
from model.stages import text_distillation
from model.teachers import build_teacher
from tests.helpers import chat_batch, distill_batch, tiny_model


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
