"""Plain-data pickles (I2SB's ``options.pkl``, guided-diffusion's ``*_fixedsigma.pkl``): a restricted
unpickler that builds argparse namespaces, paths and builtin containers and refuses every other
global, so nothing in the file is run; and the importers' error classes.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import copyreg
import io
import os
import pathlib
import pickle
from typing import Any

from ibmd_fast.config_io import load_config_file

__all__ = ["TeacherImportError", "UnsafePickleError", "restricted_load", "plain", "read_kwargs"]


class TeacherImportError(ValueError):
    """A checkpoint that cannot be imported: missing files, wrong kind, wrong architecture."""


class UnsafePickleError(TeacherImportError):
    """A pickle that names a global outside the allowed plain-data set (it is never run)."""


_PATHS = ("Path", "PosixPath", "PurePath", "PurePosixPath")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("argparse", "Namespace"): argparse.Namespace,
    **{(m, n): getattr(pathlib, n) for m in ("pathlib", "pathlib._local") for n in _PATHS},
    # Windows paths cannot be instantiated on POSIX; their pure form keeps the text
    **{
        (m, n): pathlib.PureWindowsPath
        for m in ("pathlib", "pathlib._local")
        for n in ("WindowsPath", "PureWindowsPath")
    },
    **{("builtins", n): getattr(builtins, n) for n in ("set", "frozenset", "complex", "object")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    # protocol 0/1 objects: object.__new__ of a class that itself went through this table
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("_codecs", "encode"): lambda text, encoding="latin1": codecs.encode(text, "latin1"),  # protocol 2 bytes
}


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str):
        super().__init__(fh)
        self._path = path

    def find_class(self, module: str, name: str):
        module = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)  # protocol 0-2 names
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle {module}.{name} (only argparse.Namespace, pathlib "
                "paths and builtin containers/scalars are allowed; nothing in the file was run)"
            )
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._path}: refusing a pickle with persistent references")


def restricted_load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` allowing only plain data; anything else raises ``UnsafePickleError``."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return _PlainUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or not a pickle
        raise TeacherImportError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc})") from None


def plain(value: Any) -> Any:
    """Options as JSON-safe data: Namespace -> dict, paths -> str, sets -> sorted lists."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def read_kwargs(path: str) -> dict[str, Any]:
    """``create_model`` keyword arguments from a plain-data pickle, JSON or YAML file."""
    if str(path).endswith(".pkl"):
        kwargs = plain(restricted_load(path))
    else:
        kwargs = load_config_file(path)
    if not isinstance(kwargs, dict):
        raise TeacherImportError(f"{path} holds a {type(kwargs).__name__}, expected a mapping of model keywords")
    return kwargs
