"""Training checkpoints: plain ``state_dict``s, written atomically, resumed from the newest good one.

After NVlabs/edm2's ``CheckpointIO``: named objects with ``state_dict()`` /
``load_state_dict()`` are saved together with free-form extras (step, RNG states, config)
as ``<directory>/ckpt-<step>.pt``. Files are written to a temporary name and renamed
(``release.atomic_write``), so a reader never sees half a checkpoint; a file damaged some
other way (a full disk, a copy cut short) is skipped by ``find_latest`` with a warning.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, nothing
is unpickled. Each checkpoint carries ``sha256``, a checksum of everything else in it
(``payload_digest``), verified when it is read: a file whose bytes changed after it was written is
damaged and moved aside like a truncated one (checkpoints from before the checksum load as before).
Module weights are checked to be finite before they are written: a run whose weights turned
NaN/Inf stops there instead of saving them.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ibmd_fast.release import NonFiniteError, atomic_write, check_finite
from ibmd_fast.models import load_state_dict_checked

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
        self.log = None  # a RunLog's ``record``: warnings also go to log.txt
        self._readable: set = set()  # (path, size, mtime) of files that loaded
        self._stale: list[str] = []  # old checkpoints that --resume none removes after the first save

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
        for name, obj in self.objects.items():
            if isinstance(obj, nn.Module):
                try:
                    check_finite(payload["state"][name], f"step {step}: the {name} weights turned non-finite")
                except NonFiniteError as exc:
                    raise NonFiniteError(
                        f"{exc}; no checkpoint or release written (lower --lr, or resume from an earlier checkpoint)"
                    ) from None
        payload["sha256"] = payload_digest(payload)
        path = self.path(step)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        stat = os.stat(path)
        self._readable.add((path, stat.st_size, stat.st_mtime_ns))  # just written and hashed: no re-read
        self._remove_stale(path)
        self.prune()
        return path

    def prune(self) -> list[str]:
        """Keep the newest ``keep`` checkpoints that load; returns the deleted paths.

        A file that does not load is not counted: it is moved aside as ``<name>.corrupt`` with a
        ``CheckpointWarning`` (never deleted), so a damaged high-step file cannot push good ones
        out, and the last readable checkpoint is never deleted.
        """
        removed, kept = [], 0
        for _, path in reversed(self.checkpoints()):
            try:
                self.check(path)
            except CheckpointError as exc:
                self.quarantine(path, exc)
                continue
            kept += 1
            if kept <= self.keep:
                continue
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
        return removed

    def check(self, path: str) -> None:
        """Raise ``CheckpointError`` unless ``path`` loads (memory-mapped: the tensors are not read)."""
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key in self._readable:
            return
        self.read(path, mmap=True)
        self._readable.add(key)

    def quarantine(self, path: str, reason: Any = None) -> Optional[str]:
        """Move an unreadable checkpoint aside as ``<path>.corrupt`` (warning once); returns the new path."""
        target = path + ".corrupt"
        n = 1
        while os.path.exists(target):
            n += 1
            target = f"{path}.{n}.corrupt"
        try:
            os.replace(path, target)
        except OSError:
            target = None
        where = f"; moved aside to {os.path.basename(target)}" if target else ""
        self._warn(f"skipping damaged checkpoint: {reason or path}{where}")
        return target

    def corrupt(self) -> list[str]:
        """Checkpoints moved aside by ``quarantine`` (sorted names)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            os.path.join(self.directory, n)
            for n in os.listdir(self.directory)
            if n.startswith("ckpt-") and n.endswith(".corrupt")
        )

    def set_aside(self) -> list[str]:
        """``--resume none``: the old checkpoints stay on disk until this run's first ``save``, then go."""
        self._stale = [p for _, p in self.checkpoints()]
        return list(self._stale)

    def _remove_stale(self, written: str) -> None:
        for path in self._stale:
            if path != written:
                try:
                    os.remove(path)
                except OSError:
                    pass
        self._stale = []

    def _warn(self, message: str) -> None:
        warnings.warn(message, CheckpointWarning, stacklevel=3)
        if self.log is not None:
            self.log(f"warning: {message}")

    # -- load

    @staticmethod
    def read(path: str, mmap: bool = False) -> dict:
        """The payload of one checkpoint; ``CheckpointError`` if it cannot be read."""
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a folder, not a checkpoint file (give a ckpt-<step>.pt inside it)")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # truncated zip, bad pickle, refused type, ...
            raise CheckpointError(f"cannot read checkpoint {path}: {_reason(exc)}") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or "state" not in payload:
            raise CheckpointError(f"{path} is not an ibmd-fast training checkpoint")
        if "sha256" in payload and payload_digest(payload) != payload["sha256"]:
            raise CheckpointError(f"{path} is damaged: its contents do not match the sha256 checksum it carries")
        return payload

    def find_latest(self, quarantine: bool = True) -> Optional[tuple[str, dict]]:
        """``(path, payload)`` of the newest checkpoint that reads cleanly, or None.

        Damaged files are skipped with a ``CheckpointWarning`` and, with ``quarantine``, moved aside
        as ``*.corrupt`` (only one process of a run should do that).
        """
        for _, path in reversed(self.checkpoints()):
            try:
                return path, self.read(path)
            except CheckpointError as exc:
                if quarantine:
                    self.quarantine(path, exc)
                else:
                    self._warn(f"skipping damaged checkpoint: {exc}")
        return None

    def load(self, payload: dict, path: str = "<checkpoint>") -> dict:
        """Load every object's state from ``payload`` (see ``read``). Returns the payload."""
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
                    "It was written for another model; use another --run-dir or --resume none."
                ) from None
        return payload


def payload_digest(payload: dict) -> str:
    """sha256 over a checkpoint's contents but its own ``sha256``: every tensor's dtype, shape and bytes
    and every plain value, walked in a fixed order (dict keys sorted), streamed tensor by tensor."""
    digest = hashlib.sha256()

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            if tensor.numel():
                digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                digest.update(f"K{key!r}".encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                walk(item)
        else:
            digest.update(f"V{value!r}".encode())

    walk({k: v for k, v in payload.items() if k != "sha256"})
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """The cause of a failed ``torch.load`` in one line, without torch's advice to unpickle the file."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed") or "Unsupported global" in text:
        import re as _re

        found = _re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"it holds Python objects{what} that are never loaded from checkpoints (only tensors and plain values are)"
        )
    first = text.split(". ")[0]  # torch's zip errors go on for lines about possible causes
    return f"{type(exc).__name__}: {first[:300]}"
