"""Restoring images with released models, and measuring them as in the paper (MATH.md 7).

The logic behind ``ibmd-fast sample``, ``eval`` and ``train-classifier``, as functions that
benchmarks and paper scripts reuse:

- ``load_model(path)``: a teacher or generator release, with what the callers need to know
  about it (``LoadedModel``).
- ``restore_with_teacher`` / ``restore_with_generator``: corrupted images ``xT`` -> restored
  images, in batches, with one seeded noise source.
- ``evaluate(...)``: teacher at several NFE and student against clean images: PSNR, SSIM, FID on
  classifier features, CA (when labels exist), seconds per image; writes ``eval.json`` and
  ``eval-grid.png``.
- ``restore_files(...)``: restore image files (or default held-out crops) into PNG files.
- ``fit_classifier(...)``: the feature classifier of FID/CA, trained on a data set's clean
  training split.

Images are float32 ``[B, C, H, W]`` in [-1, 1]. Errors the user can fix are raised as
ValueError / FileNotFoundError / ReleaseError with one-line messages.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ibmd_fast import ops
from ibmd_fast.release import GENERATOR_FORMAT, TEACHER_FORMAT, ReleaseError, atomic_write, read_release

__all__ = [
    "DEFAULT_TEACHER",
    "DEFAULT_GENERATOR",
    "SAMPLERS",
    "LoadedModel",
    "resolve_device",
    "load_model",
    "natural_sampler",
    "size_multiple",
    "check_image_size",
    "restore_with_teacher",
    "restore_with_generator",
    "load_eval_data",
    "classifier_training_data",
    "fit_classifier",
    "get_classifier",
    "evaluate",
    "format_table",
    "save_grid",
    "restore_files",
    "save_image",
]

DEFAULT_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "teacher-inpaint.safetensors")
DEFAULT_GENERATOR = os.path.join("runs", "distill", "generator.safetensors")
SAMPLERS = ("i2sb", "dbim", "heun")

Log = Optional[Callable[[str], None]]


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------
# Models


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; anything else as torch reads it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} ({_one_line(exc)}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return dev


@dataclasses.dataclass
class LoadedModel:
    """A release loaded for inference: ``model`` is a ``Teacher`` or a ``Generator`` in eval mode."""

    path: str
    kind: str  # "teacher" | "generator"
    model: torch.nn.Module
    config: dict

    @property
    def image_channels(self) -> int:
        return int(self.model.image_channels)

    @property
    def image_size(self) -> Optional[int]:
        size = self.config.get("image_size")
        return None if size is None else int(size)

    @property
    def degradation(self) -> Optional[str]:
        return self.config.get("degradation")

    @property
    def nfe(self) -> int:
        return int(self.config.get("nfe") or 1)

    @property
    def bridge_type(self) -> str:
        return self.model.bridge_type

    @property
    def size_multiple(self) -> int:
        return size_multiple(self.config)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               expect: Optional[str] = None) -> LoadedModel:
    """Load a teacher or generator release; ``expect`` ("teacher" / "generator") refuses the other kind.

    Raises ReleaseError (missing file, not a safetensors file, not a release, wrong kind, weights
    that do not fit their config).
    """
    from ibmd_fast.release import load_generator, load_teacher

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ReleaseError(f"{path} is a folder, not a release file")
    want = {None: None, "teacher": TEACHER_FORMAT, "generator": GENERATOR_FORMAT}[expect]
    fmt = _release_format(path)
    if fmt not in (TEACHER_FORMAT, GENERATOR_FORMAT) or (want is not None and fmt != want):
        read_release(path, expect=want)  # raises the precise error (missing, unreadable, wrong kind)
        raise ReleaseError(f"{path} is not a usable release")
    try:
        if fmt == TEACHER_FORMAT:
            model, config = load_teacher(path, device=device)
        else:
            model, config = load_generator(path, device=device)
    except (KeyError, TypeError) as exc:
        raise ReleaseError(f"{path}: damaged release config ({_one_line(exc)})") from None
    model.requires_grad_(False)
    return LoadedModel(path=path, kind="teacher" if fmt == TEACHER_FORMAT else "generator", model=model,
                       config=config)


def _release_format(path: str) -> Optional[str]:
    """The ``format`` metadata of a safetensors file (header only), or None when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return (fh.metadata() or {}).get("format")
    except Exception:  # missing, not safetensors, ...: read_release words the error
        return None


