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
from typing import TYPE_CHECKING, Literal

from model.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


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
    """The stages a model of `model_type` trains through, by name (ConfigError for one not trained here)."""
    if model_type not in STAGES_BY_MODEL_TYPE:
        raise ConfigError(f"model_type {model_type!r}: expected one of {sorted(STAGES_BY_MODEL_TYPE)}")
    return STAGES_BY_MODEL_TYPE[model_type]


def stage_spec(model_type: str, stage: str) -> StageSpec:
    """The `StageSpec` of `stage` for a model of `model_type` (ConfigError when it does not apply)."""
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
