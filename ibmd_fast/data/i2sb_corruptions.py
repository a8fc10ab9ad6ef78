"""I2SB's corruption operators (NVlabs/I2SB ``corruption/``), as batched torch functions.

I2SB trains on corruptions that DDRM (Kawar et al. 2022, ``functions/svd_replacement.py``)
and DDRM-JPEG (``functions/jpeg_torch.py``) define; its released checkpoints learned those
inputs, so a student distilled from them must see the same ones. Images are ``[B, C, H, W]``
on [-1, 1]; nothing here is clipped, as I2SB does not clip. ``ibmd_fast.data.degradations``
wraps these functions as named degradations.

- ``bicubic_downsample(x, factor)``: DDRM's ``SRConv``. A 1-d kernel of ``4 factor`` taps,
  ``k[i] = cubic((i - 2 factor + 1/2) / factor)`` with Keys' cubic (a = -0.5), normalised to sum
  1; the strided matrix ``M[r, mirror(j)] += k[j - c_r + 2 factor]`` for the output row ``r`` with
  centre ``c_r = factor // 2 + factor r`` and ``j`` in ``[c_r - 2 factor, c_r + 2 factor)``, where
  ``mirror(j) = -j - 1`` below 0 and ``2n - 1 - j`` above ``n - 1`` (half-sample symmetric
  borders). Then ``low = M_H x M_W^T`` per channel. DDRM applies it through the SVD of ``M``
  with singular values under 0.03 set to 0; for this kernel the smallest is 0.35, so that is
  the plain product.
- ``blur(x, kind)``: DDRM's ``Deblurring`` as I2SB builds it (``uni``: 9 taps of 1/9; ``gauss``:
  ``exp(-x^2 / (2 10^2))`` at x = -2..2, normalised), on ``(x + 1) / 2``, back to [-1, 1].
  Its 1-d matrix is ``B[i, j] = k[j - i + t//2]`` for ``j`` in ``[i - t//2, i + t//2)`` inside
  the image (zeros outside: the last tap is never used, as in DDRM). With the SVD
  ``B = U diag(s) V^T``, ``s < 0.03`` set to 0, DDRM's ``H`` is, per channel c,
  ``y_c = U (S_c * (V^T x_c V)) U^T``: the products ``s_p s_q`` sorted in descending order
  (``order``) and ``S_c[order[d]] = sorted[(3 d + c) mod n^2]``. (A separable blur would have
  ``S_c[p, q] = s_p s_q``; DDRM's ``singulars()`` repeats the sorted list per channel where its
  ``Vt`` interleaves channels, and I2SB's checkpoints were trained on exactly that.) Equal
  products (``s_p s_q = s_q s_p``, the zeros) keep their index order: a stable sort. I2SB built
  the operator on the GPU, where torch sends more than 4096 values (256^2 here) to its stable
  segmented sort (ATen ``cuda/Sort.cpp``: ``should_use_small_sort`` / ``launch_stable_sort_kernel``;
  not run on a GPU here); torch's default CPU sort may order ties otherwise, which moves outputs
  by up to 0.04.
- ``jpeg(x, quality)``: DDRM-JPEG's round trip: ``p = 255 (x + 1) / 2`` (not rounded), YCbCr
  (JFIF matrix, +128 on chroma), chroma subsampled by taking every second pixel (4:2:0),
  8x8 blocks minus 128, orthonormal 2-d DCT-II, divided by the quality-scaled tables
  (``s = 5000 / q`` below 50 else ``200 - 2 q``; ``floor((s T + 50) / 100)`` clipped to
  [1, 255], T the JPEG Annex K tables), rounded half to even; then multiplied back, inverse
  DCT, +128, chroma repeated 2x2, the inverse colour matrix DDRM-JPEG uses, back to [-1, 1].
- ``FreeformMasks(path, ratio)``: Palette's free-form masks (the file
  ``imagenet_freeform_masks.npz``, keys ``"10-20% freeform"``, ... as packed bits of
  ``[N, 256, 256]``) or I2SB's cache of one range (``imagenet_freeform1020_masks.npz``, key
  ``"mask"``, ``[N, 256, 256]`` uint8); 1 is the hole. ``draw(batch, rng)`` picks one
  mask per image uniformly, as I2SB's ``np.random.randint(n_masks)`` does.

Gray images (C = 1) go through as RGB with three equal channels (how a gray photo loads in
I2SB's ImageNet reader) and come back as the mean of the three.
"""

