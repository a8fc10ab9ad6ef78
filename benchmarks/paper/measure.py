"""Restoring the evaluation images for one table row and keeping what every interval needs.

A row's stage writes ``row.npz`` in its directory: the classifier features of each restored image
(float32 [n, feature_dim]), its PSNR and SSIM against the clean image, whether the classifier gets
its label right, and the first ``grid_images`` restored images (for the picture grid). Its
``stage.json`` result holds the time per image and the per-image PSNR/SSIM/correct lists.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

# The one import of the restoring functions: a refactor moves them to ibmd_fast.restore; re-point it here.
from ibmd_fast.evaluate import load_eval_data
from ibmd_fast.release import load_model
from ibmd_fast.restore import restore_with_generator, restore_with_teacher
from ibmd_fast.classifier import load_classifier
from ibmd_fast.metrics import compute_features, psnr, ssim
from ibmd_fast.timing import Stopwatch
from paper.config import CHANNELS, Preset, Task, TeacherRow
from paper.stages import Stages, task_dir


def load_task_images(data: str, task: Task, preset: Preset, seed: int) -> dict:
    """The first ``eval_images`` test items of the task: x0, xT, (mask), label."""
    return load_eval_data(data, task.degradation, preset.image_size, CHANNELS, preset.eval_images, seed)


def _subset(batch: dict, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    mask = batch.get("mask")
    if mask is not None and mask.shape[0] == batch["xT"].shape[0]:
        mask = mask[:n]
    return batch["xT"][:n], mask


def per_image(clf, restored: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Features, PSNR, SSIM and correctness of each restored image (float64 metrics, float32 features)."""
    feats = compute_features(clf, restored)  # float64 [n, F] on the CPU
    with torch.inference_mode():  # logits = head(features), as Classifier.forward computes them
        dev = clf.head.weight.device
        logits = torch.cat(
            [clf.head(feats[i : i + 1024].float().to(dev)).cpu() for i in range(0, feats.shape[0], 1024)]
        )
    correct = (logits.argmax(dim=1) == labels[: restored.shape[0]].long()).numpy()
    clean = x0[: restored.shape[0]]
    psnrs = torch.cat([psnr(restored[i : i + 256], clean[i : i + 256]) for i in range(0, restored.shape[0], 256)])
    ssims = torch.cat([ssim(restored[i : i + 256], clean[i : i + 256]) for i in range(0, restored.shape[0], 256)])
    return {
        "features": feats.float().numpy(),
        "psnr": psnrs.numpy(),
        "ssim": ssims.numpy(),
        "correct": correct.astype(np.uint8),
    }


def _finite_list(values: np.ndarray, digits: int) -> list:
    return [round(float(v), digits) if np.isfinite(v) else None for v in values]


def _row_result(kind: str, values: dict, seconds: float, **fields) -> dict:
    """What stage.json keeps of a row: the time, the means, and the per-image lists."""
    finite = values["psnr"][np.isfinite(values["psnr"])]
    return {
        "model": kind,
        **fields,
        "images": int(values["psnr"].shape[0]),
        "sec_per_image": seconds,
        "psnr": float(finite.mean()) if finite.size else None,
        "ssim": float(values["ssim"].mean()),
        "ca": 100.0 * float(values["correct"].mean()),
        "per_image": {
            "psnr": _finite_list(values["psnr"], 4),
            "ssim": _finite_list(values["ssim"], 5),
            "correct": [int(c) for c in values["correct"]],
        },
    }


def _save(path: str, values: dict, grid: torch.Tensor) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, grid=grid.numpy(), **values)
    os.replace(tmp, path)


def _timed(fn, xT: torch.Tensor, mask, device: str) -> tuple[torch.Tensor, float]:
    """(restored, seconds per image): a one-image warm-up first keeps one-time costs out."""
    fn(xT[:1], None if mask is None or mask.shape[0] == 1 else mask[:1], warm=True)
    with Stopwatch(device) as watch:
        restored = fn(xT, mask, warm=False)
    return restored, watch.seconds / xT.shape[0]


