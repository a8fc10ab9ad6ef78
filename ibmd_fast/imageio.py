"""Image files: one PNG writer and one grid layout for every picture the package writes.

- ``save_image(x, path)``: one image ``[C, H, W]`` in [-1, 1] as a PNG (gray stays gray).
- ``save_grid(columns, path)``: the grid of sample, comparison and evaluation pictures. One
  COLUMN per kind of image (a tensor ``[N, C, H, W]``, e.g. corrupted | teacher | student |
  clean, left to right), one ROW per image (the same image in every column). Columns of one
  height and width; a shorter column leaves its last cells white; gray columns are replicated
  to RGB when another column is in colour; cells are separated by ``pad`` white pixels.

Files are written atomically (``release.atomic_write``): a reader never sees half a PNG.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ibmd_fast.data.images import tensor_to_uint8
from ibmd_fast.release import atomic_write

__all__ = ["save_image", "save_grid", "write_png"]


def write_png(pixels: np.ndarray, path: str) -> None:
    """uint8 ``[H, W, 1 or 3]`` pixels -> a grayscale or RGB PNG at ``path``, atomically."""
    gray = pixels.shape[2] == 1
    image = Image.fromarray(pixels[:, :, 0] if gray else pixels, "L" if gray else "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_image(x: torch.Tensor, path: str) -> None:
    """Write one image ``[C, H, W]`` in [-1, 1] as a PNG (gray stays gray)."""
    write_png(tensor_to_uint8(x.clamp(-1.0, 1.0)), path)


def save_grid(columns: Sequence[torch.Tensor], path: str, max_rows: Optional[int] = None, pad: int = 2) -> None:
    """A PNG grid: one column per tensor ``[N, C, H, W]`` in [-1, 1], one row per image (module docstring).

    ``max_rows``: the first ``max_rows`` images of each column (default: all).
    """
    columns = [c[:max_rows].detach().float().cpu() for c in columns]
    if not columns:
        raise ValueError("save_grid needs at least one column")
    sizes = {tuple(c.shape[-2:]) for c in columns}
    if len(sizes) > 1:
        raise ValueError(f"grid columns differ in image size: {sorted(sizes)}")
    (h, w), = sizes
    rows = max(c.shape[0] for c in columns)
    channels = max(c.shape[1] for c in columns)
    grid = np.full((pad + rows * (h + pad), pad + len(columns) * (w + pad), channels), 255, np.uint8)
    for j, images in enumerate(columns):
        for i in range(images.shape[0]):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            pixels = tensor_to_uint8(images[i].clamp(-1.0, 1.0))
            grid[top:top + h, left:left + w] = np.repeat(pixels, channels // pixels.shape[2], axis=2)
    write_png(grid, path)
