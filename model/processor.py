"""Turn one conversation with images into HoVLE model inputs: tiles, image tokens, chat tokens and labels.

Images are tiled by `model.images.dynamic_tiles` (InternVL's dynamic tiling). Each ``<image>``
placeholder in the text becomes ``<img>`` + ``<IMG_CONTEXT>`` x (``image_tokens_per_tile`` x tiles) +
``</img>``; the model later scatters the image features into the ``<IMG_CONTEXT>`` slots in order.

Text is rendered with the chat template (HoVLE's ChatML, or the LLM family's own: `model.chat_template`)
and tokenized; labels are the assistant's content and its end-of-turn token (ChatML's ``<|im_end|>``,
Llama 3's ``<|eot_id|>``, ...), -100 everywhere else. A template with ``{% generation %}`` blocks gives
them through transformers' assistant-token mask; any other through `model.chat_template`.

torch is imported only by what returns tensors: tiling and tokenizing (`dynamic_tiles`, `tokenize`) run
in processes that never load it (Ray Data preprocessing actors), which saves their start-up seconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from transformers import PreTrainedTokenizerFast

from model.chat_template import analyse_template, assistant_char_spans, token_mask
from model.images import IMAGENET_MEAN, IMAGENET_STD, dynamic_tiles, tiles_to_tensor
from model.tokenizer import CHATML_TEMPLATE, IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROCESSOR_CONFIG_NAME = "processor_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"


class ImagePlaceholderMismatch(ValueError):
    """The number of ``<image>`` placeholders in a conversation differs from the number of images."""

    def __init__(self, num_placeholders: int, num_images: int) -> None:
        self.num_placeholders, self.num_images = num_placeholders, num_images
        super().__init__(
            f"the conversation has {num_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} "
            f"image(s) were given; put exactly one '{IMAGE_PLACEHOLDER}' in the message text where each "
            "image belongs, in the same order as the images list"
        )


class SequenceTooLong(ValueError):
    """A tokenized sample is longer than the allowed ``max_length``; the data pipeline decides what to do."""

    def __init__(self, length: int, max_length: int) -> None:
        self.length, self.max_length = length, max_length
        super().__init__(
            f"sample has {length} tokens but max_length is {max_length}; raise max_length, lower max_tiles, "
            "or truncate/drop the sample in the data pipeline"
        )


class HoVLEProcessor:
    """Builds model inputs for one conversation at a time and pads them into batches.

    The tokenizer must already hold the HoVLE tokens (see :func:`model.tokenizer.prepare_tokenizer`).
    The chat template needs ``{% generation %}`` blocks or an end-of-turn token after the assistant's
    content (`model.chat_template.analyse_template`); one without a system role gets the system text
    folded into the first user turn.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        tile_size: int = 448,
        min_tiles: int = 1,
        max_tiles: int = 6,
        use_thumbnail: bool = True,
        image_tokens_per_tile: int = 256,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        chat_template: str | None = None,
    ) -> None:
        if tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(
                f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
            )
        if image_tokens_per_tile <= 0:
            raise ValueError(f"image_tokens_per_tile must be positive, got {image_tokens_per_tile}")
        if len(image_mean) != 3 or len(image_std) != 3 or any(s <= 0 for s in image_std):
            raise ValueError(
                f"image_mean and image_std need 3 values each (std > 0), got {image_mean} and {image_std}"
            )
        self.tokenizer = tokenizer
        self.tile_size = tile_size
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        self.use_thumbnail = use_thumbnail
        self.image_tokens_per_tile = image_tokens_per_tile
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.chat_template = chat_template or tokenizer.chat_template or CHATML_TEMPLATE
        self.image_token_ids = self._image_token_ids()
        self.image_context_token_id = self.image_token_ids[IMG_CONTEXT]
        self.turns = analyse_template(tokenizer, self.chat_template)

    def _image_token_ids(self) -> dict[str, int]:
        """Ids of ``<img>``, ``</img>`` and ``<IMG_CONTEXT>``; each must be a single, known token."""
        ids: dict[str, int] = {}
        for token in (IMG_START, IMG_END, IMG_CONTEXT):
            encoded = self.tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1 or encoded[0] == self.tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer does not know {token!r} as one token; call "
                    "model.tokenizer.prepare_tokenizer(tokenizer) (or load it with load_tokenizer) first"
                )
            ids[token] = encoded[0]
        return ids

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments except the tokenizer, as JSON-ready values."""
        return {
            "tile_size": self.tile_size,
            "min_tiles": self.min_tiles,
            "max_tiles": self.max_tiles,
            "use_thumbnail": self.use_thumbnail,
            "image_tokens_per_tile": self.image_tokens_per_tile,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "chat_template": self.chat_template,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HoVLEProcessor):
            return NotImplemented
        return (
            self.config == other.config
            and self.tokenizer.get_vocab() == other.tokenizer.get_vocab()
            and self.tokenizer.pad_token_id == other.tokenizer.pad_token_id
        )

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value

    def process_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        """Images -> ``pixel_values`` float32 ``[total_tiles, 3, T, T]`` (images in order, each image's tiles
        row-major then its thumbnail) and the number of tiles of each image."""
        import torch

        per_image = [
            dynamic_tiles(image, self.tile_size, self.min_tiles, self.max_tiles, self.use_thumbnail)
            for image in images
        ]
        tiles = [tile for image_tiles in per_image for tile in image_tiles]
        tiles_per_image = [len(image_tiles) for image_tiles in per_image]
        if not tiles:
            return torch.empty(0, 3, self.tile_size, self.tile_size), []
        return tiles_to_tensor(tiles, self.image_mean, self.image_std), tiles_per_image

    def expand_image_placeholders(self, text: str, tiles_per_image: Sequence[int]) -> str:
        """Replace the i-th ``<image>`` of ``text`` with ``<img>`` + ``<IMG_CONTEXT>`` x
        (``image_tokens_per_tile`` x ``tiles_per_image[i]``) + ``</img>`` (ImagePlaceholderMismatch when
        the counts differ)."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(tiles_per_image):
            raise ImagePlaceholderMismatch(len(pieces) - 1, len(tiles_per_image))
        expanded = [pieces[0]]
        for num_tiles, piece in zip(tiles_per_image, pieces[1:]):
            expanded.append(IMG_START + IMG_CONTEXT * (self.image_tokens_per_tile * num_tiles) + IMG_END)
            expanded.append(piece)
        return "".join(expanded)

    def __call__(
        self,
        messages: list[dict[str, str]],
        images: list[Image.Image] | None = None,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """The inputs of one conversation.

        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``, one ``<image>`` in
            the text per image, in the order of ``images``; ``add_generation_prompt`` appends the template's
            assistant header; a sample longer than ``max_length`` raises :class:`SequenceTooLong`.
        Returns ``input_ids``, ``attention_mask``, ``labels`` long ``[1, L]`` (labels: token ids on assistant
        content and its end-of-turn token, -100 elsewhere and on image tokens), ``pixel_values`` float32
        ``[n_tiles, 3, T, T]`` or None and ``num_tiles`` (one per image). Placeholders and images differing
        in number raise :class:`ImagePlaceholderMismatch`.
        """
        images = images or []
        for message in messages:
            if not isinstance(message.get("content"), str) or "role" not in message:
                raise ValueError(f"each message needs a 'role' and a string 'content', got {message!r}")
        placeholders_per_message = [message["content"].count(IMAGE_PLACEHOLDER) for message in messages]
        if sum(placeholders_per_message) != len(images):
            raise ImagePlaceholderMismatch(sum(placeholders_per_message), len(images))

        pixel_values, num_tiles = self.process_images(images)
        expanded_messages = []
        first_image = 0
        for message, count in zip(messages, placeholders_per_message):
            content = self.expand_image_placeholders(
                message["content"], num_tiles[first_image : first_image + count]
            )
            expanded_messages.append({**message, "content": content})
            first_image += count

        input_ids, labels = self.tokenize(expanded_messages, add_generation_prompt)
        if max_length is not None and len(input_ids) > max_length:
            raise SequenceTooLong(len(input_ids), max_length)
        import torch

        ids = torch.tensor(input_ids, dtype=torch.long).unsqueeze(0)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(labels, dtype=torch.long).unsqueeze(0),
            "pixel_values": pixel_values if images else None,
            "num_tiles": num_tiles,
        }

    def tokenize(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels (as :meth:`__call__`'s) of a conversation whose image placeholders are
        already expanded, as plain lists: no torch needed (see the module docstring)."""
        messages = self.turns.fold_system(messages)
        if self.turns.generation_blocks:
            encoded = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            input_ids, mask = list(encoded["input_ids"]), encoded["assistant_masks"]
        else:
            text, spans = assistant_char_spans(
                self.tokenizer, self.chat_template, messages, add_generation_prompt, self.turns
            )
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            input_ids, mask = list(encoded["input_ids"]), token_mask(encoded["offset_mapping"], spans)
        image_ids = set(self.image_token_ids.values())
        labels = [
            token if supervised and token not in image_ids else IGNORE_INDEX
            for token, supervised in zip(input_ids, mask, strict=True)
        ]
        return input_ids, labels

    def collate(self, samples: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Pad samples from :meth:`__call__` into one batch: :func:`pad_batch`'s, plus ``num_tiles`` (every
        image of the batch in sample order, as the ``<IMG_CONTEXT>`` runs of ``input_ids`` read row-major).
        ValueError for a tokenizer without pad token."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError(
                "the tokenizer has no pad token; prepare it with model.tokenizer.prepare_tokenizer"
            )
        batch = pad_batch(samples, pad_id, padding_side)
        batch["num_tiles"] = [count for sample in samples for count in sample.get("num_tiles", [])]
        return batch

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode one sequence of token ids (list or 1-D tensor), dropping special tokens."""
        if not isinstance(ids, (list, tuple)):  # a tensor or an array
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer files, ``processor_config.json`` (the settings) and the chat template as
        ``chat_template.jinja``, where transformers 5 keeps a processor's and a tokenizer's template."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        settings = {key: value for key, value in self.config.items() if key != "chat_template"}
        (directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps(settings, indent=2, ensure_ascii=False))
        (directory / CHAT_TEMPLATE_NAME).write_text(self.chat_template, encoding="utf-8")
        logger.info("saved HoVLE processor to %s", directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **auto_kwargs) -> HoVLEProcessor:
        """Restore a processor written by :meth:`save_pretrained` (local files only; FileNotFoundError
        without ``processor_config.json``). ``auto_kwargs`` (what ``AutoProcessor.from_pretrained`` passes
        along, ``trust_remote_code`` and the like) are not needed, so not used."""
        directory = Path(directory)
        config_path = directory / PROCESSOR_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} not found; pass a directory written by HoVLEProcessor.save_pretrained"
            )
        config = json.loads(config_path.read_text())
        template = directory / CHAT_TEMPLATE_NAME
        if template.is_file():  # older exports kept it in processor_config.json
            config["chat_template"] = template.read_text(encoding="utf-8")
        from transformers import AutoTokenizer  # imports torch (see the module docstring)

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return cls(tokenizer, **config)


