"""The command line's error handling: one line naming the problem, a non-zero exit, no traceback
for what the user can fix (``IBMD_FAST_DEBUG=1`` shows tracebacks). Kept free of torch, like the
rest of the ``ibmd-fast`` group, so that ``--help`` answers at once."""
from __future__ import annotations

import functools
import os
import sys
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
            if (isinstance(value, type) and issubclass(value, Exception)
                    and getattr(value, "__module__", "").startswith(prefixes)):
                types.append(value)
    return tuple(types)


def _message(exc: BaseException, sizes: Optional[dict] = None) -> str:
    from ibmd_fast.train.preflight import oom_message, out_of_memory

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
            from ibmd_fast.train.preflight import out_of_memory

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
