"""The end of a distillation run, for the person who started it.

- ``compare(teacher, student, ...)``: PSNR / SSIM / seconds per image of the teacher at each NFE and
  of the student on held-out batches (the end-of-distillation table, MATH.md 7).
- ``corrupted_row(batches)``: PSNR / SSIM of the corrupted input itself against the clean images,
  the row every restoration has to beat (``model`` "corrupted", NFE 0, as ``ibmd-fast eval`` writes it).
- ``format_comparison(rows, run_dir)``: the comparison table and one line on how to read it.
- ``photo_comparison(...)``: ``comparison.png``, one whole held-out photograph restored by the
  teacher and the student, in labeled columns corrupted | teacher NFE n | student NFE k | clean,
  with PSNR and milliseconds per image under each (``imageio.draw_columns`` draws it).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ibmd_fast.data.degradations import CenterInpainting
from ibmd_fast.data.skimage_photos import HELD_OUT_PHOTO, held_out_photo, load_skimage_photo
from ibmd_fast.imageio import draw_columns
from ibmd_fast.metrics import psnr, ssim
from ibmd_fast.release import atomic_write
from ibmd_fast.restore import sample_student, sample_teacher, valid_teacher_nfe
from ibmd_fast.evaluate import format_table
from ibmd_fast.timing import Stopwatch

__all__ = ["compare", "corrupted_row", "format_comparison", "reading_line", "photo_comparison"]

FIGURE_SHORT_SIDE = 48  # pixels: the photo's shorter side in comparison.png (see photo_comparison)


def corrupted_row(batches: Sequence[dict]) -> dict:
    """The corrupted input scored like a restoration: ``{"model": "corrupted", "nfe": 0, psnr, ssim, 0 s}``."""
    x0 = torch.cat([b["x0"] for b in batches]).float()
    xT = torch.cat([b["xT"] for b in batches]).float().clamp(-1, 1)
    return {
        "model": "corrupted",
        "nfe": 0,
        "psnr": float(psnr(xT, x0).mean()),
        "ssim": float(ssim(xT, x0).mean()),
        "sec_per_image": 0.0,
    }


def reading_line(run_dir: Optional[str] = None) -> str:
    """One line: what the numbers mean and where the files are."""
    where = f"; files in {run_dir}/: generator.safetensors, comparison.json, comparison.png" if run_dir else ""
    return (
        "PSNR (dB) and SSIM against the clean held-out images: higher is better, and a restoration "
        "should beat the 'corrupted' row (the input itself); s/image: lower is faster" + where
    )


def format_comparison(rows: Sequence[dict], run_dir: Optional[str] = None) -> str:
    """The table of ``rows`` (``evaluate.format_table``) and, under it, ``reading_line``."""
    return format_table(rows) + "\n" + reading_line(run_dir)


def _timed(fn, device):
    """(fn(), wall-clock seconds, the GPU work included)."""
    with Stopwatch(device) as watch:
        out = fn()
    return out, watch.seconds


@torch.no_grad()
def photo_comparison(
    path: str,
    teacher,
    student,
    student_nfe: int,
    teacher_nfe: int,
    degradation,
    channels: int,
    size_multiple: int,
    device,
    seed: int = 0,
    autocast=None,
    short_side: int = FIGURE_SHORT_SIDE,
    zoom: int = 3,
    hole: Optional[int] = None,
    window: Optional[int] = None,
    draws: int = 0,
) -> dict:
    """Write ``path``: the whole held-out photo (``HELD_OUT_PHOTO``), resized so its shorter side
    is about ``short_side`` pixels, corrupted by ``degradation``, restored by the teacher
    (``teacher_nfe`` calls) and the student, each column enlarged ``zoom`` times.

    ``hole``: for inpainting, the side in pixels of the centered square hole (None: the
    degradation's own, half the photo's side). The distiller passes the hole of the crops the
    teacher learned (half the training size): a hole of half the whole photo is larger than any
    the teacher has seen, and it fills that with speckle.

    ``window``: for inpainting, restore the hole from the ``window`` x ``window`` square around it
    (the training crop size) and paste that back into the photo. A network trained on 32x32 crops
    with a centred 16x16 hole, given the whole 72x48 photo, sees a hole fraction it never saw; its
    prediction at t = T (the one-step student, the teacher's first step) then fills the hole with
    speckle (the earlier 500-step teacher at NFE 1: 21.3 dB on the photo, 29.0 dB with the 32x32 window;
    input 24.7 dB).
    The known pixels outside the window are the photo's own either way.

    The default 48 pixels is near the data's own scale (``DEFAULT_SCALE`` makes the photo about 75
    pixels high) and keeps the teacher's 100 calls affordable on a CPU: the U-Net's attention
    grows with the square of the pixel count.

    ``draws``: also restore the photo ``draws`` more times, each with its own noise (one batch per
    model, after the picture's), and return every draw's whole-photo PSNR under ``"draws"``. A
    restoration of a hole is a sample of the posterior: the PSNR of one draw, the one the picture
    shows, scatters by about a dB from draw to draw (a sample's expected squared error is twice the
    posterior mean's), and these say where the picture's draw lies among them.

    Returns ``{"photo", "height", "width", "columns": [{"title", "psnr", "ms"}]}`` (and, with
    ``draws``, ``"draws": {"teacher": [...], "student": [...]}`` and ``"draw_seed"``, the seed of the
    draws' batch). Times are
    wall-clock milliseconds for this one image after one untimed pass of each model (so one-off
    setup is not counted; the teacher's pass is a single step).
    """
    # Sides the network takes and the degradation accepts (super-resolution: divisible by its factor,
    # DDRM's JPEG by 16); DDRM's blur takes squares, free-form masks their own size only.
    multiple = math.lcm(int(size_multiple), int(getattr(degradation, "size_multiple", 1)))
    height, width = load_skimage_photo(HELD_OUT_PHOTO).shape[:2]
    if hole is not None and isinstance(degradation, CenterInpainting):
        degradation = CenterInpainting(hole=hole)  # the hole size the teacher was trained on
    frame = degradation.frame() if hasattr(degradation, "frame") else None
    if frame is not None:
        x0 = held_out_photo(channels, max(frame[0] / height, frame[1] / width), 1)
        top, left = (x0.shape[-2] - frame[0]) // 2, (x0.shape[-1] - frame[1]) // 2
        x0 = x0[:, top : top + frame[0], left : left + frame[1]]
    else:
        x0 = held_out_photo(channels, short_side / min(height, width), multiple)
        if getattr(degradation, "square", False):
            side = min(x0.shape[-2:])
            top, left = (x0.shape[-2] - side) // 2, (x0.shape[-1] - side) // 2
            x0 = x0[:, top : top + side, left : left + side]
    x0 = x0[None].to(device)
    xT, mask = degradation(x0, rng=torch.Generator().manual_seed(seed))
    mask = None if mask is None else mask.to(device)
    crop = _window(x0.shape[-2], x0.shape[-1], window if mask is not None else None)

    def restored(out: torch.Tensor) -> torch.Tensor:  # the window's restoration, pasted into the photo
        if crop is None:
            return out
        whole = _repeat(xT, out.shape[0]).clone()
        whole[..., crop[0], crop[1]] = out.to(whole.dtype)
        return whole

    model_xT = xT if crop is None else xT[..., crop[0], crop[1]]
    model_mask = mask if crop is None or mask is None else mask[..., crop[0], crop[1]]

    def run_teacher(nfe, n=1, seed=seed):
        xs, ms = _repeat(model_xT, n), _repeat(model_mask, n)
        return restored(sample_teacher(teacher, xs, nfe, ms, seed=seed, autocast=autocast))

    def run_student(n=1, seed=seed):
        xs, ms = _repeat(model_xT, n), _repeat(model_mask, n)
        return restored(sample_student(student, xs, student_nfe, ms, seed=seed, autocast=autocast))

    run_teacher(1)
    teacher_out, teacher_s = _timed(lambda: run_teacher(teacher_nfe), device)
    run_student()
    student_out, student_s = _timed(run_student, device)

    entries = [
        ("corrupted", xT, None),
        (f"teacher NFE {teacher_nfe}", teacher_out, teacher_s),
        (f"student NFE {student_nfe}", student_out, student_s),
        ("clean", x0, None),
    ]
    columns, info = [], []
    for title, image, seconds in entries:
        image = image[0].float().clamp(-1, 1)
        if title == "clean":
            lines = ["reference"]
            value = None
        else:
            value = float(psnr(image[None], x0[0:1].float()).mean())
            lines = [f"PSNR {value:.2f} dB"]
        lines.append("-" if seconds is None else f"{seconds * 1e3:.0f} ms/image")
        columns.append((title, image.cpu(), lines))
        info.append({"title": title, "psnr": value, "ms": None if seconds is None else seconds * 1e3})
    picture = draw_columns(columns, zoom=zoom)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    hole_side = None if mask is None else int(mask[0, 0].amax(dim=1).sum())  # rows the hole spans
    out = {
        "photo": HELD_OUT_PHOTO,
        "height": int(x0.shape[-2]),
        "width": int(x0.shape[-1]),
        "hole": hole_side,
        "window": None if crop is None else int(window),
        "zoom": zoom,
        "columns": info,
    }
    if draws > 0:
        # Seeds after the picture's: the draws are new samples, not the picture's again.
        def scores(images: torch.Tensor) -> list[float]:
            clean = x0[0:1].float().expand(images.shape[0], *x0.shape[1:])
            return [float(v) for v in psnr(images.float().clamp(-1, 1), clean)]

        out["draw_seed"] = seed + 1  # one batch of `draws` per model, one noise stream each
        out["draws"] = {
            "teacher": scores(run_teacher(teacher_nfe, draws, seed + 1)),
            "student": scores(run_student(draws, seed + 1)),
        }
    return out


def _repeat(x: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """``x`` (a batch of one) repeated ``n`` times along the batch; None stays None."""
    if x is None or n == x.shape[0]:
        return x
    return x.expand(n, *x.shape[1:]).contiguous()


def _window(height: int, width: int, window: Optional[int]) -> Optional[tuple[slice, slice]]:
    """The centred ``window`` x ``window`` square of a height x width image (None: the whole image)."""
    if window is None or (window >= height and window >= width):
        return None
    if window > min(height, width):
        raise ValueError(f"a {window}x{window} window does not fit in a {width}x{height} photo")
    top, left = (height - window) // 2, (width - window) // 2
    return slice(top, top + window), slice(left, left + window)


# ----------------------------------------------------------------------------
# Teacher against student (the end-of-distillation table, MATH.md 7)


@torch.no_grad()
def compare(
    teacher,
    student,
    student_nfe: int,
    batches: list[dict],
    teacher_nfes: Sequence[int],
    device: torch.device,
    seed: int = 0,
    autocast=None,
    log=None,
) -> tuple[list[dict], dict]:
    """PSNR / SSIM / seconds per image of the teacher at each NFE and of the student.

    ``batches``: dicts with ``x0``, ``xT`` (and ``mask``; ``label``, which a class-conditional
    teacher and student take) from the held-out test split. Returns
    the table rows and the restored images ``{label: tensor}`` of the first batch (for a grid).
    Each model runs the first batch once untimed before the timed passes.
    """
    runs = [
        ("teacher", n, lambda xT, m, s, y, n=n: sample_teacher(teacher, xT, n, m, s, autocast, y=y))
        for n in valid_teacher_nfe(teacher.bridge, teacher_nfes)
    ]
    runs.append(
        (
            "student",
            student_nfe,
            lambda xT, m, s, y: sample_student(student, xT, student_nfe, m, s, autocast=autocast, y=y),
        )
    )
    class_conditional = getattr(teacher, "num_classes", None) is not None

    def labels(batch):
        return batch["label"].to(device) if class_conditional else None

    rows, pictures = [], {}
    for name, nfe, run in runs:
        # One untimed pass first: compilation, autotuning and allocator warm-up are not per-image costs.
        first = batches[0]
        run(
            first["xT"].to(device), None if first.get("mask") is None else first["mask"].to(device), seed, labels(first)
        )
        scores_p, scores_s, seconds, count = [], [], 0.0, 0
        for i, batch in enumerate(batches):
            x0 = batch["x0"].to(device)
            xT = batch["xT"].to(device)
            mask = batch.get("mask")
            mask = None if mask is None else mask.to(device)
            with Stopwatch(device) as watch:
                out = run(xT, mask, seed + i, labels(batch))
            seconds += watch.seconds
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
            log(
                f"  {name:8s} NFE {nfe:4d}: PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}  "
                f"{row['sec_per_image'] * 1e3:8.2f} ms/image"
            )
    return rows, pictures
