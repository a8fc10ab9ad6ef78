"""``resolve_device``: the one reading of a ``--device`` setting, for every command and trainer."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``auto`` (or None): CUDA when torch sees a GPU, else CPU; ``cpu``; ``cuda``; ``cuda:N``; or
    anything else ``torch.device`` reads. ``local_rank``: what plain ``cuda`` means for this
    process under torchrun (``cuda:local_rank``).

    ValueError in one line for a name torch does not know, for CUDA without a CUDA GPU, and for
    a GPU index that does not exist.
    """
    if device is None or str(device).strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = str(device).strip().lower()
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"unknown device {device!r} ({detail}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} asked for, but this torch build ({torch.__version__}) sees no "
                "CUDA GPU; use --device cpu"
            )
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", int(local_rank))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return dev
