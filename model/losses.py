"""The stages' losses (model/stages.py says which stage uses which): distillation to a teacher and to the
LLM's own text embeddings, next-token cross-entropy with the text-preservation, image-anchor and text KL
terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.embedding import packed_segments
from model.modeling import HoVLEForConditionalGeneration, learnt_positions
from model.stages import StageSpec


@dataclass
class StageLoss:
    """The loss to back-propagate and its parts as floats for logging."""

    loss: torch.Tensor
    parts: dict[str, float]


def negative_cosine(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, target) per row [..., d] -> [...] (0 when aligned)."""
    return 1.0 - F.cosine_similarity(student.float(), target.float(), dim=-1)


def text_distillation(states: torch.Tensor, targets: torch.Tensor, norm_weight: float) -> torch.Tensor:
    """states, targets [n, d] (text positions) -> negative cosine + norm matching, a scalar.

    The norm term keeps the outputs at the size of the LLM's embeddings: with cosine alone the norm
    drifted to 6.4x in 17 steps (HOVLE.md, "Measured").
    """
    if states.numel() == 0:
        return states.sum() * 0.0
    return negative_cosine(states, targets).mean() + norm_weight * norm_gap(states, targets.norm(dim=-1))


def norm_gap(states: torch.Tensor, target_norms: torch.Tensor) -> torch.Tensor:
    """(log|h| - log|e|)^2 averaged over the rows of states [n, d]; target_norms [n] or a scalar."""
    log_ratio = states.float().norm(dim=-1).clamp_min(1e-6).log() - target_norms.float().clamp_min(1e-6).log()
    return log_ratio.pow(2).mean()


def stage_loss(
    model: HoVLEForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    spec: StageSpec,
    teacher: nn.Module | None = None,
    base_llm: nn.Module | None = None,
) -> StageLoss:
    """The stage's loss on one batch (input_ids, attention_mask, labels, pixel_values, position_ids).

    base_llm: the text-KL term's base (a frozen copy of the LLM as the stage started); None uses the
    model's own LLM, right only when the stage does not train it.
    """
    input_ids = batch["input_ids"]
    pixel_values = batch.get("pixel_values")
    attention_mask = batch.get("attention_mask")
    valid = (
        attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    )
    image_mask = input_ids == model.config.img_context_token_id
    text_mask = valid & ~image_mask
    text_targets = model.language_model.get_input_embeddings()(input_ids).detach()
    text_norm = text_targets[text_mask].norm(dim=-1).mean() if text_mask.any() else None

    if spec.loss == "distill":
        states = model.embedding(input_ids, pixel_values, attention_mask, batch.get("position_ids"))
        text = text_distillation(states[text_mask], text_targets[text_mask], spec.norm_weight)
        image = _image_distillation(
            model, states, image_mask, pixel_values, teacher, spec.norm_weight, text_norm
        )
        loss = text + image
        return StageLoss(
            loss, {"loss": loss.item(), "text_distill": text.item(), "image_distill": image.item()}
        )

    preserve, anchor = spec.text_preservation_weight > 0, spec.image_anchor_weight > 0
    if spec.text_kl_weight > 0 and base_llm is None and spec.is_trainable("language_model."):
        raise ValueError("the text KL term of a stage that trains the LLM needs a frozen copy as its base")
    out = model(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        output_embedding_states=preserve or anchor,
    )
    loss, parts = out.loss, {"ce": out.loss.item()}
    if preserve:
        text = text_distillation(out.embedding_states[text_mask], text_targets[text_mask], spec.norm_weight)
        loss = loss + spec.text_preservation_weight * text
        parts["text_preservation"] = text.item()
    if anchor:
        image = _image_distillation(
            model, out.embedding_states, image_mask, pixel_values, teacher, spec.norm_weight, text_norm
        )
        loss = loss + spec.image_anchor_weight * image
        parts["image_anchor"] = image.item()
    if spec.text_kl_weight > 0:
        base = base_llm if base_llm is not None else model.language_model
        kl = text_kl(out.logits, base, text_targets, batch, image_mask)
        loss = loss + spec.text_kl_weight * kl
        parts["text_kl"] = kl.item()
    parts["loss"] = loss.item()
    return StageLoss(loss, parts)


