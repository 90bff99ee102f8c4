"""HoVLE's three training stages as data (HOVLE.md, "The three training stages").

| stage    | trains                   | loss                                                            |
|----------|--------------------------|-----------------------------------------------------------------|
| distill  | embedding module         | negative cosine: image tokens vs a vision teacher's features,   |
|          |                          | text tokens vs the LLM's input embeddings (+ norm matching)     |
| align    | embedding module         | next-token cross-entropy (+ optional text preservation)         |
| instruct | embedding module + LLM   | next-token cross-entropy on assistant tokens (+ preservation)   |

The text-preservation term is the stage-1 text distillation loss on the text positions: trained on
answers alone the embedding module wrecks the text path to the LLM (HOVLE.md, "Measured").

The compositional baseline (model/compositional.py) trains LLaVA's way, with the same losses:
| align    | projector                | next-token cross-entropy on captions                            |
| instruct | projector + LLM          | next-token cross-entropy on assistant tokens                    |
It has no distill stage: its vision encoder is pre-trained and stays frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError
from model.embedding import packed_segments
from model.modeling import HoVLEForConditionalGeneration, learnt_positions


@dataclass(frozen=True)
class StageSpec:
    """What one stage trains and which losses apply.

    trainable: prefixes of the model's parameter names that train; everything else is frozen.
    frozen: prefixes frozen although `trainable` names them (e.g. the embedding module's layers and text
        table, so a stage trains the image path alone and the text path stays as it was).
    text_preservation_weight: weight of the text distillation term added to next-token stages.
    norm_weight: weight of the norm-matching term (log|h| - log|e|)^2 inside every text distillation.
    image_anchor_weight: weight of the image distillation term added to next-token stages (needs a
        teacher): under the next-token loss alone the image tokens collapse onto one vector, the same for
        every image (docs/results/findings.md, section 5).
    text_kl_weight: weight of KL(base || model) on the learnt tokens of text-only samples, added to
        next-token stages: the base is the LLM the stage started from, fed its own input embeddings. It
        holds what the user sees (the next-token distribution on text-only prompts), where the
        text-preservation term holds only the embedding module's outputs.
    adapted: prefixes of parts that carry LoRA adapters (model/lora.py): there only the adapters train
        (`.lora_A.`, `.lora_B.`), and only where `trainable` names the part; the base weights stay frozen.
    """

    name: str
    trainable: tuple[str, ...]
    loss: Literal["distill", "next_token"]
    text_preservation_weight: float = 0.0
    norm_weight: float = 1.0
    image_anchor_weight: float = 0.0
    text_kl_weight: float = 0.0
    frozen: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()

    @property
    def needs_teacher(self) -> bool:
        return self.loss == "distill" or self.image_anchor_weight > 0

    def is_trainable(self, parameter_name: str) -> bool:
        if not parameter_name.startswith(self.trainable) or parameter_name.startswith(self.frozen):
            return False
        if parameter_name.startswith(self.adapted):
            return ".lora_A." in parameter_name or ".lora_B." in parameter_name
        return True

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs this stage trains (a teacher's head is not part of the model)."""
        return ((n, p) for n, p in model.named_parameters() if self.is_trainable(n))

    def with_options(self, **changes) -> StageSpec:
        """A copy with some fields changed (e.g. `text_preservation_weight` from the run config)."""
        return dataclasses.replace(self, **changes)


STAGES: dict[str, StageSpec] = {
    "distill": StageSpec("distill", trainable=("embedding.",), loss="distill"),
    "align": StageSpec("align", trainable=("embedding.",), loss="next_token", text_preservation_weight=0.1),
    "instruct": StageSpec(
        "instruct",
        trainable=("embedding.", "language_model."),
        loss="next_token",
        text_preservation_weight=0.1,
    ),
}


COMPOSITIONAL_STAGES: dict[str, StageSpec] = {
    # the text-preservation term is 0 here (text positions are the LLM's own embeddings): off by default
    "align": StageSpec("align", trainable=("projector.",), loss="next_token"),
    "instruct": StageSpec("instruct", trainable=("projector.", "language_model."), loss="next_token"),
}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)  # in training order: the one list of stage names

# model_type (the model config's) -> its stages
STAGES_BY_MODEL_TYPE: dict[str, dict[str, StageSpec]] = {
    "hovle": STAGES,
    "hovle-compositional": COMPOSITIONAL_STAGES,
}


def stages_for(model_type: str) -> dict[str, StageSpec]:
    """The stages a model of `model_type` trains through, by name.

    Raises:
        ConfigError: a model type this package does not train.
    """
    if model_type not in STAGES_BY_MODEL_TYPE:
        raise ConfigError(f"model_type {model_type!r}: expected one of {sorted(STAGES_BY_MODEL_TYPE)}")
    return STAGES_BY_MODEL_TYPE[model_type]


def stage_spec(model_type: str, stage: str) -> StageSpec:
    """The `StageSpec` of `stage` for a model of `model_type`.

    Raises:
        ConfigError: the stage does not apply to that model (e.g. distill for the compositional model).
    """
    stages = stages_for(model_type)
    if stage not in stages:
        if model_type == "hovle-compositional" and stage == "distill":
            raise ConfigError(
                "stage distill: the compositional model (model.architecture: compositional) has no distill "
                "stage, its vision encoder is pre-trained and frozen; train it with align (projector) and "
                "instruct (projector + LLM), then use its export as a HoVLE model's distill teacher "
                "(train.stages.distill.teacher: compositional:<export>)"
            )
        raise ConfigError(f"stage {stage}: a {model_type!r} model trains only {', '.join(stages)}")
    return stages[stage]


def apply_stage(model: nn.Module, spec: StageSpec) -> list[nn.Parameter]:
    """Freeze everything the stage does not train; return the parameters it trains."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(spec.is_trainable(name))
        if param.requires_grad:
            trainable.append(param)
    return trainable


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