def pad_batch(
    samples: Sequence[Mapping[str, Any]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, Any]:
    """One sample per row, padded to the longest: the one padding collator (the processor's batches, and
    the training stream's unpacked ones).

    samples: `input_ids` and `labels` (lists, arrays or one-row tensors), optionally `pixel_values` (the
        sample's tiles; empty or None without an image).
    Returns `input_ids` long [b, L_max] (the pad token on padding), `attention_mask` long [b, L_max] (0 on
    padding), `labels` long [b, L_max] (-100 on padding), `pixel_values` [tiles, 3, S, S] in sample order or
    None. ValueError: no samples, an unknown padding side, or labels and ids of different lengths.
    """
    import torch

    if not samples:
        raise ValueError("a batch needs at least one sample")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    ids = [torch.as_tensor(sample["input_ids"], dtype=torch.long).reshape(-1) for sample in samples]
    labels = [torch.as_tensor(sample["labels"], dtype=torch.long).reshape(-1) for sample in samples]
    longest = max(t.numel() for t in ids)
    batch_ids = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, (tokens, target) in enumerate(zip(ids, labels)):
        if tokens.numel() != target.numel():
            raise ValueError(f"sample {row}: {tokens.numel()} input_ids but {target.numel()} labels")
        span = slice(0, tokens.numel()) if padding_side == "right" else slice(longest - tokens.numel(), None)
        batch_ids[row, span], batch_labels[row, span], mask[row, span] = tokens, target, 1
    pixels = [torch.as_tensor(s["pixel_values"]) for s in samples if s.get("pixel_values") is not None]
    pixels = [p for p in pixels if p.shape[0] > 0]
    return {
        "input_ids": batch_ids,
        "attention_mask": mask,
        "labels": batch_labels,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