def natural_sampler(bridge_type: str) -> str:
    """The default teacher sampler: I2SB's posterior sampler for I2SB, DBIM for the VP (DDBM) bridge
    (as ``ibmd_fast.train`` samples teachers, so eval and distill's comparison agree)."""
    return "i2sb" if bridge_type == "i2sb" else "dbim"


def size_multiple(config: dict) -> int:
    """Heights and widths the release's U-Net takes are multiples of this (2 per downsampling)."""
    unet = config.get("unet") or {}
    levels = len(unet.get("channel_mult") or (1,))
    return 2 ** max(0, levels - 1)


def check_image_size(model: LoadedModel, height: int, width: int, what: str = "image") -> None:
    """ValueError when the network cannot take an ``height x width`` image, saying which sizes it can."""
    m = model.size_multiple
    if height % m or width % m or height < m or width < m:
        near = f"{max(1, round(width / m)) * m}x{max(1, round(height / m)) * m}"
        trained = f"; it was trained at {model.image_size}x{model.image_size}" if model.image_size else ""
        raise ValueError(f"{what} is {width}x{height} (width x height), but the network of {model.path} takes "
                         f"widths and heights that are multiples of {m}, e.g. {near}{trained}")


# ----------------------------------------------------------------------------
# Restoration


def _mask_batch(mask: Optional[torch.Tensor], start: int, stop: int, total: int) -> Optional[torch.Tensor]:
    """The rows of ``mask`` for images ``start:stop``; a mask without a batch (or of batch 1) is shared."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    if mask.shape[0] == total and total > 1:
        return mask[start:stop]
    return mask.expand(stop - start, *mask.shape[1:])


def _batch_inputs(xT, mask, start: int, stop: int, device, gen: torch.Generator):
    """Images ``start:stop`` on ``device`` and their mask; for inpainting the hole is filled with noise."""
    from ibmd_fast.samplers import fill_hole

    x = xT[start:stop].to(device, torch.float32)
    m = _mask_batch(mask, start, stop, xT.shape[0])
    if m is not None:
        m = m.to(device, torch.float32)
        x = fill_hole(x, m, ops.draw_seed(gen))
    return x, m


def _batches(total: int, batch_size: int, progress: bool, desc: str):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = range(0, total, batch_size)
    return tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def restore_with_teacher(
    teacher,
    xT: torch.Tensor,
    nfe: int,
    sampler: Optional[str] = None,
    mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    eta: float = 1.0,
) -> torch.Tensor:
    """Restore ``xT`` [N, C, H, W] with a teacher (``Teacher``) in ``nfe`` network calls per image.

    ``sampler``: "i2sb" (I2SB bridge only), "dbim" (both bridges; ``eta``) or "heun" (VP bridge
    only); None picks ``natural_sampler``. ``mask`` (1 in the hole; [N or 1, 1, H, W]) for
    inpainting: the hole of ``xT`` is filled with noise before sampling (the filled image is also
    what a conditional teacher sees), the i2sb sampler re-imposes the known pixels at every step,
    and every sampler returns them unchanged. Returns float32 images in [-1, 1] on the CPU.
    """
    from ibmd_fast.samplers import dbim_sample, heun_sample, i2sb_sample, make_generator

    sampler = sampler or natural_sampler(teacher.bridge_type)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if sampler == "i2sb" and teacher.bridge_type != "i2sb":
        raise ValueError("the i2sb sampler needs an I2SB teacher; this one has a VP (DDBM) bridge: use dbim or heun")
    if sampler == "heun" and teacher.bridge_type != "vp":
        raise ValueError("the heun sampler needs a VP (DDBM) teacher; this one has an I2SB bridge: use i2sb or dbim")
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    device = _model_device(teacher)
    gen = make_generator(seed)
    out = []
    for start in _batches(xT.shape[0], batch_size, progress, f"teacher {sampler} nfe={nfe}"):
        stop = min(start + batch_size, xT.shape[0])
        x, m = _batch_inputs(xT, mask, start, stop, device, gen)
        cond = x if teacher.conditional else None

        def predict_x0(x_t, t, cond=cond):
            return teacher.predict_x0(x_t, t, cond)

        if sampler == "i2sb":
            x0 = i2sb_sample(predict_x0, teacher.bridge, x, nfe, mask=m, generator=gen, noise_fill=False)
        elif sampler == "dbim":
            x0 = dbim_sample(predict_x0, teacher.bridge, x, nfe, eta=eta, generator=gen)
        else:
            x0 = heun_sample(predict_x0, teacher.bridge, x, nfe, generator=gen)
        if m is not None:
            x0 = x + m * (x0 - x)  # known pixels unchanged
        out.append(x0.float().clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


@torch.no_grad()
def restore_with_generator(
    generator,
    xT: torch.Tensor,
    nfe: int = 1,
    mask: Optional[torch.Tensor] = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Restore ``xT`` [N, C, H, W] with an IBMD student (``Generator``) in ``nfe`` calls per image
    (the NFE it was distilled for; MATH.md 5). ``mask`` as in ``restore_with_teacher``: the hole is
    filled with noise first and the known pixels are copied from ``xT``. Returns float32 images in
    [-1, 1] on the CPU."""
    from ibmd_fast.samplers import make_generator, student_sample

    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    if nfe > 1 and not getattr(generator, "multistep", False):
        raise ValueError(f"this generator is a one-step student; it cannot sample with nfe={nfe}")
    device = _model_device(generator)
    gen = make_generator(seed)
    z_channels = int(getattr(generator, "z_channels", xT.shape[1]))
    out = []
    for start in _batches(xT.shape[0], batch_size, progress, f"student nfe={nfe}"):
        stop = min(start + batch_size, xT.shape[0])
        x, m = _batch_inputs(xT, mask, start, stop, device, gen)
        z = None
        if z_channels not in (0, x.shape[1]):
            z = torch.randn((x.shape[0], z_channels, *x.shape[2:]), generator=gen).to(device)

        def generator_fn(x_t, z_, t, cond=x):
            return generator(cond, z_, t=t, x_t=x_t)

        x0 = student_sample(generator_fn, generator.bridge, x, nfe=nfe, z=z, mask=m, generator=gen,
                            noise_fill=False)
        out.append(x0.float().clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def _restore(loaded: LoadedModel, xT, nfe=None, sampler=None, mask=None, seed=0, batch_size=16, progress=False):
    """Dispatch on the release kind. Generators refuse an NFE other than their own, and samplers."""
    if loaded.kind == "teacher":
        return restore_with_teacher(loaded.model, xT, nfe or loaded.nfe, sampler, mask, seed, batch_size, progress)
    if sampler is not None:
        raise ValueError(f"{loaded.path} is a distilled generator; --sampler applies to teachers only")
    if nfe is not None and nfe != loaded.nfe:
        raise ValueError(f"{loaded.path} is a generator distilled for {loaded.nfe} step(s); it samples with "
                         f"nfe={loaded.nfe} only (--nfe applies to teachers)")
    return restore_with_generator(loaded.model, xT, loaded.nfe, mask, seed, batch_size, progress)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_restore(loaded: LoadedModel, xT, nfe, sampler, mask, seed, batch_size, progress, warmup=True):
    """(restored, seconds per image). A one-image warm-up call first keeps one-time costs out."""
    device = _model_device(loaded.model)
    if warmup:
        _restore(loaded, xT[:1], 1 if loaded.kind == "teacher" else None, sampler,
                 None if mask is None else _mask_batch(mask, 0, 1, xT.shape[0]), seed, 1, False)
    _sync(device)
    begin = time.perf_counter()
    restored = _restore(loaded, xT, nfe, sampler, mask, seed, batch_size, progress)
    _sync(device)
    return restored, (time.perf_counter() - begin) / xT.shape[0]


# ----------------------------------------------------------------------------
# Data


def _describe(data) -> str:
    return data if isinstance(data, str) else type(data).__name__


def load_eval_data(data, degradation=None, image_size=None, channels: int = 3, num_images: int = 64,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The first ``num_images`` test items as tensors ``{"x0", "xT"[, "mask"][, "label"]}``.

    ``data`` is a spec (``ibmd_fast.data.SPEC_HELP``; the test split is read, and ``degradation``
    makes ``xT`` unless the spec is paired) or a Dataset of such dicts.
    """
    from ibmd_fast.data import collate, make_dataset

    if isinstance(data, str):
        dataset = make_dataset(data, degradation=degradation, size=image_size, channels=channels,
                               split="test", seed=seed)
    else:
        dataset = data
    n = len(dataset) if num_images is None or num_images <= 0 else min(int(num_images), len(dataset))
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 test images; {_describe(data)} has {len(dataset)}")
    items = [dataset[i] for i in range(n)]
    if not isinstance(items[0], dict) or "x0" not in items[0] or "xT" not in items[0]:
        raise ValueError(f"evaluation data {_describe(data)} must yield clean and corrupted images (x0, xT)")
    shapes = {tuple(item["x0"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(f"evaluation images of {_describe(data)} have different sizes {sorted(shapes)[:3]}; "
                         "pass an image size")
    batch = collate(items)
    batch = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in batch.items()}
    if batch["x0"].shape != batch["xT"].shape:
        raise ValueError(f"clean and corrupted images differ in shape: {tuple(batch['x0'].shape)} vs "
                         f"{tuple(batch['xT'].shape)}")
    return batch


def _clean_and_label(item) -> tuple[torch.Tensor, Optional[int]]:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        return item[0], int(item[1])
    if isinstance(item, dict):
        if "x0" not in item:
            raise ValueError("the classifier needs clean images, and this data set holds corrupted images only")
        return item["x0"], (int(item["label"]) if "label" in item else None)
    raise ValueError(f"unsupported data item {type(item).__name__} for classifier training")


def classifier_training_data(data, image_size=None, channels: int = 3, max_items: int = 8192, seed: int = 0,
                             progress: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Clean images of the TRAINING split (and their labels when every item has one).

    ``data``: a spec or a Dataset (items: image, (image, label) or dicts with "x0"[, "label"]).
    """
    from ibmd_fast.data import make_source

    if isinstance(data, str):
        source = make_source(data, size=image_size, channels=channels, split="train", seed=seed)
    else:
        source = data
    n = len(source) if max_items is None or max_items <= 0 else min(int(max_items), len(source))
    if n < 2:
        raise ValueError(f"classifier training needs at least 2 images; {_describe(data)} has {len(source)}")
    images, labels = [], []
    for i in tqdm(range(n), desc="reading training images", disable=not progress, leave=False):
        x, y = _clean_and_label(source[i])
        images.append(x)
        labels.append(y)
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"classifier training images have different sizes {sorted(shapes)[:3]}; pass an image size")
    label_tensor = None if any(y is None for y in labels) else torch.tensor(labels, dtype=torch.long)
    return torch.stack(images), label_tensor


def fit_classifier(data, image_size=None, channels: int = 3, task: Optional[str] = None, epochs: int = 5,
                   batch_size: int = 128, max_items: int = 8192, seed: int = 0, device="auto",
                   progress: bool = False, log: Log = None):
    """Train the FID/CA feature classifier on the clean training split of ``data``.

    ``task``: "labels" (needs labels), "rotation" (self-supervised), or None: labels when the
    data has them, else rotation.
    """
    from ibmd_fast.metrics import train_classifier

    images, labels = classifier_training_data(data, image_size, channels, max_items, seed, progress)
    if task is None:
        task = "labels" if labels is not None else "rotation"
    if task == "labels" and labels is None:
        raise ValueError(f"{_describe(data)} has no labels; train the classifier with task 'rotation'")
    if task == "rotation" and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"the rotation task needs square images, got {images.shape[-2]}x{images.shape[-1]}")
    _say(log, f"training the feature classifier ({task}) on {images.shape[0]} clean training images "
              f"of {_describe(data)}, {epochs} epoch(s)")
    data_arg = (images, labels) if task == "labels" else images
    return train_classifier(data_arg, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                            task=task, device=resolve_device(device))


