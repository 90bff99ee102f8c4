"""Images into tiles: InternVL's dynamic tiling and the normalised tensors the model reads.

Pick a grid of ``cols x rows`` tiles whose aspect ratio is closest to the image's, resize (bicubic) to that
grid, cut ``tile_size`` square tiles row-major and add a thumbnail of the whole image when there is more
than one tile. torch is imported only by `tiles_to_tensor`: tiling runs in processes that never load it
(Ray Data preprocessing actors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def find_closest_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int = 448
) -> tuple[int, int]:
    """The tile grid ``(cols, rows)`` for an image, as InternVL's dynamic tiling picks it.

    Of the grids with ``min_tiles <= cols * rows <= max_tiles`` (by increasing area), the one whose
    ``cols / rows`` is closest to ``width / height`` wins; on a tie (1x1 and 2x2) the larger grid wins only
    when the image has more than half its pixels, so small images are not blown up to many tiles.
    ValueError for a non-positive image size or an empty tile range.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(
            f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
        )
    candidates = sorted(
        (
            (cols, rows)
            for cols in range(1, max_tiles + 1)
            for rows in range(1, max_tiles // cols + 1)
            if cols * rows >= min_tiles
        ),
        key=lambda grid: (grid[0] * grid[1], grid[0]),
    )
    aspect_ratio = width / height
    area = width * height
    best_grid = candidates[0]
    best_diff = float("inf")
    for cols, rows in candidates:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_grid, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB: transparency composited over white (a plain ``convert``
    shows what hides under it, often black); 16-bit greyscale scaled, not clipped, to 8 bits (32-bit ``I``
    too when a value exceeds 255); ``F`` images read as 0..1 when no value exceeds 1."""
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in {"I", "F"}:
        values = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 [H, W] → mode L
    return image.convert("RGB")


def dynamic_tiles(
    image: Image.Image, tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> list[Image.Image]:
    """``cols * rows`` square RGB tiles, row-major, of the image resized (bicubic) to the grid
    :func:`find_closest_grid` picks; then, with ``use_thumbnail`` and more than one tile, the whole image
    as one more tile."""
    image = to_rgb(image)
    cols, rows = find_closest_grid(image.width, image.height, min_tiles, max_tiles, tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size))
        for row in range(rows)
        for col in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tiles_to_tensor(
    tiles: Sequence[Image.Image],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """n tiles of one size T x T (any mode) -> float32 ``[n, 3, T, T]`` holding ``(pixel / 255 - mean) / std``
    (per-channel statistics on the 0..1 scale). ValueError when there are no tiles or their sizes differ."""
    import torch

    if not tiles:
        raise ValueError("tiles_to_tensor needs at least one tile")
    sizes = {tile.size for tile in tiles}
    if len(sizes) != 1:
        raise ValueError(f"all tiles must have the same size, got sizes {sorted(sizes)}")
    pixels = np.stack([np.asarray(to_rgb(tile), dtype=np.uint8) for tile in tiles])  # [n, T, T, 3]
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t
