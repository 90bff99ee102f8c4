"""jobs/vision_check.py: a model that gives every image the same tokens is seen as blind."""

import pytest
import torch

from jobs.vision_check import image_token_spread
from model import build_model, build_processor, load_preset
from model.compositional import CompositionalVLM
from tests.helpers import shapes_image, tiny_model

IMAGES = [shapes_image(56, 56, seed=s) for s in range(4)]


def test_different_images_give_different_tokens_of_about_the_text_size():
    model, processor = tiny_model(seed=0)
    found = image_token_spread(model.eval(), processor, IMAGES)
    assert set(found) == {"image_token_cosine", "image_token_norm_ratio"}
    assert -1.0 <= found["image_token_cosine"] < 0.99
    assert 0 < found["image_token_norm_ratio"] < 100


def test_an_embedding_module_that_ignores_the_pixels_is_blind():
    model, processor = tiny_model(seed=0)
    with torch.no_grad():
        model.embedding.patch_embed.weight.zero_()  # every image becomes its bias + position embedding
    found = image_token_spread(model.eval(), processor, IMAGES)
    assert found["image_token_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_the_compositional_model_is_measured_on_its_projected_tokens():
    torch.manual_seed(0)
    config = load_preset("tiny-compositional")
    compositional, processor = build_model(config).eval(), build_processor(config)
    assert isinstance(compositional, CompositionalVLM)
    found = image_token_spread(compositional, processor, IMAGES)
    assert -1.0 <= found["image_token_cosine"] < 0.99


def test_fewer_than_two_images_is_an_error():
    model, processor = tiny_model(seed=0)
    with pytest.raises(ValueError, match="at least two images"):
        image_token_spread(model, processor, IMAGES[:1])
