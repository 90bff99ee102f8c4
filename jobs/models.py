"""A model by URI, and what evaluation asks of it.

resolve_model(uri, tracking_uri) -> (model, processor)   a stage export, a Hugging Face folder, runs:/,
                                                          models:/name@alias, models:/name/version, or
                                                          preset:<name> (the untrained preset: its LLM)
generate_answers(model, processor, chats)                 greedy replies, one left-padded batch
perplexity(model, processor, texts)                       exp(mean next-token loss) over texts
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable

import torch
from PIL import Image

from jobs.export import is_export, load_export, local_copy
from model import HoVLEForConditionalGeneration, HoVLEProcessor, load_pretrained
from pipelines import storage

PRESET_SCHEME = "preset:"  # preset:<name or YAML>: the preset's untrained model (its LLM, identity module)
TEXT_MAX_TOKENS = 256

Loaded = tuple[HoVLEForConditionalGeneration, HoVLEProcessor]
Chat = tuple[list[dict[str, str]], list[Image.Image]]  # messages ({"role", "content"}), their images


class ModelNotFound(FileNotFoundError):
    """No loadable model at the URI given."""


def _load_hf_folder(folder: str) -> Loaded:
    try:
        model = load_pretrained(folder)  # HoVLE or the compositional baseline, by its model_type
    except ValueError as err:
        raise ModelNotFound(str(err)) from err
    return model.eval(), HoVLEProcessor.from_pretrained(folder)


def resolve_model(uri: str, tracking_uri: str | None = None) -> Loaded:
    """(model in eval mode, processor) from `uri`: a stage export (`export.json`) or a `save_pretrained`
    folder, local or s3://; an MLflow pyfunc model whose `hf_model` artifact is one (`runs:/<run>/<path>`,
    `models:/<name>@<alias>`, `models:/<name>/<version>`); or `preset:<name or YAML>`.

    Raises:
        ModelNotFound: nothing loadable at `uri` (the message says what was expected).
    """
    if uri.startswith(("runs:/", "models:/")):
        from mlflow.exceptions import MlflowException

        from jobs.registry import HF_ARTIFACT, download_hf_folder

        with tempfile.TemporaryDirectory(prefix="hovle-model-") as scratch:
            try:
                folder = download_hf_folder(uri, tracking_uri, scratch)
            except (MlflowException, OSError) as err:
                raise ModelNotFound(f"cannot download MLflow model {uri} from {tracking_uri}: {err}") from err
            if not (folder / "config.json").is_file():
                raise ModelNotFound(
                    f"{uri} holds no Hugging Face model (pyfunc artifact {HF_ARTIFACT!r}); log it with "
                    f'mlflow.pyfunc.log_model(..., artifacts={{"{HF_ARTIFACT}": <export folder>}})'
                )
            return _load_hf_folder(str(folder))
    if uri.startswith(PRESET_SCHEME):
        from model import build_model, build_processor, load_preset

        try:
            config = load_preset(uri.removeprefix(PRESET_SCHEME))
        except (FileNotFoundError, ValueError) as err:
            raise ModelNotFound(f"{uri}: {err}") from err
        return build_model(config).eval(), build_processor(config)
    if is_export(uri):
        model, processor = load_export(uri)
        return model.eval(), processor
    if storage.exists(storage.join(uri, "config.json")):
        with tempfile.TemporaryDirectory(prefix="hovle-model-") as scratch:
            return _load_hf_folder(local_copy(uri, scratch))
    raise ModelNotFound(
        f"no model at {uri}: expected a stage export (export.json), a save_pretrained folder (config.json), "
        "an MLflow model URI (runs:/..., models:/name@alias, models:/name/version) or preset:<name>"
    )


@torch.inference_mode()
def generate_answers(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    chats: list[Chat],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy replies to `chats` (one `<image>` per image in the messages), as one left-padded batch."""
    encoded = [processor(chat, images=images or None, add_generation_prompt=True) for chat, images in chats]
    batch = processor.collate(encoded, padding_side="left")
    pixel_values = batch["pixel_values"]
    out = model.generate(
        input_ids=batch["input_ids"].to(model.device),
        attention_mask=batch["attention_mask"].to(model.device),
        pixel_values=None if pixel_values is None else pixel_values.to(model.device, model.dtype),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return [processor.decode(row[batch["input_ids"].shape[1] :]).strip() for row in out]


@torch.inference_mode()
def token_nll(
    model: HoVLEForConditionalGeneration, examples: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) over (input_ids, labels) pairs: each mean loss times the
    tokens it is the mean of (labels after the first position other than -100); pairs with none skipped."""
    total, tokens = 0.0, 0
    for ids, labels in examples:
        ids, labels = ids.to(model.device), labels.to(model.device)
        count = int((labels[:, 1:] != -100).sum())
        if count:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            total, tokens = total + loss.item() * count, tokens + count
    return total, tokens


def perplexity(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    texts: list[str],
    max_tokens: int = TEXT_MAX_TOKENS,
) -> float:
    """exp(mean next-token loss over all predicted tokens) of `texts`, each cut to `max_tokens` tokens.

    Raises:
        ValueError: no text of two or more tokens.
    """
    options = {"truncation": True, "max_length": max_tokens, "return_tensors": "pt"}
    encoded = (processor.tokenizer(text, **options)["input_ids"] for text in texts)
    total, tokens = token_nll(model, ((ids, ids) for ids in encoded))
    if not tokens:
        raise ValueError("the text file holds no text of two or more tokens to compute a perplexity on")
    return math.exp(total / tokens)
