"""Conversions between PIL images, uint8 arrays and the package's image tensors.

Every image the data package hands out is a float32 tensor ``[C, H, W]`` in
``[-1, 1]`` with ``C`` = 1 (grayscale) or 3 (RGB). Grayscale from RGB uses the
ITU-R 601 luma weights, the ones PIL's ``convert("L")`` uses, so a photo read
from a file and one converted from a tensor give the same gray.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "LUMA_WEIGHTS",
    "Size",
    "as_hw",
    "check_channels",
    "uint8_to_tensor",
    "tensor_to_uint8",
    "to_channels",
    "pil_to_tensor",
    "load_image",
    "resize_and_crop",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

Size = Union[int, Tuple[int, int], None]


def as_hw(size: Size) -> Optional[Tuple[int, int]]:
    """``size`` as ``(height, width)``; an int means a square."""
    if size is None:
        return None
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw  # type: ignore[return-value]


def check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> float32 ``[C, H, W]`` in [-1, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        array = array.copy()
    t = torch.from_numpy(array).permute(2, 0, 1)
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[C, H, W]`` in [-1, 1] -> uint8 ``[H, W, C]`` (rounded, clipped)."""
    if x.ndim != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(x.shape)}")
    y = ((x.detach().to(torch.float32).cpu() + 1.0) * 127.5).round_().clamp_(0, 255)
    return y.to(torch.uint8).permute(1, 2, 0).numpy()


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert ``[..., C, H, W]`` between 1 and 3 channels (luma / replication)."""
    check_channels(channels)
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        w = x.new_tensor(LUMA_WEIGHTS).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _pil_to_uint8(image: Image.Image, channels: int) -> np.ndarray:
    # 16-bit and 32-bit integer images: PIL's convert() clips instead of scaling.
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        peak = 1.0 if a.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return np.asarray(image.convert("L" if channels == 1 else "RGB"))


def pil_to_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A PIL image (any mode) -> float32 ``[channels, H, W]`` in [-1, 1]."""
    return uint8_to_tensor(_pil_to_uint8(image, check_channels(channels)))


def load_image(path, channels: int = 3) -> Image.Image:
    """Open and fully decode an image file, applying its EXIF orientation.

    Raises whatever PIL raises for unreadable or truncated files (OSError,
    ``PIL.UnidentifiedImageError``, ValueError, ...).
    """
    with Image.open(path) as image:
        image.load()  # decode everything now: truncated files fail here, not later
        image = ImageOps.exif_transpose(image)
        image.load()
    return image


def resize_and_crop(
    image: Image.Image,
    size: Size,
    crop: str = "center",
    rng: Optional[torch.Generator] = None,
    box: Optional[Sequence[int]] = None,
) -> Tuple[Image.Image, Tuple[int, int, int, int]]:
    """Resize so the image covers ``size`` (aspect kept, bicubic with antialias),
    then crop to exactly ``size``.

    Returns the image and the crop box ``(left, top, right, bottom)`` in the
    resized image. ``box`` reuses a crop box (so a clean/corrupted pair gets the
    same crop). ``crop="random"`` draws the offset from ``rng`` (torch's
    default generator when None, which DataLoader seeds per worker).
    """
    hw = as_hw(size)
    if hw is None:
        return image, (0, 0, image.width, image.height)
    h, w = hw
    scale = max(h / image.height, w / image.width)
    new_w = max(w, round(image.width * scale))
    new_h = max(h, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.BICUBIC)  # PIL resize is antialiased
    if box is None:
        if crop == "center":
            left, top = (new_w - w) // 2, (new_h - h) // 2
        elif crop == "random":
            left = int(torch.randint(0, new_w - w + 1, (1,), generator=rng))
            top = int(torch.randint(0, new_h - h + 1, (1,), generator=rng))
        else:
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        box = (left, top, left + w, top + h)
    box = tuple(int(b) for b in box)
    if box != (0, 0, new_w, new_h):
        image = image.crop(box)
    return image, box  # type: ignore[return-value]
