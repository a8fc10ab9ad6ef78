"""Inpainting's known pixels (MATH.md 3): re-imposing them, and filling the hole of ``xT`` with noise.

Below the samplers and ``restore`` so that both import them from here: the teacher samplers,
the student chain, the trainers and the ONNX graph share one definition. Masks are 1 inside
the hole.
"""

from __future__ import annotations

import torch

from ibmd_fast import ops

__all__ = ["impose_known", "noise_like", "fill_hole"]


def impose_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m x + (1 - m) known``: the hole (m = 1) from ``x``, the known pixels (m = 0) from ``known``.

    For a 0/1 mask both parts are exact: known pixels are ``known`` to the bit, the hole is ``x``.
    In ``x``'s dtype; differentiable in ``x`` and ``known``.
    """
    mask = mask.to(x.dtype)
    return mask * x + (1 - mask) * known.to(x.dtype)


def noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape from the fused op's Philox stream of ``seed`` (the same
    on CPU and CUDA): the hole fill, and the distiller's ``z``."""
    return ops.bridge_step(x, x, 0.0, 0.0, 1.0, seed=seed)  # coef 0 on both: eps alone


def fill_hole(xT: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``xT`` with its inpainting hole (``m = 1``) filled with Gaussian noise (MATH.md 3).

    The noise is ``noise_like(xT, seed)``. Training and sampling both start from this filled
    image, and conditional teachers see it as their condition.
    """
    mask = mask.to(device=xT.device, dtype=xT.dtype)
    return impose_known(noise_like(xT, seed), xT, mask)
