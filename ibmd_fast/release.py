"""Release files: model weights as safetensors with their config as JSON metadata.

A release is everything `sample`, `eval` and `export` need, and nothing is
unpickled. Metadata keys (all strings, as safetensors requires):

    format    "ibmd_fast.teacher" | "ibmd_fast.generator"
    config    JSON: the model config (`Generator.config()`, or for a teacher
              {"unet": ..., "conditional": ..., "bridge": ...}) plus
              "nfe" (student steps; teacher: default sampling NFE),
              "degradation" (name), "normalization" ("[-1,1]"),
              "image_size" (the training size), "version"
    extra     optional JSON (training step, metrics, ...)
    sha256    checksum of the weights and the metadata above (``content_digest``); releases
              written before it existed carry none and load as before

Every release is checked when it is written and when it is read: no NaN or Inf weight passes
(``check_finite`` names the tensor and the count), and a checksum that does not match is a
damaged file, refused in one line.

`load_teacher` / `load_generator` rebuild the models; `load_model` loads either kind for
inference as a `LoadedModel` (with what `sample`, `eval` and `export` need to know about it).
The embedded default teacher release is `ibmd_fast.paths.DEFAULT_TEACHER`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ibmd_fast import __version__
from ibmd_fast.bridges import bridge_from_config
from ibmd_fast.models import UNet, load_state_dict_checked
from ibmd_fast.models.wrappers import Teacher, Generator

TEACHER_FORMAT = "ibmd_fast.teacher"
GENERATOR_FORMAT = "ibmd_fast.generator"
NORMALIZATION = "[-1,1]"


class ReleaseError(ValueError):
    """A release file that is missing, corrupt, or of the wrong kind."""


class NonFiniteError(ValueError):
    """Weights holding NaN or Inf values: never written, never loaded."""


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    A full disk (or quota) becomes one ``OSError`` naming ``path``; the temporary file is removed,
    so nothing half-written is left and an older ``path`` stays as it was.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _disk_full(exc, path) from None
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and safetensors) make 0600: give the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _disk_full(exc, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _disk_full(exc: OSError, path: str) -> OSError:
    """A full disk as one line naming the file; other OSErrors as they are."""
    if exc.errno in _DISK_FULL:
        return OSError(
            exc.errno,
            f"no space left on the device while writing {path}; nothing was written "
            "(an older file of that name is unchanged): free some space and run again",
        )
    return exc


def content_digest(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 of the metadata strings and of each tensor's name, dtype, shape and bytes (names sorted).

    Streamed tensor by tensor from memory already loaded: no copy, one pass (about the disk's read
    speed or better, see README "Run directories: nothing is lost").
    """
    digest = hashlib.sha256()
    for key in sorted(metadata or {}):
        if key != "sha256":
            digest.update(f"{key}={metadata[key]}\0".encode("utf-8"))
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode("utf-8"))
        if tensor.numel():
            flat = tensor.to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """``NonFiniteError`` naming the first tensor with NaN or Inf values and how many it holds."""
    for name in sorted(state):
        tensor = state[name]
        if not (torch.is_tensor(tensor) and tensor.is_floating_point()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(tensor.numel() - int(finite.sum()))
            raise NonFiniteError(
                f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()}"
            )