def teacher_row(
    stages: Stages,
    preset: Preset,
    name: str,
    batch: dict,
    teacher: str,
    tkey: dict,
    row: TeacherRow,
    clf_info: dict,
    device: str,
    seed: int,
) -> dict:
    """One teacher row: ``row.sampler`` (with ``row.eta``) at ``row.nfe`` on the first ``row.images``."""
    directory = os.path.join(task_dir(stages.work, name), "eval", row.name)
    out = os.path.join(directory, "row.npz")
    key = {
        "stage": "eval",
        "model": tkey,
        "row": row.__dict__,
        "seed": seed,
        "batch": preset.eval_batch,
        "classifier": clf_info,
    }

    def run(resume: str) -> dict:
        model = load_model(teacher, device, "teacher").model
        clf = load_classifier(clf_info["path"], device=device)
        xT, mask = _subset(batch, row.images)

        def restore(x, m, warm):
            return restore_with_teacher(
                model,
                x,
                1 if warm else row.nfe,
                row.sampler,
                mask=m,
                seed=seed,
                batch_size=preset.eval_batch,
                eta=row.eta,
            )

        try:
            restored, seconds = _timed(restore, xT, mask, device)
        except ValueError as exc:  # a sampler this bridge does not have (yet): said in the table, not cached
            print(f"  {row.name}: unavailable: {exc}", flush=True)
            return {
                "row": {
                    "model": "teacher",
                    "name": row.name,
                    "sampler": row.sampler,
                    "eta": row.eta,
                    "nfe": row.nfe,
                    "unavailable": str(exc),
                }
            }
        values = per_image(clf, restored, batch["x0"], batch["label"])
        _save(out, values, restored[: preset.grid_images])
        return {
            "row": _row_result(
                "teacher", values, seconds, name=row.name, sampler=row.sampler, eta=row.eta, nfe=row.nfe
            ),
            "npz": out,
        }

    return stages.run(f"{name}: evaluate {row.name} on {row.images} images", directory, key, [out], run)


def student_row(
    stages: Stages,
    preset: Preset,
    name: str,
    batch: dict,
    release: str,
    skey: dict,
    nfe: int,
    seed: int,
    clf_info: dict,
    device: str,
    eval_seed: int,
) -> dict:
    directory = os.path.join(task_dir(stages.work, name), "eval", f"student-nfe{nfe}-seed{seed}")
    out = os.path.join(directory, "row.npz")
    key = {
        "stage": "eval",
        "model": skey,
        "images": preset.eval_images,
        "seed": eval_seed,
        "batch": preset.eval_batch,
        "classifier": clf_info,
    }

    def run(resume: str) -> dict:
        model = load_model(release, device, "generator").model
        clf = load_classifier(clf_info["path"], device=device)
        xT, mask = _subset(batch, preset.eval_images)

        def restore(x, m, warm):
            return restore_with_generator(model, x, nfe, mask=m, seed=eval_seed, batch_size=preset.eval_batch)

        restored, seconds = _timed(restore, xT, mask, device)
        values = per_image(clf, restored, batch["x0"], batch["label"])
        _save(out, values, restored[: preset.grid_images])
        return {
            "row": _row_result("student", values, seconds, name=f"student-nfe{nfe}-seed{seed}", nfe=nfe, seed=seed),
            "npz": out,
        }

    return stages.run(f"{name}: evaluate {nfe}-NFE student, seed {seed}", directory, key, [out], run)


def corrupted_and_clean(clf_info: dict, batch: dict, device: str) -> tuple[dict, dict]:
    """(the corrupted input's row values, the clean images' features): cheap, recomputed every run."""
    clf = load_classifier(clf_info["path"], device=device)
    corrupted = per_image(clf, batch["xT"], batch["x0"], batch["label"])
    clean = per_image(clf, batch["x0"], batch["x0"], batch["label"])
    return corrupted, clean


def corrupted_row(values: dict) -> dict:
    return _row_result("corrupted", values, 0.0, name="corrupted", nfe=0)


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
