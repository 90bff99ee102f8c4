"""The holistic embedding module: image patches and text tokens in one causal sequence -> LLM input space.

Forward (HOVLE.md's diagram):
    tiles -> patch embed + position embed -> pixel shuffle + MLP -> scatter into the <IMG_CONTEXT> slots
          -> N causal decoder layers (transformers' Llama layers) -> one vector per position for the LLM
With `shuffle_location="post"` (HoVLE-HD) the shuffle + MLP run after the layers instead: every image slot
is expanded to the patches it merges, the layers see all patches, and the result is shuffled back to one
token per slot (`post_shuffle_layout="slot"`), or, as the released HoVLE-HD does (`"raster"`), each tile's
patches run in raster order at positions of their own. The module keeps its KV cache in the model's cache,
in the slots after the LLM's layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from model.config import HoVLEConfig
from model.defocus import (
    ImageDecayBias,
    LearnableRotaryEmbedding,
    decoder_layer_forward,
    layer_drop_rates,
    scheduled_rate,
)


class ImageTokenMismatch(ValueError):
    """The number of <IMG_CONTEXT> slots does not match the image tokens the pixel values produce."""


def check_image_slots(image_mask: torch.Tensor, pixel_values: torch.Tensor | None, per_tile: int) -> int:
    """The number of tiles in pixel_values [tiles, 3, T, T] (0 for None), checked against the
    <IMG_CONTEXT> slots of image_mask [b, L]: `per_tile` slots per tile."""
    slots = int(image_mask.sum())
    tiles = 0 if pixel_values is None else pixel_values.shape[0]
    if slots and not tiles:
        raise ImageTokenMismatch(f"{slots} <IMG_CONTEXT> tokens but no pixel_values were given")
    if slots != tiles * per_tile:
        raise ImageTokenMismatch(
            f"{slots} <IMG_CONTEXT> tokens but {tiles} tiles x {per_tile} tokens/tile = {tiles * per_tile}: "
            "build inputs with the HoVLE processor"
        )
    return tiles


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Space-to-depth: [n, h, w, c] -> [n, h*ratio, w*ratio, c/ratio^2].

    Each k x k block (k = 1/ratio) becomes one position whose channels are ordered (dy, dx, c).
    """
    n, h, w, c = x.shape
    k = round(1 / ratio)
    if h % k or w % k:
        raise ValueError(f"pixel_shuffle: grid {h}x{w} is not divisible by {k}")
    x = x.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // k, w // k, k * k * c)


