"""Stage-1 (distillation) vision teachers: per-image-token targets for the holistic embedding module.

- ``VisionTeacher``: a frozen backbone (model/backbones.py: the packaged MobileNetV2 or a local Hugging Face
  vision model) read out on the student's token grid, plus the trainable head mapping student tokens into
  its feature space;
- ``CompositionalTeacher``: the paper's teacher, a trained compositional VLM's encoder + projector
  (model/compositional.py), whose targets already live in the LLM's input space: no head;
- ``build_teacher``: one from a spec string.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import (
    MOBILENET_V2_FEATURE_DIM,
    HFVisionBackbone,
    TeacherUnavailable,
    freeze,
    load_mobilenet_v2,
    resize,
)

logger = logging.getLogger(__name__)

MOBILENET_V2_SPEC = "mobilenet_v2"
COMPOSITIONAL_PREFIX = "compositional:"  # compositional:<folder of a compositional VLM>


def grid_features(
    backbone: nn.Module, pixel_values: torch.Tensor, grid: tuple[int, int], input_size: int | None = None
) -> torch.Tensor:
    """ImageNet-normalised tiles [n, 3, T, T] -> `backbone`'s features on the (gh, gw) token grid
    [n, gh * gw, C] float32, raster order; tiles are resized to `input_size` first (None: as given)."""
    if input_size is not None and tuple(pixel_values.shape[-2:]) != (input_size, input_size):
        pixel_values = resize(pixel_values.float(), (input_size, input_size))
    parameter = next(backbone.parameters(), None)
    if parameter is not None:
        pixel_values = pixel_values.to(parameter.dtype)
    return resample_to_grid(backbone(pixel_values).float(), grid)


def resample_to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """features [n, C, h, w] -> [n, gh * gw, C] on the student's (gh, gw) grid, token = row * gw + column.

    Downsampling (both axes shrink) averages over each token's region (adaptive pooling uses every source
    cell; bilinear sampling would skip some); otherwise antialiased bilinear interpolation.
    """
    gh, gw = grid
    h, w = features.shape[-2:]
    if (gh, gw) == (h, w):
        resampled = features
    elif gh <= h and gw <= w:
        resampled = F.adaptive_avg_pool2d(features, (gh, gw))
    else:
        resampled = resize(features, (gh, gw))
    return resampled.flatten(2).transpose(1, 2)


class VisionTeacher(nn.Module):
    """Frozen vision backbone giving per-token targets, plus the trainable student→teacher head.

    The head maps the STUDENT's tokens into the teacher's space, not the reverse: the targets then stay
    fixed, so the cosine loss cannot be met by collapsing both sides onto one trivial direction.
    """

    in_input_space = False  # targets are the backbone's features, not LLM input embeddings

    def __init__(
        self, backbone: nn.Module, feature_dim: int, student_hidden: int, input_size: int | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        freeze(self.backbone)
        self.feature_dim, self.student_hidden, self.input_size = feature_dim, student_hidden, input_size
        self.head: nn.Module = (
            nn.Linear(student_hidden, feature_dim) if student_hidden != feature_dim else nn.Identity()
        )

    def train(self, mode: bool = True) -> VisionTeacher:
        """Set the head's mode; the backbone always stays in eval mode (BN statistics never update)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def targets(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """ImageNet-normalised tiles [n, 3, T, T] -> [n, gh * gw, feature_dim] float32, detached."""
        return grid_features(self.backbone, pixel_values, grid, self.input_size).detach()

    def project(self, student_tokens: torch.Tensor) -> torch.Tensor:
        """Student image tokens [..., student_hidden] -> teacher space [..., feature_dim]."""
        return self.head(student_tokens)

    forward = project  # the trainable path, so wrappers like DDP see the head

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The head's parameters only (none when the widths already match)."""
        return self.head.parameters()


