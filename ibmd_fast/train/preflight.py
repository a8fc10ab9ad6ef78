"""Checks made before a run's first forward pass, so a user error is one line, not a traceback.

- ``check_device``: ``--device cuda`` on a machine whose torch sees no CUDA device.
- (an ``--image-size`` the U-Net cannot take: ``models.unet.check_image_size``, which ``sample``,
  ``eval`` and ``export`` use too)
- ``check_settings``: settings that run but are probably not meant (``--steps 0``, training
  images smaller than 2x2): a warning each.
- ``out_of_memory``: whether an exception is the CPU allocator's or CUDA's out-of-memory error,
  and ``oom_message`` saying to lower ``--batch-size``, with the sizes tried.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from ibmd_fast.data.images import IMAGE_EXTENSIONS

__all__ = ["DeviceError", "check_device", "check_settings", "out_of_memory", "oom_message"]


class DeviceError(ValueError):
    """A device this machine does not have."""


def check_device(spec: str) -> None:
    """Refuse ``cuda`` / ``cuda:N`` when torch sees no (or too few) CUDA devices."""
    import torch

    spec = str(spec).strip().lower()
    if not spec.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"--device {spec}: torch sees no CUDA device (torch {torch.__version__}, {build}); use --device cpu or auto"
        )
    if ":" in spec:
        index = spec.split(":", 1)[1]
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_settings(
    steps: Optional[int] = None, data: Optional[str] = None, image_size: Optional[int] = None, sample: int = 16
) -> None:
    """Warn about settings that run but are probably a mistake."""
    if steps == 0:
        warnings.warn(
            "--steps 0: no training step is taken; the release holds the initial weights", UserWarning, stacklevel=2
        )
    folder = _folder_of(data)
    if folder:
        small = _small_images(folder, sample)
        if small:
            name, (w, h) = small
            warnings.warn(
                f"training images as small as {w}x{h} ({name}) in {data}: they are upscaled to "
                f"--image-size {image_size} and hold almost no detail",
                UserWarning,
                stacklevel=2,
            )


def _folder_of(data: Optional[str]) -> Optional[str]:
    """The image folder a data spec reads (folder:, corrupted:, the first of paired:), else None."""
    for prefix in ("folder:", "corrupted:", "paired:"):
        if data and data.startswith(prefix):
            return data[len(prefix) :].split(",")[0]
    return None


def _small_images(root: str, sample: int):
    """The first of up to ``sample`` images under ``root`` smaller than 2x2 (name, (w, h)), else None."""
    from PIL import Image

    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            seen += 1
            try:
                with Image.open(os.path.join(dirpath, name)) as image:
                    if min(image.size) < 2:
                        return name, image.size
            except Exception:  # unreadable files are the data set's business
                pass
            if seen >= sample:
                return None
    return None


def out_of_memory(exc: BaseException) -> bool:
    """The CPU allocator's ``RuntimeError`` or CUDA's ``OutOfMemoryError``."""
    import torch

    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def oom_message(exc: BaseException, batch_size: Optional[int] = None, image_size: Optional[int] = None) -> str:
    import torch

    where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA" in str(exc) else "CPU"
    tried = []
    if batch_size:
        tried.append(f"--batch-size {batch_size}")
    if image_size:
        tried.append(f"{image_size}px")
    at = f" with {' at '.join(tried)}" if tried else ""
    hint = " (or --precision bf16 where the command has it)" if where == "GPU" else ""
    return f"out of {where} memory{at}; lower --batch-size{hint}"
