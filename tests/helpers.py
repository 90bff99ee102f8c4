"""Small builders shared by the model tests: tiny presets with variations, and sample batches."""

from __future__ import annotations

import copy
from functools import cache

import torch
import yaml
from PIL import Image, ImageDraw

from model import HoVLEConfig, build_model, build_processor
from model.config_files import CONFIG_DIR
from model.presets import config_from_spec, parse_model_spec


@cache
def _tiny_spec() -> dict:
    return yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())["model"]


def tiny_config(init_std: float | None = None, **embedding) -> HoVLEConfig:
    """The tiny preset with `model.embedding` fields overridden; a larger `init_std` makes the random LLM's
    greedy output vary from token to token (the default init repeats one token)."""
    spec = copy.deepcopy(_tiny_spec())
    spec["embedding"].update(embedding)
    if init_std is not None:
        spec["llm"]["config"]["initializer_range"] = init_std
    return config_from_spec(parse_model_spec(spec))


def tiny_model(seed: int = 0, init_std: float | None = None, **embedding):
    torch.manual_seed(seed)
    config = tiny_config(init_std, **embedding)
    return build_model(config), build_processor(config)


@cache
def _tiny_compositional_spec() -> dict:
    return yaml.safe_load((CONFIG_DIR / "tiny-compositional.yaml").read_text())["model"]


def tiny_compositional_config(init_std: float | None = None, **vision):
    """The tiny compositional preset (the tiny LLM and geometry behind a frozen vision encoder) with
    `model.vision` fields overridden."""
    spec = copy.deepcopy(_tiny_compositional_spec())
    spec["vision"].update(vision)
    if init_std is not None:
        spec["llm"]["config"]["initializer_range"] = init_std
    return config_from_spec(parse_model_spec(spec))


def tiny_compositional_model(seed: int = 0, init_std: float | None = None, **vision):
    torch.manual_seed(seed)
    config = tiny_compositional_config(init_std, **vision)
    return build_model(config), build_processor(config)


def shapes_image(width: int = 56, height: int = 28, seed: int = 0) -> Image.Image:
    """A deterministic picture: coloured rectangles and an ellipse on a grey background."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (
            torch.randint(0, width // 2, (1,), generator=g).item(),
            torch.randint(0, height // 2, (1,), generator=g).item(),
        )
        colour = tuple(torch.randint(0, 256, (3,), generator=g).tolist())
        draw.rectangle([x0, y0, x0 + width // 3, y0 + height // 3], fill=colour)
    draw.ellipse([width // 2, height // 2, width - 2, height - 2], fill=(250, 20, 20))
    return image


def chat_batch(processor, n: int = 2, answer: str = "a red ellipse") -> dict[str, torch.Tensor]:
    """A right-padded training batch of image conversations (one with two images)."""
    samples = []
    for i in range(n):
        images = [shapes_image(seed=i)] + ([shapes_image(28, 28, seed=i + 10)] if i % 2 else [])
        question = "<image>\nWhat is in the picture?" + (" And here: <image>" if i % 2 else "")
        samples.append(
            processor(
                [{"role": "user", "content": question}, {"role": "assistant", "content": f"{answer} {i}"}],
                images=images,
            )
        )
    return processor.collate(samples)


def distill_batch(processor) -> dict[str, torch.Tensor]:
    """Stage-1 style inputs: an image block followed by unrelated text tokens."""
    samples = [
        processor(
            [{"role": "user", "content": f"<image>\nrandom text {i} zebra"}], images=[shapes_image(seed=i)]
        )
        for i in range(2)
    ]
    return processor.collate(samples)


def build_context(preset: str, stage: str, **settings):
    """A preprocessing context as `hovle prepare` builds one: the processor and config hash of the preset's
    model section (built afresh on each call), the data settings given."""
    from jobs.prepare import config_hash
    from model.presets import load_preset
    from pipelines.preprocess import PrepareContext
    from pipelines.settings import PrepareSettings

    config = load_preset(preset)
    return PrepareContext(stage, PrepareSettings(**settings), build_processor(config), config_hash(config))


@cache
def preset_processor(preset: str = "tiny"):
    """The processor a preset's model section builds (what `hovle prepare` hands pipelines.prepare); built
    once per test process and shared, so never changed by a test."""
    from model.presets import load_preset

    return build_processor(load_preset(preset))


def track_conversion_memory(monkeypatch) -> tuple[dict[str, int], list]:
    """Measure a checkpoint conversion (model/convert/shards.py) from outside: every tensor it reads is
    counted while alive (a weak reference drops it when freed), and every shard writer it makes is kept.
    Returns ({"bytes": alive now, "peak": most alive at once}, [the writers])."""
    import weakref

    from model.convert import shards

    alive = {"bytes": 0, "peak": 0}
    read = shards.iter_tensors

    def tracked(folder):
        for name, tensor in read(folder):
            size = tensor.numel() * tensor.element_size()
            alive["bytes"] += size
            weakref.finalize(tensor, lambda size=size: alive.__setitem__("bytes", alive["bytes"] - size))
            alive["peak"] = max(alive["peak"], alive["bytes"])
            yield name, tensor

    writers = []

    class TrackedWriter(shards.ShardWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    monkeypatch.setattr(shards, "iter_tensors", tracked)
    monkeypatch.setattr(shards, "ShardWriter", TrackedWriter)
    return alive, writers
