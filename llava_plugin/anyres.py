"""AnyRes (LLaVA-NeXT) geometry: which resolution an image is tiled at, how many image tokens it becomes, and how
the tiles' features are laid back into one grid, cut to the image's own aspect, with a newline embedding per row.

An image of (height, width) is resized to fit the best of the config's grid pinpoints (keeping its aspect), padded
to it, and cut into tiles of the tower's size; a downscaled copy of the whole image goes first as the base tile.
The base tile's features stay as they are (side x side); the other tiles' features form a (rows*side, cols*side)
grid whose padded border is cut off, and each remaining row ends with `image_newline`. Sizes are (height, width)
throughout, as transformers' llava_next writes them. This file ships as remote code (torch and stdlib only).
"""

import math

import torch


def check_pinpoints(pinpoints, tile_size: int) -> list[list[int]]:
    """The config's `image_grid_pinpoints` as [[height, width], ...]; each a positive multiple of the tile size."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    checked = []
    for pair in pinpoints:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)):
            raise ValueError(f"image_grid_pinpoints entry {pair!r} is not a [height, width] pair of positive integers")
        if pair[0] % tile_size or pair[1] % tile_size:
            raise ValueError(f"image_grid_pinpoints entry {list(pair)} is not a multiple of the tower's {tile_size}px tiles")
        checked.append([int(pair[0]), int(pair[1])])
    return checked


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's pixels once it is scaled to fit (never counting more than the
    original has), and among those the one that wastes the least canvas; the first listed wins a full tie."""
    best, best_kept, best_wasted = None, -1, None
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_height * target_width - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (target_height, target_width), kept, wasted
    return best


def tile_grid(height: int, width: int, pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tower-sized tiles the image is cut into, the base tile not counted."""
    target_height, target_width = best_resolution(height, width, pinpoints)
    return target_height // tile_size, target_width // tile_size


def num_tiles(height: int, width: int, pinpoints, tile_size: int) -> int:
    rows, cols = tile_grid(height, width, pinpoints, tile_size)
    return rows * cols + 1  # + the base tile


def unpadded_grid(height: int, width: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """The part of a (grid_height, grid_width) feature grid that shows the image rather than its padding: the image
    was scaled to touch two opposite sides of the canvas and centred, so the other axis loses equal bands."""
    if width / height > grid_width / grid_height:  # wider than the canvas: bands above and below
        shown = int(round(height * (grid_width / width), 7))
        return grid_height - 2 * ((grid_height - shown) // 2), grid_width
    shown = int(round(width * (grid_height / height), 7))
    return grid_height, grid_width - 2 * ((grid_width - shown) // 2)


def image_token_count(height: int, width: int, pinpoints, tile_size: int, side: int) -> int:
    """Image tokens for one image: the base tile's side*side, the unpadded grid, and one newline per grid row."""
    rows, cols = tile_grid(height, width, pinpoints, tile_size)
    grid_height, grid_width = unpadded_grid(height, width, rows * side, cols * side)
    return side * side + grid_height * (grid_width + 1)


def pack_image_features(features: torch.Tensor, height: int, width: int, newline: torch.Tensor, pinpoints, tile_size: int) -> torch.Tensor:
    """(tiles, side*side, D) projected features of one image -> (image_token_count, D): the base tile, then the
    unpadded grid row by row, each row followed by `newline` (D,)."""
    tiles, per_tile, dim = features.shape
    side = math.isqrt(per_tile)
    rows, cols = tile_grid(height, width, pinpoints, tile_size)
    if side * side != per_tile or tiles != rows * cols + 1:
        raise ValueError(f"an image of {height}x{width} needs {rows * cols + 1} tiles of a square patch grid; "
                         f"got {tiles} tiles of {per_tile} features")
    grid = features[1:].view(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
    grid_height, grid_width = unpadded_grid(height, width, rows * side, cols * side)
    top, left = (rows * side - grid_height) // 2, (cols * side - grid_width) // 2
    grid = grid[top: top + grid_height, left: left + grid_width]
    ends = newline.to(grid.dtype).expand(grid_height, 1, dim)
    return torch.cat([features[0], torch.cat([grid, ends], dim=1).reshape(-1, dim)])


def split_tiles(pixel_values: torch.Tensor, image_sizes, pinpoints, tile_size: int) -> torch.Tensor:
    """Pixel tiles as one (total_tiles, 3, S, S) batch for the tower. Accepts them flat already (as our processor
    gives them) or as llava-hf's (images, max_tiles, 3, S, S) padded to the largest image's count."""
    counts = [num_tiles(int(h), int(w), pinpoints, tile_size) for h, w in _sizes(image_sizes)]
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(counts):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images but image_sizes {len(counts)}")
        return torch.cat([images[:count] for images, count in zip(pixel_values, counts)])
    if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: the {len(counts)} images' sizes need {sum(counts)} tiles "
                         f"({counts}) of (3, {tile_size}, {tile_size})")
    return pixel_values


def pack_all(features: torch.Tensor, image_sizes, newline: torch.Tensor, pinpoints, tile_size: int) -> torch.Tensor:
    """(total_tiles, side*side, D) -> (all images' tokens, D), images in order."""
    sizes = _sizes(image_sizes)
    counts = [num_tiles(h, w, pinpoints, tile_size) for h, w in sizes]
    if features.shape[0] != sum(counts):
        raise ValueError(f"{features.shape[0]} tiles of features for images that need {sum(counts)} ({counts})")
    chunks = torch.split(features, counts)
    return torch.cat([pack_image_features(chunk, h, w, newline, pinpoints, tile_size) for chunk, (h, w) in zip(chunks, sizes)])


def _sizes(image_sizes) -> list[tuple[int, int]]:
    if image_sizes is None:
        raise ValueError("AnyRes models need image_sizes (each image's original height and width) with pixel_values")
    rows = image_sizes.tolist() if hasattr(image_sizes, "tolist") else list(image_sizes)
    return [(int(h), int(w)) for h, w in rows]


__all__ = ["best_resolution", "check_pinpoints", "image_token_count", "num_tiles", "pack_all", "pack_image_features",
           "split_tiles", "tile_grid", "unpadded_grid"]
