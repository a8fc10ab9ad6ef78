"""Sampling helpers shared by the trainers, and the end-of-distillation comparison.

``sample_teacher`` runs a teacher with its bridge's sampler (I2SB: ``i2sb_sample``;
VP: ``dbim_sample``), ``sample_student`` a generator through ``student_sample`` (MATH.md 3
and 5). ``compare`` measures PSNR, SSIM (``ibmd_fast.metrics``) and seconds per image for
the teacher at several NFEs and for the student (MATH.md 7).
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional, Sequence

import torch

from ibmd_fast.bridges import I2SBBridge
from ibmd_fast.metrics import psnr, ssim
from ibmd_fast.samplers import dbim_sample, fill_hole, i2sb_sample, make_generator, student_sample

__all__ = ["default_teacher_nfe", "valid_teacher_nfe", "sample_teacher", "sample_student", "compare"]


def default_teacher_nfe(bridge) -> int:
    """The teacher's default sampling NFE (recorded in its release): 100, or fewer for short I2SB schedules."""
    if isinstance(bridge, I2SBBridge):
        return min(100, bridge.n_steps - 1)
    return 100


def valid_teacher_nfe(bridge, nfes: Sequence[int]) -> list[int]:
    """The NFEs a teacher can run: clipped to ``n_steps - 1`` for I2SB, deduplicated, ascending."""
    top = bridge.n_steps - 1 if isinstance(bridge, I2SBBridge) else None
    out = sorted({max(1, min(int(n), top) if top else int(n)) for n in nfes})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _known(x0: torch.Tensor, xT: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x0 if mask is None else xT + mask * (x0 - xT)


@torch.no_grad()
def sample_teacher(teacher, xT: torch.Tensor, nfe: int, mask: Optional[torch.Tensor] = None, seed: int = 0,
                   autocast=None) -> torch.Tensor:
    """Restore ``xT`` with the teacher in ``nfe`` network calls (MATH.md 3).

    Inpainting: the hole of ``xT`` is filled with noise first and conditional teachers see that
    filled image, as in training; known pixels are re-imposed. ``autocast``: a callable
    returning a context manager (``Precision.autocast``) or None.
    """
    bridge = teacher.bridge
    gen = make_generator(seed)
    if mask is not None:
        mask = mask.to(device=xT.device, dtype=xT.dtype)
        xT = fill_hole(xT, mask, int(torch.randint(0, 2**62, (), generator=gen)))
    cond = xT if teacher.conditional else None
    ctx = autocast or contextlib.nullcontext

    def predict(x, t):
        with ctx():
            return teacher.predict_x0(x, t, cond).float()

    if isinstance(bridge, I2SBBridge):
        return i2sb_sample(predict, bridge, xT, nfe, mask=mask, generator=gen, noise_fill=False)
    return _known(dbim_sample(predict, bridge, xT, nfe, generator=gen), xT, mask)


@torch.no_grad()
def sample_student(generator, xT: torch.Tensor, nfe: int, mask: Optional[torch.Tensor] = None, seed: int = 0,
                   autocast=None) -> torch.Tensor:
    """Restore ``xT`` with the IBMD student in ``nfe`` calls (MATH.md 5; ``samplers.student_sample``)."""
    gen = make_generator(seed)
    if mask is not None:
        mask = mask.to(device=xT.device, dtype=xT.dtype)
        xT = fill_hole(xT, mask, int(torch.randint(0, 2**62, (), generator=gen)))
    ctx = autocast or contextlib.nullcontext

    def generate(x, z, t):
        with ctx():
            return generator(xT, z, t=t, x_t=x).float()

    return student_sample(generate, generator.bridge, xT, nfe, mask=mask, generator=gen, noise_fill=False)


@torch.no_grad()
def compare(teacher, student, student_nfe: int, batches: list[dict], teacher_nfes: Sequence[int],
            device: torch.device, seed: int = 0, autocast=None, log=None) -> tuple[list[dict], dict]:
    """PSNR / SSIM / seconds per image of the teacher at each NFE and of the student.

    ``batches``: dicts with ``x0``, ``xT`` (and ``mask``) from the held-out test split. Returns
    the table rows and the restored images ``{label: tensor}`` of the first batch (for a grid).
    Each model runs the first batch once untimed before the timed passes.
    """
    runs = [("teacher", n, lambda xT, m, s, n=n: sample_teacher(teacher, xT, n, m, s, autocast))
            for n in valid_teacher_nfe(teacher.bridge, teacher_nfes)]
    runs.append(("student", student_nfe, lambda xT, m, s: sample_student(student, xT, student_nfe, m, s, autocast)))
    rows, pictures = [], {}
    for name, nfe, run in runs:
        # One untimed pass first: compilation, autotuning and allocator warm-up are not per-image costs.
        first = batches[0]
        run(first["xT"].to(device), None if first.get("mask") is None else first["mask"].to(device), seed)
        scores_p, scores_s, seconds, count = [], [], 0.0, 0
        for i, batch in enumerate(batches):
            x0 = batch["x0"].to(device)
            xT = batch["xT"].to(device)
            mask = batch.get("mask")
            mask = None if mask is None else mask.to(device)
            _sync(device)
            t0 = time.perf_counter()
            out = run(xT, mask, seed + i)
            _sync(device)
            seconds += time.perf_counter() - t0
            out = out.float().clamp(-1, 1)
            scores_p.append(psnr(out, x0.float()).cpu())
            scores_s.append(ssim(out, x0.float()).cpu())
            count += x0.shape[0]
            if i == 0:
                pictures[f"{name}-{nfe}"] = out.cpu()
        row = {
            "model": name,
            "nfe": int(nfe),
            "psnr": float(torch.cat(scores_p).mean()),
            "ssim": float(torch.cat(scores_s).mean()),
            "sec_per_image": seconds / max(count, 1),
        }
        rows.append(row)
        if log is not None:
            log(f"  {name:8s} NFE {nfe:4d}: PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}  "
                f"{row['sec_per_image'] * 1e3:8.2f} ms/image")
    return rows, pictures
