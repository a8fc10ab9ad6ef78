"""Image files: one PNG writer and one grid layout for every picture the package writes.

- ``save_image(x, path)``: one image ``[C, H, W]`` in [-1, 1] as a PNG (gray stays gray).
- ``save_grid(columns, path, titles)``: the grid of sample and evaluation pictures. One
  COLUMN per kind of image (a tensor ``[N, C, H, W]``, e.g. corrupted | teacher | student |
  clean, left to right), one ROW per image (the same image in every column), each column's
  title above it. Columns of one height and width; small images are enlarged (nearest) to
  about ``cell`` pixels so a person can see them; a shorter column leaves its last cells white;
  gray columns are replicated to RGB when another column is in colour; cells are separated by
  ``pad`` white pixels.
- ``draw_columns(columns)``: one image per column with a title above and lines of text under
  it (``comparison.png``).

Files are written atomically (``release.atomic_write``): a reader never sees half a PNG.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ibmd_fast.data.images import tensor_to_uint8
from ibmd_fast.release import atomic_write

__all__ = ["save_image", "save_grid", "write_png", "draw_columns", "grid_zoom", "GRID_CELL"]

GRID_CELL = 96  # pixels: about the side a small image is enlarged to in a grid
LABEL_PAD = 4  # pixels around each text line
LINE_HEIGHT = 12  # PIL's default bitmap font is 11 px high


def write_png(pixels: np.ndarray, path: str) -> None:
    """uint8 ``[H, W, 1 or 3]`` pixels -> a grayscale or RGB PNG at ``path``, atomically."""
    gray = pixels.shape[2] == 1
    image = Image.fromarray(pixels[:, :, 0] if gray else pixels, "L" if gray else "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_image(x: torch.Tensor, path: str) -> None:
    """Write one image ``[C, H, W]`` in [-1, 1] as a PNG (gray stays gray)."""
    write_png(tensor_to_uint8(x.clamp(-1.0, 1.0)), path)


def grid_zoom(height: int, width: int, cell: int = GRID_CELL) -> int:
    """The whole-number enlargement that brings an image's longer side to about ``cell`` pixels
    (1 for images that are that large already): 32 px -> 3, 28 px -> 3, 64 px -> 2."""
    return max(1, round(cell / max(height, width, 1)))


def _title_band(canvas: np.ndarray, titles: Sequence[str], lefts: Sequence[int]) -> np.ndarray:
    """``canvas`` with a white band above it holding each title at its column's left edge."""
    band = LINE_HEIGHT + 2 * LABEL_PAD
    rgb = canvas if canvas.shape[2] == 3 else np.repeat(canvas, 3, axis=2)
    image = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + band), "white")
    image.paste(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), (0, band))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for title, left in zip(titles, lefts):
        draw.text((left, LABEL_PAD), str(title), fill="black", font=font)
    return np.asarray(image)


def save_grid(
    columns: Sequence[torch.Tensor],
    path: str,
    titles: Optional[Sequence[str]] = None,
    max_rows: Optional[int] = None,
    pad: int = 2,
    cell: int = GRID_CELL,
) -> None:
    """A PNG grid: one column per tensor ``[N, C, H, W]`` in [-1, 1], one row per image (module docstring).

    ``titles``: one per column, drawn above it (None: no title band). ``max_rows``: the first
    ``max_rows`` images of each column (default: all). ``cell``: images are enlarged (nearest, by a
    whole number, ``grid_zoom``) to about this many pixels; 0 keeps them at their own size.
    """
    columns = [c[:max_rows].detach().float().cpu() for c in columns]
    if not columns:
        raise ValueError("save_grid needs at least one column")
    if titles is not None and len(titles) != len(columns):
        raise ValueError(f"save_grid: {len(titles)} titles for {len(columns)} columns")
    sizes = {tuple(c.shape[-2:]) for c in columns}
    if len(sizes) > 1:
        raise ValueError(f"grid columns differ in image size: {sorted(sizes)}")
    ((h0, w0),) = sizes
    zoom = grid_zoom(h0, w0, cell) if cell else 1
    h, w = h0 * zoom, w0 * zoom
    rows = max(c.shape[0] for c in columns)
    channels = max(c.shape[1] for c in columns)
    grid = np.full((pad + rows * (h + pad), pad + len(columns) * (w + pad), channels), 255, np.uint8)
    for j, images in enumerate(columns):
        for i in range(images.shape[0]):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            pixels = tensor_to_uint8(images[i].clamp(-1.0, 1.0))
            pixels = pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)  # nearest: a pixel stays a square
            grid[top : top + h, left : left + w] = np.repeat(pixels, channels // pixels.shape[2], axis=2)
    if titles is not None:
        grid = _title_band(grid, titles, [pad + j * (w + pad) for j in range(len(columns))])
    write_png(grid, path)


def _panel(image: torch.Tensor, zoom: int) -> Image.Image:
    pixels = tensor_to_uint8(image.detach().float().cpu().clamp(-1, 1))
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    panel = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    return panel.resize((panel.width * zoom, panel.height * zoom), Image.NEAREST) if zoom > 1 else panel


def draw_columns(
    columns: Sequence[tuple[str, torch.Tensor, Sequence[str]]], zoom: int = 2, pad: int = 6
) -> Image.Image:
    """Labeled columns side by side: each ``(title, image [C, H, W] in [-1, 1], lines under it)``.

    Every image is enlarged ``zoom`` times (nearest), its title drawn above and its lines below in
    PIL's default font, on white with ``pad`` pixels between columns. All images share one size.
    """
    if not columns:
        raise ValueError("draw_columns: no columns")
    sizes = {tuple(image.shape[-2:]) for _, image, _ in columns}
    if len(sizes) != 1:
        raise ValueError(f"draw_columns: the images differ in size {sorted(sizes)}")
    h, w = (s * zoom for s in sizes.pop())
    n_lines = max(len(lines) for _, _, lines in columns)
    top = LINE_HEIGHT + 2 * LABEL_PAD
    bottom = n_lines * LINE_HEIGHT + 2 * LABEL_PAD
    canvas = Image.new("RGB", (pad + len(columns) * (w + pad), top + h + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, (title, image, lines) in enumerate(columns):
        left = pad + j * (w + pad)
        canvas.paste(_panel(image, zoom), (left, top))
        draw.text((left, LABEL_PAD), title, fill="black", font=font)
        for k, line in enumerate(lines):
            draw.text((left, top + h + LABEL_PAD + k * LINE_HEIGHT), line, fill="black", font=font)
    return canvas
