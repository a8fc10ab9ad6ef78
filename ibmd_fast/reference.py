"""Pure-PyTorch versions of the fused ops: the test oracle and the fallback.

Every function here computes exactly what the C++/CUDA kernels compute
(MATH.md sections 3 and 6), in the same precision policy: inputs of any
floating dtype, arithmetic in float32 (float64 for float64 inputs), outputs in
the input dtype (per-sample losses in the arithmetic dtype).

The in-kernel noise is Philox4x32-10 (Salmon et al., SC'11) keyed by the seed,
with the counter set to ``element_index // 4``; the four 32-bit words of one
call become four normals by two Box-Muller transforms. ``philox_normal`` below
reproduces it with int64 tensor arithmetic; ``philox4x32_10_numpy`` is an
independent numpy implementation used by the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Philox4x32 constants (Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

NO_NOISE_SEED = -1  # the ops' seed value meaning "eps = 0"


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of the kernels for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample(coef, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]`` coefficient as a ``[B]`` tensor in the kernels' arithmetic dtype."""
    dtype = opmath_dtype(like.dtype)
    if isinstance(coef, torch.Tensor):
        coef = coef.detach().to(device=like.device, dtype=dtype)
        if coef.dim() == 0:
            coef = coef.expand(batch)
        return coef.contiguous()
    return torch.full((batch,), float(coef), dtype=dtype, device=like.device)


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------
# Philox4x32-10 and Box-Muller


def philox4x32_10_numpy(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on ``counter`` (uint32, shape ``[N, 4]``) with a 2x32-bit key.

    Written from the Random123 paper with numpy uint64 arithmetic; returns uint32 ``[N, 4]``.
    """
    c = np.asarray(counter, dtype=np.uint64).copy()
    k0, k1 = np.uint64(key[0] & _MASK32), np.uint64(key[1] & _MASK32)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    mask = np.uint64(_MASK32)
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + np.uint64(PHILOX_W0)) & mask
            k1 = (k1 + np.uint64(PHILOX_W1)) & mask
        p0 = m0 * c[:, 0]
        p1 = m1 * c[:, 2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c = np.stack([hi1 ^ c[:, 1] ^ k0, lo1, hi0 ^ c[:, 3] ^ k1, lo0], axis=1)
    return c.astype(np.uint32)


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key (low word, high word) of a 63-bit seed."""
    return seed & _MASK32, (seed >> 32) & _MASK32


def philox_words(n_groups: int, seed: int, device=None) -> torch.Tensor:
    """Philox4x32-10 of counters ``(g, 0, 0, 0)`` for ``g < n_groups`` (64-bit g split over
    two words), as int64 ``[n_groups, 4]`` holding uint32 values. Torch arithmetic, any device."""
    g = torch.arange(n_groups, dtype=torch.int64, device=device)
    c0, c1 = g & _MASK32, (g >> 32) & _MASK32
    c2 = torch.zeros_like(g)
    c3 = torch.zeros_like(g)
    k0, k1 = seed_key(seed)
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        # int64 products wrap; their low 64 bits are the exact uint64 product.
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=1)


def box_muller(words: torch.Tensor) -> torch.Tensor:
    """Four uint32 words (int64 ``[N, 4]``) -> four standard normals (float64 ``[N, 4]``).

    ``u = ((w >> 9) + 0.5) * 2**-23`` lies in (0, 1) and is exact in float32;
    ``(w0, w1) -> r cos(2 pi u1), r sin(2 pi u1)`` with ``r = sqrt(-2 log u0)``, likewise
    ``(w2, w3)``. The kernels evaluate the same formulas in float32 (max abs difference
    below 1e-6, tested).
    """
    u = ((words >> 9).to(torch.float64) + 0.5) * 2.0**-23
    r01 = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[:, 2]))
    th01 = 2.0 * math.pi * u[:, 1]
    th23 = 2.0 * math.pi * u[:, 3]
    return torch.stack(
        [r01 * torch.cos(th01), r01 * torch.sin(th01), r23 * torch.cos(th23), r23 * torch.sin(th23)], dim=1
    )


