"""Degradations: clean image x0 -> corrupted image xT at the size of x0.

``get_degradation(name, masks=None)`` returns an object with ``name``, ``is_inpainting``
and ``__call__(x0, rng=None) -> (xT, mask_or_None)``; ``x0`` is
``[C, H, W]`` or ``[B, C, H, W]`` in [-1, 1] with C = 1 or 3, ``xT`` has the
same shape, dtype and device. ``mask`` (inpainting only) is float ``[1, H, W]``
(``[B, 1, H, W]`` for a batch), 1 in the hole.

``rng`` seeds the random ones (free-form masks; torch's default generator
when None, which the trainers seed).

Names (``DEGRADATIONS``). I2SB's own corruptions, exactly as its ``corruption/``
package makes them (``ibmd_fast.data.i2sb_corruptions`` has the formulas), under
I2SB's names; their outputs are not clipped, as I2SB's are not:

- ``sr4x-bicubic``: DDRM's bicubic downsampling matrix (a = -0.5, 16 taps,
  mirror borders), then nearest upsampling. ``sr4x-pool``: 4x average pooling,
  nearest upsampling.
- ``jpeg-5``, ``jpeg-10`` (any ``jpeg-<1..100>``): DDRM's torch JPEG round trip
  (sides divisible by 16).
- ``blur-uni``, ``blur-gauss``: DDRM's deblurring operators on [0, 1].
- ``inpaint-center``: a centered square hole of half the side.
  ``inpaint-freeform1020``, ``inpaint-freeform2030``: a random free-form mask
  per image from Palette's / I2SB's mask file (``masks=FILE``, ``--masks``).
  ``xT`` is x0 with the hole set to 0; I2SB sets it to 1, but both I2SB and
  the samplers here replace the hole with noise before use (MATH.md section 3),
  so the value only has to be fixed.

The project's own variants, under names of their own:

- ``sr4x-bicubic-aa``: torch's antialiased bicubic downsampling, bicubic
  upsampling back to size (clipped to [-1, 1]).
- ``jpeg-10-libjpeg`` (any ``jpeg-<q>-libjpeg``): the real JPEG codec (Pillow,
  4:2:0 chroma for RGB, 8-bit pixels), as photographs are compressed.
- ``sketch``: Canny edges (``skimage.feature.canny``, sigma 1.5, on the luma image) white
  (+1) on black (-1), replicated to C channels.

Any ``sr<k>x-bicubic`` / ``sr<k>x-bicubic-aa`` / ``sr<k>x-pool`` also parses.
"""

from __future__ import annotations

import io
import os
import re
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ibmd_fast.data import i2sb_corruptions
from ibmd_fast.data.images import tensor_to_uint8, to_channels, uint8_to_tensor

__all__ = [
    "DEGRADATIONS",
    "Degradation",
    "SuperResolution",
    "JPEG",
    "Blur",
    "CenterInpainting",
    "FreeformInpainting",
    "Sketch",
    "canonical_name",
    "get_degradation",
]