def save_classifier_atomic(model, path: str) -> None:
    from ibmd_fast.metrics import save_classifier

    atomic_write(path, lambda tmp: save_classifier(model, tmp))


def _check_classifier(model, path: str, image_size: int, channels: int) -> None:
    config = getattr(model, "config", {})
    if config.get("in_channels") != channels or config.get("image_size") != image_size:
        raise ValueError(f"classifier {path} was trained on {config.get('in_channels')}-channel "
                         f"{config.get('image_size')}px images; these are {channels}-channel {image_size}px")


def _classifier_path(classifier, run_dir: Optional[str], data) -> Optional[str]:
    """Where the classifier of an evaluation lives: the given file, the cache, or nowhere."""
    if isinstance(classifier, (str, os.PathLike)):
        return os.fspath(classifier)
    if classifier is None and run_dir is not None and isinstance(data, str):
        return os.path.join(run_dir, "classifier.safetensors")
    return None


def get_classifier(classifier, run_dir: Optional[str], data, image_size: int, channels: int,
                   task: Optional[str] = None, epochs: int = 5, max_items: int = 8192, batch_size: int = 128,
                   seed: int = 0, device="auto", progress: bool = False, log: Log = None):
    """The classifier for FID/CA: ``classifier`` (a path or a Classifier) or, when None, the one
    cached in ``run_dir/classifier.safetensors`` if it was trained for the same data, else a new
    one trained on ``data``'s clean training split and cached there."""
    from ibmd_fast.metrics import Classifier, load_classifier

    dev = resolve_device(device)
    if isinstance(classifier, Classifier):
        _check_classifier(classifier, "given", image_size, channels)
        return classifier.to(dev).eval()
    if classifier is not None:
        path = os.fspath(classifier)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classifier file not found: {path}")
        model = load_classifier(path, device=dev)
        _check_classifier(model, path, image_size, channels)
        return model

    key = {"data": _describe(data), "image_size": image_size, "channels": channels, "task": task,
           "epochs": epochs, "max_items": max_items, "seed": seed}
    cache = sidecar = None
    if run_dir is not None and isinstance(data, str):
        cache = os.path.join(run_dir, "classifier.safetensors")
        sidecar = os.path.join(run_dir, "classifier.json")
        if os.path.isfile(cache) and os.path.isfile(sidecar):
            try:
                with open(sidecar, encoding="utf-8") as fh:
                    cached_key = json.load(fh)
                if cached_key == key:
                    model = load_classifier(cache, device=dev)
                    _check_classifier(model, cache, image_size, channels)
                    _say(log, f"using the cached classifier {cache}")
                    return model
            except (ValueError, OSError):
                pass  # stale or damaged cache: train a new one
    model = fit_classifier(data, image_size, channels, task, epochs, batch_size, max_items, seed, dev, progress, log)
    if cache is not None:
        save_classifier_atomic(model, cache)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(key, indent=2) + "\n"))
    return model