def philox_normal(shape, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The in-kernel noise of ``bridge_step``: element with row-major index ``i`` is normal
    ``i % 4`` of Philox group ``i // 4`` under key ``seed``. Independent of memory layout."""
    numel = math.prod(shape)
    n_groups = (numel + 3) // 4
    normals = box_muller(philox_words(n_groups, seed, device=device)).reshape(-1)[:numel]
    return normals.to(dtype).reshape(shape)


# ----------------------------------------------------------------------------
# The ops


def bridge_step(a, b, coef_a, coef_b, std, noise=None, seed=None) -> torch.Tensor:
    """``coef_a * a + coef_b * b + std * eps`` with per-sample coefficients (MATH.md 2, 3).

    ``eps`` is ``noise`` if given, else Philox noise of ``seed`` (``seed == -1``: no noise).
    """
    batch = a.shape[0]
    ca, cb, s = (per_sample(c, batch, a) for c in (coef_a, coef_b, std))
    dtype = opmath_dtype(a.dtype)
    out = _expand(ca, a) * a.to(dtype) + _expand(cb, a) * b.to(dtype)
    if noise is not None:
        out = out + _expand(s, a) * noise.to(dtype)
    elif seed is not None and seed != NO_NOISE_SEED:
        eps = philox_normal(tuple(a.shape), seed, device=a.device, dtype=torch.float32).to(dtype)
        out = out + _expand(s, a) * eps
    return out.to(a.dtype)


def bridge_step_backward(grad, coef_a, coef_b):
    """Gradients of ``bridge_step`` w.r.t. ``a`` and ``b``."""
    batch = grad.shape[0]
    dtype = opmath_dtype(grad.dtype)
    ca, cb = per_sample(coef_a, batch, grad), per_sample(coef_b, batch, grad)
    g = grad.to(dtype)
    return (_expand(ca, grad) * g).to(grad.dtype), (_expand(cb, grad) * g).to(grad.dtype)


def _per_sample_mean(x: torch.Tensor, mask=None) -> torch.Tensor:
    """``sum_i m_i x_i / D`` per sample, D all elements of the sample (``m = 1`` without a mask)."""
    if mask is not None:
        x = x * mask.to(x.dtype)
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _mask_factor(mask, like: torch.Tensor, dtype: torch.dtype):
    """The mask broadcast to ``like`` in ``dtype`` (1 without a mask)."""
    return 1.0 if mask is None else mask.to(device=like.device, dtype=dtype).expand_as(like)


def bridge_loss(pred, target, weight, mask=None) -> torch.Tensor:
    """Per-sample ``w_b * sum_i m_bi (pred_bi - target_bi)^2 / D`` (MATH.md 6).

    ``mask`` (broadcastable to ``pred``; None: all ones) keeps only the elements it covers, but D
    stays all elements of the sample, as in I2SB and DDBM's inpainting losses.
    """
    dtype = opmath_dtype(pred.dtype)
    w = per_sample(weight, pred.shape[0], pred)
    diff = pred.to(dtype) - target.to(dtype)
    return w * _per_sample_mean(diff * diff * _mask_factor(mask, pred, dtype))


def bridge_loss_backward(grad, pred, target, weight, mask=None):
    """``dL/dpred = 2 w g m (pred - target) / D`` and ``dL/dtarget = -dL/dpred``."""
    dtype = opmath_dtype(pred.dtype)
    d = pred[0].numel()
    scale = per_sample(weight, pred.shape[0], pred) * grad.to(dtype) * (2.0 / d)
    g_pred = _expand(scale, pred) * (pred.to(dtype) - target.to(dtype)) * _mask_factor(mask, pred, dtype)
    return g_pred.to(pred.dtype), (-g_pred).to(target.dtype)


def ibmd_loss(teacher_pred, fake_pred, x0, weight, mask=None) -> torch.Tensor:
    """Per-sample ``w_b * sum_i m_bi [(t - x)^2 - (f - x)^2]_bi / D`` (MATH.md 5, 6)."""
    dtype = opmath_dtype(x0.dtype)
    w = per_sample(weight, x0.shape[0], x0)
    t, f, x = teacher_pred.to(dtype), fake_pred.to(dtype), x0.to(dtype)
    return w * _per_sample_mean(((t - x) ** 2 - (f - x) ** 2) * _mask_factor(mask, x0, dtype))


def ibmd_loss_backward(grad, teacher_pred, fake_pred, x0, weight, mask=None):
    """Gradients w.r.t. teacher prediction, fake prediction and generator output (MATH.md 6), each
    times the mask."""
    dtype = opmath_dtype(x0.dtype)
    d = x0[0].numel()
    scale = _expand(per_sample(weight, x0.shape[0], x0) * grad.to(dtype) * (2.0 / d), x0)
    scale = scale * _mask_factor(mask, x0, dtype)
    t, f, x = teacher_pred.to(dtype), fake_pred.to(dtype), x0.to(dtype)
    g_t = scale * (t - x)
    g_f = -scale * (f - x)
    g_x = scale * (f - t)
    return g_t.to(teacher_pred.dtype), g_f.to(fake_pred.dtype), g_x.to(x0.dtype)
