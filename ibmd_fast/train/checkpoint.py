"""Training checkpoints: plain ``state_dict``s, written atomically, resumed from the newest good one.

After NVlabs/edm2's ``CheckpointIO``: named objects with ``state_dict()`` /
``load_state_dict()`` are saved together with free-form extras (step, RNG states, config)
as ``<directory>/ckpt-<step>.pt``. Files are written to a temporary name and renamed
(``release.atomic_write``), so a reader never sees half a checkpoint; a file damaged some
other way (a full disk, a copy cut short) is skipped by ``find_latest`` with a warning.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, nothing
is unpickled.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ibmd_fast.release import atomic_write

__all__ = ["CheckpointIO", "CheckpointError", "CheckpointMismatchError", "CheckpointWarning"]

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_FORMAT = "ibmd_fast.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (missing, truncated, corrupt, not ours)."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint written for another model or task than the current run."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped."""


class CheckpointIO:
    """Save and restore named objects; keep the newest ``keep`` checkpoints.

    ``objects``: name -> anything with ``state_dict()`` and ``load_state_dict()`` (modules,
    optimizers, GradScaler, ``EMA``). Modules are loaded with
    ``models.load_state_dict_checked``, so a mismatch is one error that lists the keys.
    """

    def __init__(self, directory: str, keep: int = 3, **objects: Any):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = str(directory)
        self.keep = int(keep)
        self.objects = dict(objects)

    # -- files

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt-{int(step)}.pt")

    def checkpoints(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every checkpoint file, ascending by step (readable or not)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            match = _NAME.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(self.directory, name)))
        return sorted(found)

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files left by a writer that was killed mid-write."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(".ckpt-") and name.endswith(".tmp"):
                try:
                    os.remove(os.path.join(self.directory, name))
                except OSError:
                    pass

    # -- save

    def save(self, step: int, **extra: Any) -> str:
        """Write ``ckpt-<step>.pt`` atomically, then prune to the newest ``keep`` files. Returns the path."""
        payload = {
            "format": _FORMAT,
            "step": int(step),
            "state": {name: obj.state_dict() for name, obj in self.objects.items()},
            **extra,
        }
        path = self.path(step)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        self.prune()
        return path

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
        removed = []
        for _, path in self.checkpoints()[: -self.keep]:
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
        return removed

    # -- load

    @staticmethod
    def read(path: str) -> dict:
        """The payload of one checkpoint; ``CheckpointError`` if it cannot be read."""
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, bad pickle, refused type, ...
            raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or "state" not in payload:
            raise CheckpointError(f"{path} is not an ibmd-fast training checkpoint")
        return payload

    def find_latest(self, log=None) -> Optional[tuple[str, dict]]:
        """``(path, payload)`` of the newest checkpoint that reads cleanly, or None.

        Damaged files are skipped with a ``CheckpointWarning`` (and a line through ``log``).
        """
        for _, path in reversed(self.checkpoints()):
            try:
                return path, self.read(path)
            except CheckpointError as exc:
                message = f"skipping damaged checkpoint: {exc}"
                warnings.warn(message, CheckpointWarning, stacklevel=2)
                if log is not None:
                    log(f"warning: {message}")
        return None

    def load(self, payload: dict, path: str = "<checkpoint>") -> dict:
        """Load every object's state from ``payload`` (see ``read``). Returns the payload."""
        from ibmd_fast.models import load_state_dict_checked

        state = payload["state"]
        missing = sorted(set(self.objects) - set(state))
        if missing:
            raise CheckpointMismatchError(f"checkpoint {path} holds no state for {missing}")
        for name, obj in self.objects.items():
            try:
                if isinstance(obj, nn.Module):
                    load_state_dict_checked(obj, state[name])
                else:
                    obj.load_state_dict(state[name])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointMismatchError(
                    f"checkpoint {path} does not fit this run ({name}): {exc}\n"
                    "It was written for another model; use another run_dir or resume='none'."
                ) from None
        return payload