def save_release(path: str, net: torch.nn.Module, fmt: str, config: dict[str, Any], extra: dict | None = None):
    """Write the U-Net's ``state_dict()`` (guided-diffusion keys; float32, CPU) and the config, atomically.

    Both teachers and generators store their network (``teacher.net``, ``generator.net``).
    """
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    check_finite(state, f"not writing the release {path}")
    config = {"normalization": NORMALIZATION, "version": __version__, **config}
    metadata = {"format": fmt, "config": json.dumps(config)}
    if extra is not None:
        metadata["extra"] = json.dumps(extra)
    metadata["sha256"] = content_digest(state, metadata)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_release(path: str, expect: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Return ``(state_dict, config, extra)`` of a release; one clear error for a bad file."""
    if not os.path.exists(path):
        raise ReleaseError(f"release file not found: {path}")
    if os.path.isdir(path):
        raise ReleaseError(f"{path} is a folder, not a release file")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ReleaseError(f"{path} is not a readable safetensors file ({exc})") from None
    if "sha256" in metadata and content_digest(state, metadata) != metadata["sha256"]:
        raise ReleaseError(
            f"{path} is damaged: its contents do not match the sha256 checksum it carries; use an intact copy"
        )
    fmt = metadata.get("format")
    if fmt not in (TEACHER_FORMAT, GENERATOR_FORMAT):
        raise ReleaseError(f"{path} is not an ibmd-fast release (format={fmt!r})")
    if expect is not None and fmt != expect:
        want = "generator" if expect == GENERATOR_FORMAT else "teacher"
        raise ReleaseError(f"{path} holds a {fmt.split('.')[-1]}, not a {want}")
    try:
        config = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ReleaseError(f"{path}: damaged release metadata ({exc})") from None
    check_finite(state, f"{path} is unusable")
    check_release_config(path, config)
    return state, config, extra


def check_release_config(path: str, config: Any) -> None:
    """``ReleaseError`` naming the file and the key of a config value no loader could use."""
    if not isinstance(config, dict):
        raise ReleaseError(f"{path}: the release config is not a mapping")

    def bad(key, want):
        raise ReleaseError(f"{path}: config key {key!r} is {json.dumps(config.get(key))}, expected {want}")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    for key, least in (("nfe", 1), ("image_size", 1), ("channels", 1)):
        value = config.get(key)
        if value is not None and not (is_int(value) and value >= least):
            bad(key, f"an integer >= {least}")
    for key in ("unet", "bridge"):
        if key in config and not isinstance(config[key], dict):
            bad(key, "a mapping")
    for key, value in (config.get("bridge") or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ReleaseError(f"{path}: config key 'bridge.{key}' is {value}, expected a finite number")


def load_teacher(path: str, device="cpu"):
    """Rebuild a `Teacher` from a teacher release. Returns ``(teacher, config)``."""
    state, config, _ = read_release(path, expect=TEACHER_FORMAT)
    bridge = _bridge(path, config, bridge_from_config)
    try:
        net = UNet(**config["unet"])
        load_state_dict_checked(net, state)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(f"{path}: weights do not match the config they carry: {exc}") from None
    teacher = Teacher(net, bridge, conditional=config.get("conditional", False))
    if config.get("class_label") is not None:  # class-conditional imports (ibmd_fast.importers)
        teacher.class_label = int(config["class_label"])
    return teacher.to(device).eval(), config


def load_generator(path: str, device="cpu"):
    """Rebuild a `Generator` from a generator release. Returns ``(generator, config)``."""
    state, config, _ = read_release(path, expect=GENERATOR_FORMAT)
    bridge = _bridge(path, config, bridge_from_config)
    try:
        generator = Generator.from_config(config, bridge)
        load_state_dict_checked(generator.net, state)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(f"{path}: weights do not match the config they carry: {exc}") from None
    return generator.to(device).eval(), config


def _bridge(path: str, config: dict, bridge_from_config):
    """The release's bridge; a bad value is named by file and key."""
    if "bridge" not in config:
        raise ReleaseError(f"{path}: the release config has no 'bridge' key")
    try:
        return bridge_from_config(config["bridge"])
    except (TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise ReleaseError(f"{path}: config key 'bridge' holds a value no bridge takes ({detail})") from None


# ----------------------------------------------------------------------------
# A release loaded for inference


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
    def channel_mult(self) -> tuple:
        return tuple((self.config.get("unet") or {}).get("channel_mult") or (1,))

    @property
    def network(self) -> str:
        """The network in words, for ``models.unet.check_image_size``'s message."""
        trained = f" (trained at {self.image_size}x{self.image_size})" if self.image_size else ""
        return f"the network of {self.path}{trained}"


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", expect: Optional[str] = None
) -> LoadedModel:
    """Load a teacher or generator release; ``expect`` ("teacher" / "generator") refuses the other kind.

    Raises ReleaseError (missing file, not a safetensors file, not a release, wrong kind, weights
    that do not fit their config).
    """
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
        detail = " ".join(str(exc).split())
        raise ReleaseError(f"{path}: damaged release config ({detail})") from None
    model.requires_grad_(False)
    return LoadedModel(path=path, kind="teacher" if fmt == TEACHER_FORMAT else "generator", model=model, config=config)


def _release_format(path: str) -> Optional[str]:
    """The ``format`` metadata of a safetensors file (header only), or None when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return (fh.metadata() or {}).get("format")
    except Exception:  # missing, not safetensors, ...: read_release words the error
        return None
