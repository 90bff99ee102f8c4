"""Is a model blind? Its image tokens, compared across different images.

A model whose embedding module gives every image the same tokens cannot answer about any of them, however
well its answer prior scores. Measured on the LLM's inputs at the image positions of held-out images:

    image_token_cosine      mean cosine between the tokens two different images put at the same position
                            (1.0: every image looks alike to the LLM)
    image_token_norm_ratio  mean image-token norm over mean text-token norm (the LLM's own embeddings: 1)

Issue 11's runs showed both failure signs at once: after alignment, image tokens 13x the size of the text
embeddings and a cosine of 1.000 between different images.
"""

from __future__ import annotations

import itertools

import torch
from PIL import Image

PROMPT = [{"role": "user", "content": "<image>\nDescribe the image."}]


@torch.inference_mode()
def llm_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The LLM's input embeddings [b, L, hidden]: HoVLE's embedding module, or the compositional model's
    encoder + projector beside the LLM's own token embeddings."""
    if hasattr(model, "embed_inputs"):
        return model.embed_inputs(input_ids, pixel_values)
    return model.embedding(input_ids, pixel_values)


@torch.inference_mode()
def image_token_spread(model, processor, images: list[Image.Image]) -> dict[str, float]:
    """`image_token_cosine` and `image_token_norm_ratio` over `images` (at least two; the first tile of
    each, so images tiled differently still compare position by position).

    Raises:
        ValueError: fewer than two images.
    """
    if len(images) < 2:
        raise ValueError(f"comparing image tokens needs at least two images, got {len(images)}")
    per_tile = model.config.image_tokens_per_tile
    tokens, image_norms, text_norms = [], [], []
    for image in images:
        sample = processor(PROMPT, images=[image], add_generation_prompt=True)
        ids = sample["input_ids"].to(model.device)
        embeds = llm_inputs(model, ids, sample["pixel_values"].to(model.device, model.dtype))[0].float()
        image_mask = ids[0] == model.config.img_context_token_id
        first_tile = embeds[image_mask][:per_tile]
        tokens.append(first_tile)
        image_norms.append(first_tile.norm(dim=-1).mean())
        text_norms.append(embeds[~image_mask].norm(dim=-1).mean())
    cosines = [
        torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
        for a, b in itertools.combinations(tokens, 2)
    ]
    return {
        "image_token_cosine": torch.stack(cosines).mean().item(),
        "image_token_norm_ratio": (torch.stack(image_norms).mean() / torch.stack(text_norms).mean()).item(),
    }