def group_patches(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[n, h, w, c] -> [n, (h*ratio)*(w*ratio), k*k, c]: the patches each shuffled token merges, in order."""
    n, h, w, c = x.shape
    k = round(1 / ratio)
    return pixel_shuffle(x, ratio).reshape(n, (h // k) * (w // k), k * k, c)


class HolisticEmbedding(nn.Module):
    """Maps a mixed sequence of text tokens and image tiles to the LLM's input-embedding space."""

    def __init__(self, config: HoVLEConfig):
        super().__init__()
        self.config = config
        self.layer_config = config.embedding_layer_config()
        hidden = self.layer_config.hidden_size
        grid = config.patch_grid
        # cache slots after the LLM's own layers, so one cache object serves both
        self.layer_offset = config.text_config.num_hidden_layers

        self.embed_tokens = nn.Embedding(config.text_config.vocab_size, hidden)
        self.patch_embed = nn.Conv2d(3, hidden, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, grid * grid, hidden))
        self.shuffle_mlp = nn.Sequential(
            nn.Linear(hidden * config.shuffle_factor, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(self.layer_config, layer_idx=self.layer_offset + i)
            for i in range(config.embedding_num_layers)
        )
        self.defocus = config.attention == "defocus"
        if self.defocus:
            head_dim, groups = self.layer_config.head_dim, self.layer_config.num_key_value_heads
            theta = self.layer_config.rope_parameters["rope_theta"]
            self.rotary = nn.ModuleList(
                LearnableRotaryEmbedding(head_dim, theta, groups) for _ in self.layers
            )
            self.decay = nn.ModuleList(
                ImageDecayBias(self.layer_config.num_attention_heads) for _ in self.layers
            )
            self.set_drop_path_progress(0.0)
        else:
            self.rotary_emb = LlamaRotaryEmbedding(self.layer_config)
            self.drop_path_rates = layer_drop_rates(config.drop_path_rate, len(self.layers))

    def set_drop_path_progress(self, progress: float) -> None:
        """De-focus schedule: the drop-path rate rises with training progress in [0, 1], spread over depth."""
        if not self.defocus:
            return
        rate = scheduled_rate(
            self.config.defocus_drop_path_start, self.config.defocus_drop_path_end, progress
        )
        self.drop_path_rates = layer_drop_rates(rate, len(self.layers))

    # ---- images --------------------------------------------------------------------------------------
    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, T, T] -> patches with position embedding [n, g, g, hidden]."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        n, hidden, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self._position_embedding(gh, gw)
        return x.reshape(n, gh, gw, hidden)

    def _position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        grid = self.config.patch_grid
        if (gh, gw) == (grid, grid):
            return self.position_embedding
        pos = self.position_embedding.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return pos.to(self.position_embedding.dtype).flatten(2).transpose(1, 2)

    def merge_patches(self, groups: torch.Tensor) -> torch.Tensor:
        """Patch groups [n, t, k*k, hidden] -> image tokens [n, t, hidden] through the shuffle MLP."""
        n, t, f, hidden = groups.shape
        return self.shuffle_mlp(groups.reshape(n, t, f * hidden))

    # ---- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """input_ids [b, L], pixel_values [tiles, 3, T, T] -> LLM input embeddings [b, L, hidden].

        attention_mask is the 2D padding mask over past + current tokens; position_ids [b, L] (restarting
        per sample when sequences are packed).
        """
        image_mask = input_ids == self.config.img_context_token_id
        text = self.embed_tokens(input_ids)
        groups = None
        if check_image_slots(image_mask, pixel_values, self.config.image_tokens_per_tile):
            patches = self.embed_patches(pixel_values)
            groups = group_patches(patches, self.config.pixel_shuffle_ratio)
            if self.config.post_shuffle_layout == "raster":
                groups = patches.reshape(groups.shape)  # raster order, read k*k entries per slot
        if position_ids is None:
            position_ids = default_position_ids(input_ids, cache)
        if self.config.shuffle_location == "post":
            return self._forward_post_shuffle(
                text, groups, image_mask, attention_mask, position_ids, cache, use_cache
            )
        hidden = text
        if groups is not None:
            hidden = text.masked_scatter(image_mask.unsqueeze(-1), self.merge_patches(groups).to(text.dtype))
        return self._run_layers(
            hidden, image_mask, attention_mask, position_ids, cache, use_cache, position_ids
        )

    def _past(self, cache: Cache | None) -> int:
        """The tokens the module already holds in `cache` (0 without one)."""
        return cache.get_seq_length(self.layer_offset) if cache is not None else 0

    def _forward_post_shuffle(self, text, groups, image_mask, attention_mask, position_ids, cache, use_cache):
        """HoVLE-HD: every image slot is expanded to its k*k patches for the layers, then merged back."""
        b, length, hidden = text.shape
        f = self.config.shuffle_factor
        widths = torch.where(image_mask, f, 1)
        valid = torch.arange(f, device=text.device).view(1, 1, f) < widths.unsqueeze(-1)  # [b, L, f]
        source = text.unsqueeze(2).expand(b, length, f, hidden)
        if groups is not None:
            slots = torch.zeros_like(source).masked_scatter(
                image_mask[:, :, None, None].expand_as(source), groups.to(text.dtype)
            )
            source = torch.where(image_mask[:, :, None, None], slots, source)
        # rows with fewer image slots are left-padded to the longest expanded row
        expanded_len = widths.sum(1)
        longest = int(expanded_len.max())
        placed = torch.arange(longest, device=text.device) >= (longest - expanded_len).unsqueeze(1)

        def expand(values: torch.Tensor, fill) -> torch.Tensor:
            """[b, L, f, ...] (or [b, L]: the same for a slot's f patches) -> [b, longest, ...]."""
            if values.dim() == 2:
                values = values.unsqueeze(-1).expand(b, length, f)
            out = torch.full((b, longest, *values.shape[3:]), fill, dtype=values.dtype, device=values.device)
            out[placed] = values[valid]
            return out

        hidden_states = expand(source, 0.0)
        raster = self.config.post_shuffle_layout == "raster"
        if raster:  # every patch at a position of its own: later tokens move by k*k - 1 per earlier slot
            shift = self._position_shift(image_mask, position_ids, cache, use_cache)
            sub = torch.arange(f, device=text.device) * image_mask.unsqueeze(-1)
            positions = expand((position_ids + shift).unsqueeze(-1) + sub, 0)
        else:  # the k*k patches of one slot share that slot's position
            positions = expand(position_ids, 0)
        current = (
            attention_mask[:, -length:].bool() if attention_mask is not None else torch.ones_like(image_mask)
        )
        mask = expand(current, False)
        if self._past(cache) and getattr(cache, "embedding_attention_mask", None) is not None:
            mask = torch.cat([cache.embedding_attention_mask, mask], dim=1)
        if use_cache and cache is not None:
            cache.embedding_attention_mask = mask
        segments = None
        if attention_mask is None and not self._past(cache) and _has_restarts(position_ids):
            segments = expand(packed_segments(position_ids), -1)  # packed samples, found on compact positions
        out = self._run_layers(
            hidden_states, expand(image_mask, False), mask, positions, cache, use_cache, segments=segments
        )
        gathered = torch.zeros_like(source)
        gathered[valid] = out[placed]
        result = gathered[:, :, 0]
        if groups is not None:
            merged = gathered[image_mask].reshape(groups.shape)
            if raster:  # each tile's outputs in raster order -> shuffled groups
                side = round((groups.shape[1] * groups.shape[2]) ** 0.5)
                tiles = merged.reshape(groups.shape[0], side, side, hidden)
                merged = group_patches(tiles, self.config.pixel_shuffle_ratio)
            tokens = self.merge_patches(merged).to(result.dtype)
            result = result.masked_scatter(image_mask.unsqueeze(-1), tokens)
        return result

    def _position_shift(self, image_mask, position_ids, cache, use_cache) -> torch.Tensor:
        """[b, L] how far each token's module position is past its LLM position in the raster layout:
        (k*k - 1) per image slot before it in its sample, plus what earlier cached chunks carried."""
        f = self.config.shuffle_factor
        slots = image_mask.long()
        before = slots.cumsum(1) - slots
        if _has_restarts(position_ids) and not self._past(cache):
            segment = packed_segments(position_ids)
            start = torch.ones_like(image_mask)
            start[:, 1:] = segment[:, 1:] != segment[:, :-1]
            before = before - torch.where(start, before, 0).cummax(1).values
        shift = before * (f - 1)
        carried = getattr(cache, "embedding_position_shift", None) if self._past(cache) else None
        if carried is not None:
            shift = shift + carried.unsqueeze(1)
        if use_cache and cache is not None:
            cache.embedding_position_shift = shift[:, -1] + slots[:, -1] * (f - 1)
        return shift

    def _run_layers(
        self, hidden, image_mask, padding, position_ids, cache, use_cache, packed=None, segments=None
    ):
        past = self._past(cache)
        and_mask = _same_segment(segments) if segments is not None else None
        needs_bias = self.defocus and bool(image_mask.any())
        if needs_bias and past > 0:
            raise ValueError(
                "de-focus attention: image tokens after cached tokens are not supported; "
                "put images in the first (prefill) chunk"
            )
        mask = create_causal_mask(
            config=self.layer_config,
            inputs_embeds=hidden,
            attention_mask=padding,
            cache=cache,
            position_ids=packed,
            and_mask_function=and_mask,
            layer_idx=self.layer_offset,
            allow_is_causal_skip=not needs_bias,
        )
        if needs_bias:
            mask = _as_additive(mask, hidden.dtype)
        shared = None if self.defocus else self.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(self.layers):
            rotary = self.rotary[i](hidden, position_ids) if self.defocus else shared
            layer_mask = mask
            if needs_bias:
                bias = self.decay[i](image_mask).to(mask.dtype)
                layer_mask = (mask + bias).clamp(min=torch.finfo(mask.dtype).min)
            rate = self.drop_path_rates[i]
            if self.defocus or rate > 0:
                # per-head rotary / per-branch drop path: the layer's own submodules, stepped here
                hidden = decoder_layer_forward(
                    layer,
                    hidden,
                    layer_mask,
                    rotary,
                    cache,
                    rate,
                    position_ids=position_ids,
                    use_cache=use_cache,
                )
                continue
            hidden = layer(
                hidden, attention_mask=layer_mask, position_ids=position_ids, cache=cache,
                use_cache=use_cache, position_embeddings=rotary,
            )  # fmt: skip
        return hidden


def default_position_ids(input_ids: torch.LongTensor, cache: Cache | None) -> torch.LongTensor:
    """Positions [b, L] continuing after the tokens already cached (counted in the LLM's slots, which hold
    one entry per token whatever the shuffle location)."""
    past = cache.get_seq_length() if cache is not None else 0
    positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
    return positions.unsqueeze(0).expand(input_ids.shape[0], -1)


def _has_restarts(position_ids: torch.Tensor) -> bool:
    """True when positions restart inside a row: several samples are packed into one sequence."""
    return bool((position_ids[:, 1:] <= position_ids[:, :-1]).any())


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, L] positions -> [b, L] sample index within the row: a new sample starts where positions restart."""
    step = torch.zeros_like(position_ids)
    step[:, 1:] = (position_ids[:, 1:] <= position_ids[:, :-1]).long()
    return step.cumsum(1)


def _same_segment(segment: torch.Tensor):
    """A mask function allowing attention only within one packed sample (`segment` [b, L], -1 = padding)."""

    def same(batch_idx, head_idx, q_idx, kv_idx):
        return segment[batch_idx, q_idx] == segment[batch_idx, kv_idx]

    return same


def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (True = attend) or additive 4D mask -> an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask.to(dtype)
