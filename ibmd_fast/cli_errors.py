"""The command line's error handling: one line naming the problem, a non-zero exit, no traceback
for what the user can fix (``IBMD_FAST_DEBUG=1`` shows tracebacks). Kept free of torch, like the
rest of the ``ibmd-fast`` group, so that ``--help`` answers at once."""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import click

# ----------------------------------------------------------------------------
# Errors: one line, non-zero exit, no traceback for what the user can fix


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or a failed run, not a bug: shown as one line."""
    import torch

    # OSError: missing or unwritable paths, a full disk; ValueError: bad values, files and releases
    # (ReleaseError and ConfigError are ValueErrors).
    types: list[type[BaseException]] = [ValueError, OSError, MemoryError, torch.cuda.OutOfMemoryError]
    # Errors the trainers and the exporter define (divergence, bad checkpoint, parity, ...).
    prefixes = ("ibmd_fast.train", "ibmd_fast.onnx")
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for value in list(vars(module).values()):
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and getattr(value, "__module__", "").startswith(prefixes)
            ):
                types.append(value)
    return tuple(types)


def _message(exc: BaseException, sizes: Optional[dict] = None) -> str:
    from ibmd_fast.train.preflight import oom_message, out_of_memory  # lazy: the CLI starts without torch

    if out_of_memory(exc):
        sizes = sizes or {}
        return oom_message(exc, sizes.get("batch_size"), sizes.get("image_size"))
    text = _one_line(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def friendly_errors(fn: Callable) -> Callable:
    """Turn expected exceptions into ``click.ClickException`` (one ``Error:`` line, exit code 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if os.environ.get("IBMD_FAST_DEBUG"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except click.exceptions.ClickException:
            raise
        except _expected_errors() as exc:
            raise click.ClickException(_message(exc, kwargs)) from None
        except RuntimeError as exc:  # the allocator's out-of-memory error is a plain RuntimeError
            from ibmd_fast.train.preflight import out_of_memory  # lazy: the CLI starts without torch

            if not out_of_memory(exc):
                raise
            raise click.ClickException(_message(exc, kwargs)) from None

    return wrapper


def _auto_progress(value: Optional[bool]) -> bool:
    """``--progress`` / ``--no-progress``, or on when stderr is a terminal."""
    return sys.stderr.isatty() if value is None else bool(value)


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # above a progress bar, not over it


def _check_output_parent(path: str, option: str, is_file: bool = False) -> None:
    """An output path below a file: say so (``os.makedirs`` would say ``[Errno 17] File exists``)."""
    folders = list(Path(path).parents) if is_file else [Path(path), *Path(path).parents]
    for parent in folders:
        if parent.exists():
            if not parent.is_dir():
                raise click.ClickException(f"{option} {path}: {parent} is a file, not a folder")
            return


# ----------------------------------------------------------------------------
# Numbers: finite and in range where they are parsed

SEED_MAX = 2**63 - 1  # torch.manual_seed and derive_seed take any seed below this


class FiniteFloat(click.FloatRange):
    """A float option (with an optional range) that refuses NaN and +-Inf, naming the option."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def seed_option_type() -> click.IntRange:
    return click.IntRange(0, SEED_MAX)


# ----------------------------------------------------------------------------
# Outputs: never another kind of file, never an input, never silently replaced


def file_kind(path: str) -> str:
    """What a file holds, read from its first bytes (no torch, no onnx): "teacher release",
    "generator release", "classifier", "safetensors file", "onnx model", or "file"."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                size = struct.unpack("<Q", head)[0]
                if 2 <= size <= 100_000_000:
                    text = fh.read(min(size, 1_000_000))
                    if text[:1] == b"{":
                        try:
                            meta = json.loads(text.decode("utf-8")).get("__metadata__") or {}
                        except (ValueError, UnicodeDecodeError):
                            meta = None
                        if meta is not None:
                            fmt = str(meta.get("format", ""))
                            return {
                                "ibmd_fast.teacher": "teacher release",
                                "ibmd_fast.generator": "generator release",
                                "ibmd_fast.metrics.Classifier": "classifier",
                            }.get(fmt, "safetensors file")
    except OSError:
        return "file"
    if head[:1] == b"\x08" and path.lower().endswith(".onnx"):  # ModelProto field 1 (ir_version)
        return "onnx model"
    return "file"


def check_output_file(path: str, option: str, kind: str, overwrite: bool, inputs=()) -> None:
    """Refuse an output that is one of ``inputs``, holds another kind of file, or (without
    ``--overwrite``) an existing file of ``kind``: the rule of README "Run directories: nothing is lost"."""
    if os.path.isdir(path):
        raise click.ClickException(f"{option} {path} is a folder; give a file name")
    for item in inputs:
        if item and os.path.exists(item) and os.path.exists(path) and os.path.samefile(item, path):
            raise click.ClickException(f"{option} {path} is this command's input; give another file name")
    if not os.path.exists(path):
        return
    found = file_kind(path)
    if found != kind:
        raise click.ClickException(
            f"{option} {path} already holds a {found}, not a {kind}; give another file name (nothing was written)"
        )
    if not overwrite:
        raise click.ClickException(
            f"{option} {path} already exists; pass --overwrite to replace it "
            "(it is replaced only once the new one is complete)"
        )


def check_output_outside(output: str, inputs: Optional[str], option: str = "--output") -> None:
    """An output folder inside (or equal to) the input folder would be read back as input next time."""
    if not inputs:
        return
    root = Path(inputs).expanduser().resolve()
    if root.is_file():
        return
    out = Path(output).expanduser().resolve()
    if out == root:
        raise click.ClickException(f"{option} {output} is the input folder; results would overwrite the inputs")
    if root in out.parents:
        raise click.ClickException(
            f"{option} {output} is inside the input folder {inputs}: its results would be "
            "read back as inputs next time; give a folder outside it"
        )


def check_writable(folder: str, option: str) -> None:
    """Write and remove a probe file in ``folder`` (or, while it does not exist, in the nearest folder
    above it that does: nothing is created), before any long work."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=str(existing))
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        reason = exc.strerror or _one_line(exc)
        raise click.ClickException(f"{option}: cannot write in {folder} ({reason}); nothing was done") from None