# ----------------------------------------------------------------------------
# Output: tables and grids


_COLUMNS = (("model", "model", "{}"), ("nfe", "NFE", "{}"), ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
            ("fid", "FID", "{:.3f}"), ("ca", "CA %", "{:.2f}"), ("sec_per_image", "s/image", "{:.4f}"))


def format_table(rows: Sequence[dict]) -> str:
    """Rows of metrics as an aligned text table; columns are those present in any row."""
    columns = [c for c in _COLUMNS if any(c[0] in row for row in rows)]
    extra = [k for row in rows for k in row if k not in {c[0] for c in _COLUMNS}]
    columns += [(k, k, "{}") for k in dict.fromkeys(extra)]

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    table = [[title for _, title, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) if i else text.ljust(w) for i, (text, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> uint8 [H, W, 3] (grayscale replicated)."""
    from ibmd_fast.data.images import tensor_to_uint8

    pixels = tensor_to_uint8(x.clamp(-1.0, 1.0))
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def _save_png(pixels: np.ndarray, path: str) -> None:
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, "L" if pixels.shape[2] == 1 else "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_image(x: torch.Tensor, path: str) -> None:
    """Write one image [C, H, W] in [-1, 1] as a PNG, atomically (gray stays gray)."""
    from ibmd_fast.data.images import tensor_to_uint8

    _save_png(tensor_to_uint8(x.clamp(-1.0, 1.0)), path)


def save_grid(columns: Sequence[torch.Tensor], path: str, pad: int = 2) -> None:
    """A PNG grid, one column per tensor [N, C, H, W] (same N and size), one row per image."""
    n, _, h, w = columns[0].shape
    grid = np.full((n * h + (n + 1) * pad, len(columns) * w + (len(columns) + 1) * pad, 3), 255, np.uint8)
    for j, images in enumerate(columns):
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = _to_uint8(images[i])
    _save_png(grid, path)


def _write_json(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------
# Evaluation


def _release_check(teacher: Optional[LoadedModel], student: Optional[LoadedModel]) -> None:
    if teacher is None or student is None:
        return
    if teacher.image_channels != student.image_channels:
        raise ValueError(f"teacher {teacher.path} makes {teacher.image_channels}-channel images, student "
                         f"{student.path} {student.image_channels}-channel ones")
    if teacher.degradation and student.degradation and teacher.degradation != student.degradation:
        raise ValueError(f"teacher {teacher.path} restores {teacher.degradation}, student {student.path} "
                         f"{student.degradation}: they cannot be compared on one data set")


def evaluate(
    teacher: Optional[str] = DEFAULT_TEACHER,
    student: Optional[str] = DEFAULT_GENERATOR,
    data=None,
    degradation: Optional[str] = None,
    image_size: Optional[int] = None,
    teacher_nfe: Sequence[int] = (1, 10, 100),
    sampler: Optional[str] = None,
    classifier=None,
    classifier_task: Optional[str] = None,
    classifier_epochs: int = 5,
    classifier_items: int = 8192,
    num_images: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    device="auto",
    run_dir: Optional[str] = "runs/eval",
    grid_rows: int = 8,
    progress: bool = False,
    log: Log = None,
) -> dict[str, Any]:
    """Teacher (at each of ``teacher_nfe``) and student against clean test images (MATH.md 7).

    teacher, student -- release paths; None leaves that model out (one is needed).
    data             -- a spec (default: the release's data set, else 'skimage') or a Dataset of
                        {"x0", "xT"[, "mask"][, "label"]} items; the test split is used.
    degradation      -- default: the release's; used to make xT from clean images.
    image_size       -- default: the release's training size.
    classifier       -- a path or Classifier; None trains one on the clean training split of
                        ``data`` (labels if it has them, else rotation; needs a spec) and caches
                        it as ``run_dir/classifier.safetensors``. CA is reported only with labels.
    Rows: "corrupted" (xT itself, for reference), "teacher" per NFE, "student". Writes
    ``run_dir/eval.json`` and ``run_dir/eval-grid.png`` (corrupted | teacher at its largest NFE |
    student | clean) when ``run_dir`` is given. Returns the eval.json payload.
    """
    dev = resolve_device(device)
    t_model = None if teacher is None else load_model(teacher, dev, expect="teacher")
    s_model = None if student is None else load_model(student, dev, expect="generator")
    if t_model is None and s_model is None:
        raise ValueError("nothing to evaluate: give a teacher, a student or both")
    _release_check(t_model, s_model)
    ref = t_model or s_model
    channels = ref.image_channels
    if degradation is None:
        degradation = ref.degradation
    elif ref.degradation and degradation != ref.degradation:
        _say(log, f"warning: {ref.path} was trained for {ref.degradation}, evaluating on {degradation}")
    image_size = image_size or ref.image_size
    if data is None:
        data = ref.config.get("data") or "skimage"
    if isinstance(data, str) and not data.lower().startswith("paired:") and degradation is None:
        raise ValueError(f"{ref.path} names no degradation; pass one to corrupt {data}")
    teacher_nfe = sorted({int(n) for n in teacher_nfe}) if t_model is not None else []
    if t_model is not None and not teacher_nfe:
        raise ValueError("give at least one teacher NFE")
    if t_model is not None and t_model.bridge_type == "i2sb":
        # An I2SB teacher of N steps runs at most N - 1 network calls.
        top = int(t_model.model.bridge.n_steps) - 1
        if teacher_nfe[-1] > top:
            _say(log, f"note: {t_model.path} has {top + 1} bridge steps, so its NFE is capped at {top}")
            teacher_nfe = sorted({min(n, top) for n in teacher_nfe})

    for model in (t_model, s_model):
        if model is not None and image_size:
            check_image_size(model, image_size, image_size, f"--image-size {image_size}")
    batch = load_eval_data(data, degradation, image_size, channels, num_images, seed)
    x0, xT, mask, labels = batch["x0"], batch["xT"], batch.get("mask"), batch.get("label")
    if x0.shape[1] != channels:
        raise ValueError(f"the data has {x0.shape[1]}-channel images, the models make {channels}-channel ones")
    for model in (t_model, s_model):
        if model is not None:
            check_image_size(model, x0.shape[-2], x0.shape[-1], "the evaluation image size")
    if min(x0.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, these are {x0.shape[-2]}x{x0.shape[-1]}")

    clf = get_classifier(classifier, run_dir, data, x0.shape[-1], channels, classifier_task, classifier_epochs,
                         classifier_items, seed=seed, device=dev, progress=progress, log=log)
    from ibmd_fast.metrics import evaluate_restoration

    def measure(restored):
        return evaluate_restoration(restored, x0, clf, labels if clf.task == "labels" else None)

    rows = [{"model": "corrupted", "nfe": 0, **measure(xT), "sec_per_image": 0.0}]
    restored_by_row = {}
    for nfe in teacher_nfe:
        _say(log, f"teacher, NFE {nfe} ...")
        restored, seconds = _timed_restore(t_model, xT, nfe, sampler, mask, seed, batch_size, progress)
        rows.append({"model": "teacher", "nfe": nfe, **measure(restored), "sec_per_image": seconds})
        restored_by_row[("teacher", nfe)] = restored
    if s_model is not None:
        _say(log, f"student, NFE {s_model.nfe} ...")
        restored, seconds = _timed_restore(s_model, xT, None, None, mask, seed, batch_size, progress)
        rows.append({"model": "student", "nfe": s_model.nfe, **measure(restored), "sec_per_image": seconds})
        restored_by_row[("student", s_model.nfe)] = restored
    for row in rows:
        for key, value in list(row.items()):
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None  # strict JSON has no NaN or inf (inf PSNR: identical images)

    payload = {
        "data": _describe(data),
        "degradation": degradation,
        "image_size": int(x0.shape[-1]),
        "channels": channels,
        "num_images": int(x0.shape[0]),
        "teacher": None if t_model is None else t_model.path,
        "student": None if s_model is None else s_model.path,
        "sampler": (sampler or natural_sampler(t_model.bridge_type)) if t_model is not None else None,
        "classifier": {"path": _classifier_path(classifier, run_dir, data), "task": clf.task,
                       "config": getattr(clf, "config", None)},
        "device": str(dev),
        "seed": seed,
        "results": rows,
    }
    if run_dir is not None:
        n = min(grid_rows, x0.shape[0])
        columns = [xT[:n]]
        if t_model is not None:
            columns.append(restored_by_row[("teacher", teacher_nfe[-1])][:n])
        if s_model is not None:
            columns.append(restored_by_row[("student", s_model.nfe)][:n])
        columns.append(x0[:n])
        grid_path = os.path.join(run_dir, "eval-grid.png")
        save_grid(columns, grid_path)
        payload["grid"] = grid_path
        payload["grid_columns"] = (["corrupted"] + (["teacher"] if t_model is not None else [])
                                   + (["student"] if s_model is not None else []) + ["clean"])
        _write_json(os.path.join(run_dir, "eval.json"), payload)
    return payload


# ----------------------------------------------------------------------------
# Restoring files


def _default_inputs(model: LoadedModel, count: int, seed: int):
    """Held-out crops of the bundled photos, degraded as the release was trained: (names, xT, x0, mask)."""
    from ibmd_fast.data import SkimagePhotos, get_degradation

    if not model.degradation:
        raise ValueError(f"{model.path} names no degradation, so there are no default inputs; pass --input")
    size = model.image_size or 64
    photos = SkimagePhotos(size=size, split="test", n_items=count, channels=model.image_channels, seed=seed,
                           flip=False)
    x0 = torch.stack([photos[i] for i in range(count)])
    xT, mask = get_degradation(model.degradation)(x0)
    names = [f"skimage-{i:03d}.png" for i in range(count)]
    return names, xT, x0, mask


def _read_mask(path: str, height: int, width: int) -> torch.Tensor:
    """A mask image -> float [1, H, W], 1 where the pixel is bright (the hole); resized (nearest) to size."""
    from ibmd_fast.data.images import load_image

    try:
        image = load_image(path).convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except Exception as exc:
        raise ValueError(f"cannot read mask image {path} ({_one_line(exc)})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.NEAREST)
    return torch.from_numpy((np.asarray(image) >= 128).astype(np.float32))[None]


def _list_inputs(path: str) -> tuple[Path, list[str]]:
    """(root, relative paths) of the input images: one file, or every image under a folder."""
    from ibmd_fast.data import IMAGE_EXTENSIONS, list_images

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if p.is_dir():
        files = list_images(p)
        if not files:
            raise ValueError(f"input folder {path} contains no images (looked recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        return p, files
    return p.parent, [p.name]


def _read_inputs(root: Path, files: list[str], channels: int):
    """Decode the inputs; unreadable ones are skipped with one warning, none readable is an error."""
    from ibmd_fast.data.images import load_image, pil_to_tensor

    images, bad = [], []
    for rel in files:
        try:
            images.append((rel, pil_to_tensor(load_image(root / rel), channels)))
        except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
            bad.append(f"{rel} ({type(exc).__name__}: {_one_line(exc)})")
    if not images:
        raise ValueError(f"no readable input image: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    if bad:
        shown = "; ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable input image(s): {shown}", UserWarning, stacklevel=2)
    return images, bad


def _upsampler(model: LoadedModel, factor: int):
    """Bring low-resolution inputs to size as the release's degradation did (bicubic otherwise)."""
    from ibmd_fast.data import SuperResolution, get_degradation

    degradation = get_degradation(model.degradation) if model.degradation else None
    if isinstance(degradation, SuperResolution) and degradation.factor == factor:
        return degradation.upsample
    return SuperResolution(factor, "bicubic").upsample


def restore_files(
    model: str = DEFAULT_GENERATOR,
    inputs: Optional[str] = None,
    output: str = "runs/sample",
    nfe: Optional[int] = None,
    sampler: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 8,
    device="auto",
    upsample: Optional[int] = None,
    mask: Optional[str] = None,
    num_default: int = 4,
    progress: bool = False,
    log: Log = None,
) -> dict[str, Any]:
    """Restore corrupted images with a release and write PNGs under ``output``.

    inputs  -- an image file or a folder (recursively); each result keeps its relative name with a
               .png suffix. None: ``num_default`` held-out crops of the bundled photos, degraded as
               the release was trained; the corrupted crops go to ``output/inputs/`` and the clean
               ones to ``output/clean/`` beside the results.
    upsample-- K: inputs are low-resolution; bring them to K times their size first (the release's
               own upsampling when it is an srKx degradation, else bicubic).
    mask    -- inpainting releases: a mask image (white = hole), resized to each input; default:
               the degradation's fixed mask. The hole of each input is cleared, as in training.
    nfe, sampler -- teachers only (defaults: the release's NFE, the bridge's natural sampler).
    Everything is checked before anything is written. Returns a summary dict.
    """
    from ibmd_fast.data import get_degradation

    dev = resolve_device(device)
    loaded = load_model(model, dev)
    if loaded.kind == "generator" and (sampler is not None or (nfe is not None and nfe != loaded.nfe)):
        _restore(loaded, torch.zeros(0), nfe, sampler)  # raises the explanatory error
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    degradation = get_degradation(loaded.degradation) if loaded.degradation else None
    inpainting = degradation is not None and degradation.is_inpainting
    if mask is not None and not inpainting:
        raise ValueError(f"--mask is for inpainting releases; {loaded.path} restores {loaded.degradation}")

    out_root = Path(output).expanduser()
    extra_outputs = []
    if inputs is None:
        if upsample:
            raise ValueError("--upsample applies to --input images; the default inputs are already at size")
        names, xT_all, x0_all, masks_all = _default_inputs(loaded, num_default, seed)
        items = [(name, xT_all[i]) for i, name in enumerate(names)]
        extra_outputs = [(f"inputs/{name}", xT_all[i]) for i, name in enumerate(names)]
        extra_outputs += [(f"clean/{name}", x0_all[i]) for i, name in enumerate(names)]
        skipped: list[str] = []
    else:
        root, files = _list_inputs(inputs)
        if out_root.resolve() == root.resolve():
            raise ValueError(f"--output {output} is the input folder; results would overwrite the inputs")
        items, skipped = _read_inputs(root, files, loaded.image_channels)
        if upsample:
            up = _upsampler(loaded, int(upsample))
            items = [(rel, up(x)) for rel, x in items]

    # Output names: same relative path, .png; refuse collisions (a.jpg and a.png) before writing.
    named = []
    seen: dict[str, str] = {}
    for rel, x in items:
        out_rel = str(Path(rel).with_suffix(".png").as_posix())
        if out_rel in seen:
            raise ValueError(f"inputs {seen[out_rel]} and {rel} would both be written to {out_rel}")
        seen[out_rel] = rel
        check_image_size(loaded, x.shape[-2], x.shape[-1], f"input {rel}" + (f" (after --upsample {upsample})"
                                                                               if upsample else ""))
        named.append((rel, out_rel, x))

    def mask_for(x: torch.Tensor) -> Optional[torch.Tensor]:
        if not inpainting:
            return None
        h, w = x.shape[-2:]
        return _read_mask(mask, h, w) if mask is not None else degradation.hole_mask(h, w)

    # Batch images of one size together.
    groups: dict[tuple, list] = {}
    for entry in named:
        groups.setdefault(tuple(entry[2].shape), []).append(entry)
    written = []
    bar = tqdm(total=len(named), desc=f"restoring ({loaded.kind})", disable=not progress, unit="image")
    results: list[tuple[str, torch.Tensor]] = []
    try:
        for shape, entries in groups.items():
            for start in range(0, len(entries), batch_size):
                chunk = entries[start:start + batch_size]
                xT = torch.stack([x for _, _, x in chunk])
                masks = [mask_for(x) for _, _, x in chunk]
                m = None if masks[0] is None else torch.stack(masks)
                if m is not None:
                    xT = xT * (1.0 - m)  # the hole carries no information, as in training
                restored = _restore(loaded, xT, nfe, sampler, m, seed + len(results), batch_size, False)
                results.extend((out_rel, restored[i]) for i, (_, out_rel, _) in enumerate(chunk))
                bar.update(len(chunk))
    finally:
        bar.close()
    for out_rel, image in results + extra_outputs:
        path = out_root / out_rel
        save_image(image, str(path))
        written.append(str(path))
    return {
        "model": loaded.path,
        "kind": loaded.kind,
        "nfe": nfe or loaded.nfe,
        "sampler": (sampler or natural_sampler(loaded.bridge_type)) if loaded.kind == "teacher" else None,
        "output": str(out_root),
        "restored": len(results),
        "written": written,
        "skipped": skipped,
    }