from __future__ import annotations

import functools
import io
import os
import re
from typing import Optional

import numpy as np
import torch

__all__ = [
    "bicubic_kernel",
    "bicubic_matrix",
    "bicubic_downsample",
    "blur_kernel",
    "blur",
    "jpeg",
    "jpeg_tables",
    "FreeformMasks",
    "FREEFORM_SOURCE",
]

# DDRM treats singular values below this as zero (svd_replacement.py's ZERO)
SINGULAR_FLOOR = 3e-2


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _back(y: torch.Tensor, channels: int) -> torch.Tensor:
    return y.mean(dim=1, keepdim=True) if channels == 1 else y


# ----------------------------------------------------------------------------
# Super-resolution: DDRM's SRConv with the bicubic kernel


def bicubic_kernel(factor: int = 4, a: float = -0.5) -> torch.Tensor:
    """DDRM's ``4 factor`` taps of Keys' cubic at ``(i - 2 factor + 1/2) / factor``, sum 1 (float64)."""

    def cubic(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    taps = torch.tensor([cubic((i - 2 * factor + 0.5) / factor) for i in range(4 * factor)], dtype=torch.float64)
    return taps / taps.sum()


@functools.lru_cache(maxsize=16)
def bicubic_matrix(size: int, factor: int = 4) -> torch.Tensor:
    """The ``[size // factor, size]`` strided matrix of DDRM's SRConv (mirror borders), float64."""
    kernel = bicubic_kernel(factor)
    half = kernel.shape[0] // 2
    if size % factor or size < half:
        raise ValueError(f"sr{factor}x-bicubic needs a side divisible by {factor} and at least {half} px, got {size}")
    matrix = torch.zeros(size // factor, size, dtype=torch.float64)
    for row, centre in enumerate(range(factor // 2, size + factor // 2, factor)):
        for j in range(centre - half, centre + half):
            col = -j - 1 if j < 0 else (2 * size - 1 - j if j >= size else j)
            matrix[row, col] += kernel[j - centre + half]
    return matrix


def bicubic_downsample(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """``M_H x M_W^T`` per channel: ``[B, C, H, W]`` -> ``[B, C, H / factor, W / factor]``."""
    rows = bicubic_matrix(x.shape[-2], factor).to(x.device)
    cols = bicubic_matrix(x.shape[-1], factor).to(x.device)
    return (rows @ x.to(torch.float64) @ cols.T).to(x.dtype)


# ----------------------------------------------------------------------------
# Blur: DDRM's Deblurring as I2SB builds it


def blur_kernel(kind: str) -> torch.Tensor:
    """I2SB's kernels: ``uni`` 9 taps of 1/9; ``gauss`` exp(-x^2/200) at x = -2..2, normalised (float32)."""
    if kind == "uni":
        return torch.full((9,), 1.0 / 9.0)
    if kind == "gauss":
        # the exponent in float64, its exp in float32, as I2SB's pdf lambda computes it
        taps = torch.exp(torch.tensor([-0.5 * (v / 10.0) ** 2 for v in range(-2, 3)], dtype=torch.float32))
        return taps / taps.sum()
    raise ValueError(f"blur kind must be 'uni' or 'gauss', got {kind!r}")


@functools.lru_cache(maxsize=8)
def _blur_operator(kind: str, size: int):
    """``(U, V, S)`` with ``y_c = U (S_c * (V^T x_c V)) U^T``; ``S`` is ``[3, size, size]``.

    Built in float32 as DDRM builds it, so the order of the sorted products (which decides
    ``S``) is the one I2SB's training saw.
    """
    kernel = blur_kernel(kind)
    half = kernel.shape[0] // 2
    matrix = torch.zeros(size, size)
    for i in range(size):
        for j in range(max(i - half, 0), min(i + half, size)):
            matrix[i, j] = kernel[j - i + half]
    left, singular, right_t = torch.linalg.svd(matrix)
    singular = torch.where(singular < SINGULAR_FLOOR, torch.zeros_like(singular), singular)
    products = torch.outer(singular, singular).reshape(-1)
    ordered, order = torch.sort(products, descending=True, stable=True)
    n2 = size * size
    position = torch.arange(n2)
    scale = torch.empty(3, n2)
    for c in range(3):
        scale[c, order] = ordered[(3 * position + c) % n2]
    return left.double(), right_t.T.double(), scale.reshape(3, size, size).double()


def blur(x: torch.Tensor, kind: str) -> torch.Tensor:
    """I2SB's ``blur-uni`` / ``blur-gauss`` of ``x`` on [-1, 1] (applied to ``(x + 1) / 2``)."""
    height, width = x.shape[-2:]
    if height != width:
        raise ValueError(f"blur-{kind} is DDRM's operator on square images, got {height}x{width}")
    left, right, scale = (t.to(x.device) for t in _blur_operator(kind, height))
    unit = (_rgb(x).to(torch.float64) + 1.0) / 2.0
    blurred = left @ (scale * (right.T @ unit @ right)) @ left.T
    return _back(blurred * 2.0 - 1.0, x.shape[1]).to(x.dtype)


# ----------------------------------------------------------------------------
# JPEG: DDRM-JPEG's torch round trip

_LUMA_TABLE = (
    16,
    11,
    10,
    16,
    24,
    40,
    51,
    61,
    12,
    12,
    14,
    19,
    26,
    58,
    60,
    55,
    14,
    13,
    16,
    24,
    40,
    57,
    69,
    56,
    14,
    17,
    22,
    29,
    51,
    87,
    80,
    62,
    18,
    22,
    37,
    56,
    68,
    109,
    103,
    77,
    24,
    35,
    55,
    64,
    81,
    104,
    113,
    92,
    49,
    64,
    78,
    87,
    103,
    121,
    120,
    101,
    72,
    92,
    95,
    98,
    112,
    100,
    103,
    99,
)
_CHROMA_TABLE = (
    17,
    18,
    24,
    47,
    99,
    99,
    99,
    99,
    18,
    21,
    26,
    66,
    99,
    99,
    99,
    99,
    24,
    26,
    56,
    99,
    99,
    99,
    99,
    99,
    47,
    66,
    99,
    99,
    99,
    99,
    99,
    99,
) + (99,) * 32
_RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.1687, -0.3313, 0.5), (0.5, -0.4187, -0.0813))
# DDRM-JPEG's inverse (the numerical inverse of the rounded matrix above)
_YCC_TO_RGB = (
    (1.0, -3.68199903e-05, 1.40198758e00),
    (1.0, -3.44113281e-01, -7.14103821e-01),
    (1.0, 1.77197812e00, -1.34583413e-04),
)


def jpeg_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Luma and chroma quantisation tables ``[8, 8]`` (float32) at ``quality``, as DDRM-JPEG scales them."""
    scale = (5000 / quality) if quality < 50 else (200 - 2 * quality)
    tables = []
    for base in (_LUMA_TABLE, _CHROMA_TABLE):
        table = torch.floor((scale * torch.tensor(base) + 50) / 100).clamp(1, 255)
        tables.append(table.to(torch.float32).reshape(8, 8))
    return tables[0], tables[1]


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> torch.Tensor:
    """Orthonormal DCT-II of size 8: ``D[u, r] = c_u cos(pi (2 r + 1) u / 16)``, ``c_0 = sqrt(1/8)``, else 1/2."""
    u = torch.arange(8, dtype=torch.float64)[:, None]
    r = torch.arange(8, dtype=torch.float64)[None, :]
    matrix = torch.cos(torch.pi * (2 * r + 1) * u / 16) * 0.5
    matrix[0] = (1.0 / 8.0) ** 0.5
    return matrix.to(torch.float32)


def _quantise(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Encode and decode the 8x8 blocks of ``[B, C, h, w]`` (values 0..255) with ``table``."""
    b, c, h, w = plane.shape
    dct = _dct_matrix().to(plane.device)
    blocks = plane.reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4) - 128.0
    coeff = torch.round(dct @ blocks @ dct.T / table)
    blocks = dct.T @ (coeff * table) @ dct + 128.0
    return blocks.transpose(3, 4).reshape(b, c, h, w)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """DDRM-JPEG's ``jpeg_decode(jpeg_encode(x, quality), quality)`` on a batch in [-1, 1]."""
    height, width = x.shape[-2:]
    if height % 16 or width % 16:
        raise ValueError(f"jpeg-{quality} (DDRM's 4:2:0 blocks) needs sides divisible by 16, got {height}x{width}")
    luma_table, chroma_table = (t.to(x.device) for t in jpeg_tables(quality))
    pixels = (_rgb(x).to(torch.float32) + 1.0) / 2.0 * 255.0
    ycc = torch.einsum("bchw,kc->bkhw", pixels, torch.tensor(_RGB_TO_YCC, device=x.device))
    luma = _quantise(ycc[:, :1], luma_table)
    chroma = _quantise(ycc[:, 1:, ::2, ::2] + 128.0, chroma_table)
    chroma = chroma.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) - 128.0
    rgb = torch.einsum("bchw,kc->bkhw", torch.cat([luma, chroma], dim=1), torch.tensor(_YCC_TO_RGB, device=x.device))
    return _back(rgb / 255.0 * 2.0 - 1.0, x.shape[1]).to(x.dtype)


# ----------------------------------------------------------------------------
# Free-form inpainting masks

FREEFORM_SOURCE = (
    "Palette's imagenet_freeform_masks.npz, which I2SB downloads into data/ from "
    "https://drive.google.com/file/d/1-5YRGsekjiRKQWqo0BV5RVQu0bagc12w, or I2SB's own "
    "data/imagenet_freeform{ratio}_masks.npz"
)
_PALETTE_KEYS = {"1020": "10-20% freeform", "2030": "20-30% freeform", "3040": "30-40% freeform"}
_PALETTE_SIDE = 256  # Palette's packed file does not record its shape; I2SB's load_masks fixes 256x256


class FreeformMasks:
    """Free-form hole masks of one range (``ratio`` "1020" or "2030"), held as packed bits."""

    def __init__(self, path: str | os.PathLike, ratio: str):
        self.path, self.ratio = os.fspath(path), ratio
        name = f"inpaint-freeform{ratio}"
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"{name}: mask file {self.path} not found; it is {FREEFORM_SOURCE.format(ratio=ratio)}"
            )
        try:
            with open(self.path, "rb") as fh:
                data = dict(np.load(io.BytesIO(fh.read())))
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"{name}: {self.path} is not a readable .npz of masks ({exc})") from None
        palette_key = _PALETTE_KEYS[ratio]
        if palette_key in data:
            # Palette: the bits of [N, 256, 256] masks in one flat array; each mask is whole bytes
            side = _PALETTE_SIDE
            packed = np.asarray(data[palette_key], dtype=np.uint8).reshape(-1)
            count = packed.size * 8 // (side * side)
            self.packed = packed[: count * side * side // 8].reshape(count, side * side // 8)
            self.size = (side, side)
        elif "mask" in data:
            other = re.search(r"freeform(\d{4})", os.path.basename(self.path))
            if other and other.group(1) != ratio:
                raise ValueError(
                    f"{name}: {self.path} holds I2SB's freeform{other.group(1)} masks, not freeform{ratio}"
                )
            masks = np.asarray(data["mask"])
            masks = masks.reshape(-1, *masks.shape[-2:])  # I2SB's [N, H, W] (or [N, 1, H, W])
            self.size = (int(masks.shape[-2]), int(masks.shape[-1]))
            self.packed = np.packbits(masks.reshape(masks.shape[0], -1) != 0, axis=1)
        else:
            raise ValueError(
                f"{name}: {self.path} has neither Palette's {palette_key!r} nor I2SB's "
                f"'mask' (keys: {', '.join(data) or 'none'})"
            )
        if self.packed.shape[0] == 0:
            raise ValueError(f"{name}: {self.path} holds no masks")

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    def masks(self, index: torch.Tensor) -> torch.Tensor:
        """Float masks ``[len(index), 1, H, W]``, 1 in the hole."""
        bits = np.unpackbits(self.packed[index.cpu().numpy()], axis=1)[:, : self.size[0] * self.size[1]]
        return torch.from_numpy(bits.reshape(-1, 1, *self.size).astype(np.float32))

    def draw(self, batch: int, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """One mask per image, each drawn uniformly from the file: ``[batch, 1, H, W]``."""
        return self.masks(torch.randint(len(self), (batch,), generator=rng))
