"""Degradations: clean image x0 -> corrupted image xT at the size of x0.

``get_degradation(name)`` returns an object with ``name``, ``is_inpainting``
and ``__call__(x0, generator=None) -> (xT, mask_or_None)``; ``x0`` is
``[C, H, W]`` or ``[B, C, H, W]`` in [-1, 1] with C = 1 or 3, ``xT`` has the
same shape, dtype and device and stays in [-1, 1]. ``mask`` (inpainting only)
is float ``[1, H, W]`` (``[B, 1, H, W]`` for a batch), 1 in the hole.

The degradations here are deterministic; ``generator`` is accepted so random
ones (random masks, random JPEG quality) fit the same interface.

Names (``DEGRADATIONS``), after I2SB's tasks:

- ``sr4x-bicubic``: bicubic 4x downsampling with antialias, bicubic upsampling
  back to size. ``sr4x-pool``: 4x average pooling, nearest upsampling (I2SB's
  "pool" super-resolution). Any ``sr<k>x-bicubic`` / ``sr<k>x-pool`` also parses.
- ``jpeg-5``, ``jpeg-10``: the real JPEG codec (Pillow, default 4:2:0 chroma
  subsampling for RGB) at that quality; any ``jpeg-<1..100>`` parses.
- ``inpaint-center``: a centered square hole of half the side; ``xT`` is x0
  with the hole set to 0. Samplers fill the hole with noise themselves
  (MATH.md section 3), so the value here only has to be fixed.
- ``sketch``: Canny edges (``skimage.feature.canny``, sigma 1.5, on the luma image) white
  (+1) on black (-1), replicated to C channels.
"""
from __future__ import annotations

import io
import re
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ibmd_fast.data.images import tensor_to_uint8, to_channels, uint8_to_tensor

__all__ = [
    "DEGRADATIONS",
    "Degradation",
    "SuperResolution",
    "JPEG",
    "CenterInpainting",
    "Sketch",
    "get_degradation",
]

DEGRADATIONS = ("sr4x-bicubic", "sr4x-pool", "jpeg-5", "jpeg-10", "inpaint-center", "sketch")