def text_kl(
    logits: torch.Tensor,
    base_llm: nn.Module,
    embeddings: torch.Tensor,
    batch: dict[str, torch.Tensor],
    image_mask: torch.Tensor,
) -> torch.Tensor:
    """KL(base || model) per learnt token of the batch's text-only samples, averaged; 0 when it has none.

    logits: the model's rows at the learnt positions [learnt, vocab] (as `language_model_output` returns
    them with labels); embeddings [b, L, hidden]: the LLM's own input embeddings of the batch, on which
    the base runs. A sample that holds an image is left out: the base cannot see it.
    """
    labels = batch["labels"]
    learnt = learnt_positions(labels)
    position_ids = batch.get("position_ids")
    segments = packed_segments(position_ids) if position_ids is not None else torch.zeros_like(labels)
    # a segment holds an image when any of its positions is an image slot
    offset = segments + torch.arange(labels.shape[0], device=labels.device).unsqueeze(1) * labels.shape[1]
    with_image = torch.zeros(offset.numel(), dtype=torch.bool, device=labels.device)
    with_image[offset[image_mask]] = True
    keep = (~with_image[offset])[learnt]  # over the learnt rows, in `logits`' order
    if logits is None or logits.shape[0] != keep.shape[0]:
        raise ValueError("the text KL term needs the model's logits at exactly the learnt positions")
    if not keep.any():
        return logits.sum() * 0.0
    with torch.no_grad():
        base = base_llm(
            inputs_embeds=embeddings.to(logits.dtype),
            attention_mask=batch.get("attention_mask"),
            position_ids=position_ids,
            use_cache=False,  # without a cache, packed samples stay apart (as in the model's forward)
            logits_to_keep=learnt,
        ).logits[keep]
    student = F.log_softmax(logits[keep].float(), dim=-1)
    return F.kl_div(student, F.log_softmax(base.float(), dim=-1), log_target=True, reduction="batchmean")


def _image_distillation(
    model, states, image_mask, pixel_values, teacher, norm_weight, text_norm=None
) -> torch.Tensor:
    """Image tokens against the teacher's features on the student's token grid (+ de-focus pooled term).

    A teacher whose targets live in the LLM's input space (a compositional VLM's projected tokens) is
    matched like the text positions, by direction and by size (`text_distillation`). A plain vision
    backbone's features are matched by direction through the teacher's head, centred over the batch's
    tokens: ReLU features share one direction (MobileNetV2's: 47% of their energy on the shapes corpus,
    cos 0.70 between any token and the mean), which a constant student matches for free, and the image
    tokens collapsed onto one vector (pairwise cos 1.000 across images). Centring takes that free part
    away, as DINO's centring of teacher outputs does. Their size is matched to the LLM's text embeddings
    (`text_norm`, with `norm_weight`), as the text positions' is.
    """
    if pixel_values is None or not image_mask.any():
        return states.sum() * 0.0
    if teacher is None:
        raise ValueError("distillation (and the image anchor) needs a vision teacher for batches with images")
    config = model.config
    grid = (config.image_grid, config.image_grid)
    targets = teacher.targets(pixel_values, grid)  # [tiles, tokens, C]
    image_states = states[image_mask]
    student = teacher.project(image_states.reshape(targets.shape[0], targets.shape[1], -1))
    if getattr(teacher, "in_input_space", False):
        loss = text_distillation(student.flatten(0, 1), targets.flatten(0, 1), norm_weight)
    else:
        targets = targets - targets.flatten(0, 1).mean(dim=0)
        loss = negative_cosine(student, targets).mean()
        if text_norm is not None and norm_weight > 0:
            loss = loss + norm_weight * norm_gap(image_states, text_norm)
    if config.attention == "defocus" and config.defocus_aux_loss:
        pooled = negative_cosine(student.mean(dim=1), targets.mean(dim=1)).mean()
        loss = (loss + pooled) / 2
    return loss