class CompositionalTeacher(nn.Module):
    """A compositional VLM's frozen vision encoder + projector: targets in the LLM's input space.

    The paper's stage-1 teacher. Its projected image tokens already are what the LLM reads, so the
    student's image tokens are compared with them directly (`in_input_space`: negative cosine plus norm
    matching, like the text positions): no head, nothing trainable between the student and the LLM.
    """

    in_input_space = True

    def __init__(self, vision_encoder: nn.Module, projector: nn.Module, student_hidden: int) -> None:
        super().__init__()
        width = projector[-1].out_features
        if width != student_hidden:
            raise ValueError(
                f"the compositional teacher's tokens are {width} wide but the student's are "
                f"{student_hidden}: train the teacher on the student's LLM"
            )
        self.vision_encoder, self.projector = vision_encoder, projector
        self.head = None  # StageModule and its blank-image pass take the student's tokens as they are
        freeze(self)

    def train(self, mode: bool = True) -> CompositionalTeacher:
        """Always eval: nothing here trains."""
        return super().train(False)

    @torch.no_grad()
    def targets(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tiles [n, 3, T, T] -> the projected image tokens [n, gh * gw, hidden] float32, detached."""
        features = self.vision_encoder(pixel_values, grid)
        return self.projector(features.to(self.projector[0].weight.dtype)).float()

    def project(self, student_tokens: torch.Tensor) -> torch.Tensor:
        """The identity: the student's image tokens are already in the targets' space."""
        return student_tokens

    forward = project

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """None: the teacher is fixed and there is no head."""
        return iter(())


def load_compositional_teacher(folder: str | os.PathLike[str], student_hidden: int) -> CompositionalTeacher:
    """The teacher of a compositional VLM saved at `folder` (a stage export or `save_pretrained` folder).

    Raises:
        TeacherUnavailable: no such folder, or it holds another kind of model.
    """
    path = Path(folder)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise TeacherUnavailable(
            f"compositional teacher: no model at {path} (no config.json); expected a compositional VLM's "
            "export or save_pretrained folder (models:/ and s3:// URIs are fetched by jobs.train)"
        )
    from model.compositional import MODEL_TYPE, CompositionalVLM  # deferred: it imports this module

    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise TeacherUnavailable(
            f"compositional teacher: {path} holds a {model_type!r} model, not a {MODEL_TYPE!r} one "
            "(train one with `model.architecture: compositional`)"
        )
    vlm = CompositionalVLM.from_pretrained(path, dtype=torch.float32)
    logger.info("loaded the compositional teacher from %s", path)
    return CompositionalTeacher(vlm.vision_encoder, vlm.projector, student_hidden)


def build_teacher(
    spec: str, student_hidden: int, input_size: int | None = None
) -> VisionTeacher | CompositionalTeacher:
    """A stage-1 vision teacher for student image tokens `student_hidden` wide.

    spec: "mobilenet_v2" (the packaged ImageNet MobileNetV2, 1280 features), a local Hugging Face vision
        model directory, or "compositional:<folder>" (a trained compositional VLM, with its own encoder
        input size: `input_size`, the square size tiles are resized to, is not used).
    Raises TeacherUnavailable when the packaged weights or the directory are missing.
    """
    if spec.startswith(COMPOSITIONAL_PREFIX):
        return load_compositional_teacher(spec.removeprefix(COMPOSITIONAL_PREFIX), student_hidden)
    if spec == MOBILENET_V2_SPEC:
        return VisionTeacher(load_mobilenet_v2(), MOBILENET_V2_FEATURE_DIM, student_hidden, input_size)
    if not Path(spec).is_dir():
        raise TeacherUnavailable(
            f"unknown vision teacher {spec!r}: expected {MOBILENET_V2_SPEC!r}, a local Hugging Face "
            f"vision model directory or {COMPOSITIONAL_PREFIX}<compositional VLM folder>"
        )
    backbone = HFVisionBackbone(spec)
    return VisionTeacher(backbone, backbone.feature_dim, student_hidden, input_size)