def _as_batch(x0: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    if x0.ndim == 3:
        return x0.unsqueeze(0), True
    if x0.ndim == 4:
        return x0, False
    raise ValueError(f"x0 must be [C, H, W] or [B, C, H, W], got shape {tuple(x0.shape)}")


class Degradation:
    """Base class: subclasses set ``name`` and implement ``_degrade`` on a batch."""

    name: str = ""
    is_inpainting: bool = False

    def __call__(
        self, x0: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, single = _as_batch(x0)
        if batch.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: x0 must have 1 or 3 channels, got {batch.shape[1]}")
        with torch.no_grad():
            xT, mask = self._degrade(batch, generator)
        if single:
            xT = xT[0]
            mask = None if mask is None else mask[0]
        return xT, mask

    def _degrade(self, x0: torch.Tensor, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def hole_mask(self, height: int, width: int) -> Optional[torch.Tensor]:
        """The fixed mask ``[1, H, W]`` for inpainting degradations, None otherwise."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SuperResolution(Degradation):
    """Downsample by ``factor`` then bring back to size (``mode`` "bicubic" or "pool")."""

    def __init__(self, factor: int = 4, mode: str = "bicubic"):
        if mode not in ("bicubic", "pool"):
            raise ValueError(f"super-resolution mode must be 'bicubic' or 'pool', got {mode!r}")
        if factor < 2:
            raise ValueError(f"super-resolution factor must be >= 2, got {factor}")
        self.factor, self.mode = int(factor), mode
        self.name = f"sr{self.factor}x-{mode}"

    def _check(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"{self.name}: image size {h}x{w} is not divisible by {self.factor}")

    def downsample(self, x0: torch.Tensor) -> torch.Tensor:
        """The low-resolution image ``[B, C, H/k, W/k]`` (or ``[C, H/k, W/k]``)."""
        batch, single = _as_batch(x0)
        self._check(batch)
        h, w = batch.shape[-2:]
        low_size = (h // self.factor, w // self.factor)
        if self.mode == "pool":
            low = F.avg_pool2d(batch, self.factor)
        else:
            low = F.interpolate(batch, size=low_size, mode="bicubic", antialias=True, align_corners=False)
        return low[0] if single else low

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """Bring a low-resolution image back to ``factor`` times its size."""
        batch, single = _as_batch(low)
        size = (batch.shape[-2] * self.factor, batch.shape[-1] * self.factor)
        if self.mode == "pool":
            up = F.interpolate(batch, size=size, mode="nearest")
        else:
            up = F.interpolate(batch, size=size, mode="bicubic", align_corners=False)
        up = up.clamp(-1.0, 1.0)  # bicubic overshoots
        return up[0] if single else up

    def _degrade(self, x0, generator):
        return self.upsample(self.downsample(x0)), None


class JPEG(Degradation):
    """Round trip through the JPEG codec at ``quality`` (1..100), via Pillow."""

    def __init__(self, quality: int):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)
        self.name = f"jpeg-{self.quality}"

    def _degrade(self, x0, generator):
        out = torch.empty_like(x0)
        for b in range(x0.shape[0]):
            pixels = tensor_to_uint8(x0[b])
            image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels,
                                    "L" if pixels.shape[2] == 1 else "RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                array = np.asarray(decoded.convert(image.mode))
            out[b] = uint8_to_tensor(array).to(x0.device, x0.dtype)
        return out, None


class CenterInpainting(Degradation):
    """A centered hole of half the image side (``hole`` None), or a centered ``hole`` x ``hole``
    square (pixels; for a picture larger than the crops a teacher learned, e.g. ``comparison.png``);
    the hole of ``xT`` is 0."""

    name = "inpaint-center"
    is_inpainting = True

    def __init__(self, hole: Optional[int] = None):
        if hole is not None and hole < 1:
            raise ValueError(f"inpaint-center: the hole side must be positive, got {hole}")
        self.hole = hole

    def hole_mask(self, height: int, width: int) -> torch.Tensor:
        mask = torch.zeros(1, height, width)
        if self.hole is None:
            side_h, side_w = height // 2, width // 2
        else:
            side_h, side_w = min(self.hole, height), min(self.hole, width)
        top, left = (height - side_h) // 2, (width - side_w) // 2
        mask[:, top:top + side_h, left:left + side_w] = 1.0
        return mask

    def _degrade(self, x0, generator):
        mask = self.hole_mask(*x0.shape[-2:]).to(x0.device, x0.dtype)
        mask = mask.expand(x0.shape[0], 1, *x0.shape[-2:]).contiguous()
        return x0 * (1.0 - mask), mask


class Sketch(Degradation):
    """Canny edges of the luma image: +1 on edges, -1 elsewhere, on every channel."""

    name = "sketch"

    def __init__(self, sigma: float = 1.5):
        self.sigma = float(sigma)

    def _degrade(self, x0, generator):
        from skimage.feature import canny  # imported here: skimage is slow to import

        luma = ((to_channels(x0.to(torch.float32), 1) + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy()
        edges = np.stack([canny(luma[b, 0], sigma=self.sigma) for b in range(x0.shape[0])])
        sketch = torch.from_numpy(edges).to(x0.device, x0.dtype).mul(2.0).sub(1.0)
        return sketch.unsqueeze(1).expand_as(x0).contiguous(), None


_SR = re.compile(r"^sr(\d+)x-(bicubic|pool)$")
_JPEG = re.compile(r"^jpeg-(\d+)$")


def get_degradation(name) -> Degradation:
    """A degradation by name (see ``DEGRADATIONS``); a Degradation passes through."""
    if isinstance(name, Degradation):
        return name
    key = str(name).strip().lower()
    if match := _SR.match(key):
        return SuperResolution(int(match.group(1)), match.group(2))
    if match := _JPEG.match(key):
        return JPEG(int(match.group(1)))
    if key == "inpaint-center":
        return CenterInpainting()
    if key == "sketch":
        return Sketch()
    raise ValueError(f"unknown degradation {name!r}; known: {', '.join(DEGRADATIONS)} "
                     "(also sr<k>x-bicubic, sr<k>x-pool, jpeg-<quality>)")