# I2SB's nine tasks except its training-time "mixture", then the project's own
I2SB_DEGRADATIONS = (
    "sr4x-bicubic",
    "sr4x-pool",
    "jpeg-5",
    "jpeg-10",
    "blur-uni",
    "blur-gauss",
    "inpaint-center",
    "inpaint-freeform1020",
    "inpaint-freeform2030",
)
DEGRADATIONS = I2SB_DEGRADATIONS + ("sr4x-bicubic-aa", "jpeg-5-libjpeg", "jpeg-10-libjpeg", "sketch")


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
    fixed_mask: bool = True  # False: the mask is drawn per image (no hole_mask)
    size_multiple: int = 1  # image sides must be multiples of this
    square: bool = False  # only square images (DDRM's blur)

    def frame(self) -> Optional[Tuple[int, int]]:
        """The one image size the degradation takes (free-form masks), or None."""
        return None

    def check_size(self, height: int, width: int) -> None:
        """Raise a one-line ValueError if images of this size cannot be degraded."""
        frame = self.frame()
        if frame is not None and (height, width) != tuple(frame):
            raise ValueError(f"{self.name} takes {frame[0]}x{frame[1]} images (its masks' size), not {height}x{width}")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"{self.name} needs image sides divisible by {self.size_multiple}, got {height}x{width}")
        if self.square and height != width:
            raise ValueError(f"{self.name} takes square images only, got {height}x{width}")

    def __call__(
        self, x0: torch.Tensor, rng: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, single = _as_batch(x0)
        if batch.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: x0 must have 1 or 3 channels, got {batch.shape[1]}")
        with torch.no_grad():
            xT, mask = self._degrade(batch, rng)
        if single:
            xT = xT[0]
            mask = None if mask is None else mask[0]
        return xT, mask

    def _degrade(self, x0: torch.Tensor, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def hole_mask(self, height: int, width: int) -> Optional[torch.Tensor]:
        """The fixed mask ``[1, H, W]`` for inpainting degradations, None otherwise."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SuperResolution(Degradation):
    """Downsample by ``factor`` then bring back to size.

    ``mode``: "bicubic" (I2SB's: DDRM's bicubic matrix, nearest upsampling), "pool" (I2SB's:
    average pooling, nearest upsampling) or "bicubic-aa" (torch's antialiased bicubic down,
    bicubic up, clipped).
    """

    def __init__(self, factor: int = 4, mode: str = "bicubic"):
        if mode not in ("bicubic", "pool", "bicubic-aa"):
            raise ValueError(f"super-resolution mode must be 'bicubic', 'pool' or 'bicubic-aa', got {mode!r}")
        if factor < 2:
            raise ValueError(f"super-resolution factor must be >= 2, got {factor}")
        self.factor, self.mode = int(factor), mode
        self.size_multiple = self.factor
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
        elif self.mode == "bicubic":
            low = i2sb_corruptions.bicubic_downsample(batch, self.factor)
        else:
            low = F.interpolate(batch, size=low_size, mode="bicubic", antialias=True, align_corners=False)
        return low[0] if single else low

    @property
    def upsample_mode(self) -> str:
        """ "nearest" (I2SB's sr-bicubic and sr-pool) or "bicubic" (sr-bicubic-aa): how `upsample` interpolates."""
        return "nearest" if self.mode in ("pool", "bicubic") else "bicubic"

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """Bring a low-resolution image back to ``factor`` times its size."""
        batch, single = _as_batch(low)
        size = (batch.shape[-2] * self.factor, batch.shape[-1] * self.factor)
        if self.upsample_mode == "nearest":
            up = F.interpolate(batch, size=size, mode="nearest")
        else:
            up = F.interpolate(batch, size=size, mode="bicubic", align_corners=False)
            up = up.clamp(-1.0, 1.0)  # bicubic overshoots
        return up[0] if single else up

    def _degrade(self, x0, rng):
        return self.upsample(self.downsample(x0)), None


class JPEG(Degradation):
    """JPEG at ``quality`` (1..100): ``codec`` "ddrm" (I2SB's torch round trip, ``jpeg-<q>``) or
    "libjpeg" (Pillow's codec on 8-bit pixels, ``jpeg-<q>-libjpeg``)."""

    def __init__(self, quality: int, codec: str = "ddrm"):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        if codec not in ("ddrm", "libjpeg"):
            raise ValueError(f"JPEG codec must be 'ddrm' or 'libjpeg', got {codec!r}")
        self.quality, self.codec = int(quality), codec
        self.size_multiple = 16 if codec == "ddrm" else 1  # 8x8 blocks of the half-size chroma
        self.name = f"jpeg-{self.quality}" + ("-libjpeg" if codec == "libjpeg" else "")

    def _degrade(self, x0, rng):
        if self.codec == "ddrm":
            return i2sb_corruptions.jpeg(x0, self.quality), None
        out = torch.empty_like(x0)
        for b in range(x0.shape[0]):
            pixels = tensor_to_uint8(x0[b])
            image = Image.fromarray(
                pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, "L" if pixels.shape[2] == 1 else "RGB"
            )
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                array = np.asarray(decoded.convert(image.mode))
            out[b] = uint8_to_tensor(array).to(x0.device, x0.dtype)
        return out, None


class Blur(Degradation):
    """I2SB's ``blur-uni`` / ``blur-gauss`` (DDRM's deblurring operators, on [0, 1])."""

    def __init__(self, kind: str):
        i2sb_corruptions.blur_kernel(kind)  # raises for an unknown kind
        self.kind, self.square = kind, True
        self.name = f"blur-{kind}"

    def _degrade(self, x0, rng):
        return i2sb_corruptions.blur(x0, self.kind), None


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
        mask[:, top : top + side_h, left : left + side_w] = 1.0
        return mask

    def _degrade(self, x0, rng):
        mask = self.hole_mask(*x0.shape[-2:]).to(x0.device, x0.dtype)
        mask = mask.expand(x0.shape[0], 1, *x0.shape[-2:]).contiguous()
        return x0 * (1.0 - mask), mask


class FreeformInpainting(Degradation):
    """I2SB's ``inpaint-freeform1020`` / ``2030``: per image, a mask drawn from the file ``masks``.

    The masks are random, so there is no ``hole_mask``; items carry their own mask.
    """

    is_inpainting = True
    fixed_mask = False

    def __init__(self, ratio: str, masks: str | os.PathLike):
        self.ratio = ratio
        self.name = f"inpaint-freeform{ratio}"
        self.masks = i2sb_corruptions.FreeformMasks(masks, ratio)

    def frame(self) -> Tuple[int, int]:
        return self.masks.size

    def hole_mask(self, height: int, width: int):
        raise ValueError(
            f"{self.name} draws a random mask per image, so it has no fixed one: "
            "give the masks with the corrupted images (sample --mask) or use clean images"
        )

    def _degrade(self, x0, rng):
        if tuple(x0.shape[-2:]) != self.masks.size:
            raise ValueError(
                f"{self.name}: the masks in {self.masks.path} are {self.masks.size[0]}x"
                f"{self.masks.size[1]}, the images {x0.shape[-2]}x{x0.shape[-1]}"
            )
        mask = self.masks.draw(x0.shape[0], rng).to(x0.device, x0.dtype)
        return x0 * (1.0 - mask), mask


class Sketch(Degradation):
    """Canny edges of the luma image: +1 on edges, -1 elsewhere, on every channel."""

    name = "sketch"

    def __init__(self, sigma: float = 1.5):
        self.sigma = float(sigma)

    def _degrade(self, x0, rng):
        from skimage.feature import canny  # imported here: skimage is slow to import

        luma = ((to_channels(x0.to(torch.float32), 1) + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy()
        edges = np.stack([canny(luma[b, 0], sigma=self.sigma) for b in range(x0.shape[0])])
        sketch = torch.from_numpy(edges).to(x0.device, x0.dtype).mul(2.0).sub(1.0)
        return sketch.unsqueeze(1).expand_as(x0).contiguous(), None


_SR = re.compile(r"^sr(\d+)x-(bicubic-aa|bicubic|pool)$")
_JPEG = re.compile(r"^jpeg-(\d+)(-libjpeg)?$")
_FREEFORM = re.compile(r"^inpaint-freeform(1020|2030)$")


def canonical_name(name) -> str:
    """The degradation's canonical name, checked without building it (no mask file needed)."""
    if isinstance(name, Degradation):
        return name.name
    key = str(name).strip().lower()
    if _FREEFORM.match(key):
        return key
    return get_degradation(key).name


def get_degradation(name, masks: Optional[str | os.PathLike] = None) -> Degradation:
    """A degradation by name (see ``DEGRADATIONS``); a Degradation passes through.

    ``masks``: the mask file the free-form inpainting ones read (ignored by the others).
    """
    if isinstance(name, Degradation):
        return name
    key = str(name).strip().lower()
    if match := _SR.match(key):
        return SuperResolution(int(match.group(1)), match.group(2))
    if match := _JPEG.match(key):
        return JPEG(int(match.group(1)), "libjpeg" if match.group(2) else "ddrm")
    if key in ("blur-uni", "blur-gauss"):
        return Blur(key.split("-")[1])
    if key == "inpaint-center":
        return CenterInpainting()
    if match := _FREEFORM.match(key):
        if not masks:
            raise ValueError(
                f"{key} needs its mask file: pass --masks FILE (masks=FILE) with "
                + i2sb_corruptions.FREEFORM_SOURCE.format(ratio=match.group(1))
            )
        return FreeformInpainting(match.group(1), masks)
    if key == "sketch":
        return Sketch()
    raise ValueError(
        f"unknown degradation {name!r}; known: {', '.join(DEGRADATIONS)} "
        "(also sr<k>x-bicubic[-aa], sr<k>x-pool, jpeg-<quality>[-libjpeg])"
    )
