"""What the I2SB and DDBM importers share: the network a checkpoint holds (``ImportedNet``), U-Net
keywords from guided-diffusion's ``create_model`` ones, and loading weights by name and shape with
``torch.load(weights_only=True)`` (memory-mapped), refusing the first key that does not fit.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors import safe_open

from ibmd_fast.bridges import Bridge
from ibmd_fast.importers.unpickle import TeacherImportError
from ibmd_fast.models.unet import UNet, attention_rates
from ibmd_fast.release import GENERATOR_FORMAT, TEACHER_FORMAT

__all__ = ["ImportedNet", "unet_kwargs", "load_net", "torch_load", "sha256", "refuse_release_or_onnx"]


@dataclass(frozen=True)
class ImportedNet:
    """What a reader found in a foreign checkpoint, before it becomes a teacher release."""

    checkpoint: str  # the file the weights came from
    net: UNet  # the network with those weights (eval mode, no gradients)
    bridge: Bridge  # the bridge it was trained on
    conditional: bool  # the network sees xT (concatenated to its input)
    image_size: int
    channels: int  # image channels (the network's output)
    degradation: Optional[str]  # the source's own word for its task (not yet a name of ibmd_fast.data)
    info: dict[str, Any] = field(default_factory=dict)  # what was read, recorded as config["source"]


# ----------------------------------------------------------------------------
# Architecture: guided-diffusion / DDBM create_model keywords -> UNet keywords

_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 3, 4),
}


def _channel_mult(value, image_size: int) -> tuple:
    if value in ("", None):
        if image_size not in _CHANNEL_MULT:
            raise TeacherImportError(f"no default channel_mult for image_size {image_size}; give channel_mult")
        return _CHANNEL_MULT[image_size]
    if isinstance(value, str):
        return tuple(int(m) for m in value.split(","))
    return tuple(value)


def unet_kwargs(kw: dict[str, Any], in_channels: int, out_channels: int) -> dict[str, Any]:
    """``UNet`` keywords from guided-diffusion's ``create_model`` ones (``num_channels``,
    ``attention_resolutions`` as resolutions "32,16,8", ``channel_mult`` "" or "1,1,2,...")."""
    size = int(kw["image_size"])
    resolutions = kw.get("attention_resolutions", "16")
    if not isinstance(resolutions, str):
        resolutions = ",".join(str(int(r)) for r in resolutions)
    return dict(
        image_size=size,
        in_channels=in_channels,
        model_channels=int(kw["num_channels"]),
        out_channels=out_channels,
        num_res_blocks=int(kw["num_res_blocks"]),
        attention_resolutions=attention_rates(size, resolutions),
        dropout=float(kw.get("dropout", 0.0)),
        channel_mult=_channel_mult(kw.get("channel_mult", ""), size),
        num_classes=1000 if kw.get("class_cond", False) else None,
        num_heads=int(kw.get("num_heads", 1)),
        num_head_channels=int(kw.get("num_head_channels", -1)),
        num_heads_upsample=int(kw.get("num_heads_upsample", -1)),
        use_scale_shift_norm=bool(kw.get("use_scale_shift_norm", False)),
        resblock_updown=bool(kw.get("resblock_updown", False)),
        use_new_attention_order=bool(kw.get("use_new_attention_order", False)),
    )


# ----------------------------------------------------------------------------
# Weights


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # an old (non-zip) file cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TeacherImportError(
            f"{path}: refusing to load objects other than tensors and plain containers ({_first_line(exc)})"
        ) from None
    except Exception as exc:
        raise TeacherImportError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _strip(sd: dict[str, Any], prefixes=("module.", "_orig_mod.", "diffusion_model.")) -> dict[str, Any]:
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _fit(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Cast to float32 and reshape squeezed 1-d attention convs; name the first key that does not fit."""
    out = {}
    for key, want in expected.items():
        if key not in sd:
            raise TeacherImportError(
                f"{what} does not fit the architecture: key {key!r} (model shape "
                f"{tuple(want.shape)}) is missing from the checkpoint"
            )
        value = sd[key]
        if not isinstance(value, torch.Tensor):
            raise TeacherImportError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        if (
            tuple(value.shape) != tuple(want.shape)
            and value.numel() == want.numel()
            and want.dim() == 3
            and want.shape[-1] == 1
            and tuple(value.shape[:2]) == tuple(want.shape[:2])
        ):
            value = value.reshape(want.shape)  # DDBM's 2-d [O, I, 1, 1] or squeezed [O, I] attention convs
        if tuple(value.shape) != tuple(want.shape):
            raise TeacherImportError(
                f"{what} does not fit the architecture: first mismatched key {key!r}: "
                f"checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}"
            )
        out[key] = value.float() if value.is_floating_point() else value
    extra = [k for k in sd if k not in expected]
    if extra:
        raise TeacherImportError(
            f"{what} does not fit the architecture: checkpoint key {extra[0]!r} is not in "
            f"the model ({len(extra)} such keys)"
        )
    return out


def load_net(kwargs: dict[str, Any], sd: dict[str, torch.Tensor], what: str, shadow: Optional[list] = None) -> UNet:
    """The U-Net holding ``sd`` (optionally with ``shadow`` laid over its parameters by position)
    without a second copy: built on the meta device, the (memory-mapped) tensors assigned."""
    with torch.device("meta"):
        net = UNet(**kwargs)
    expected = net.state_dict()
    sd = _fit(_strip(dict(sd)), expected, what)
    if shadow is not None:
        names = [n for n, _ in net.named_parameters()]
        if len(shadow) != len(names):
            raise TeacherImportError(
                f"{what}: the EMA holds {len(shadow)} shadow parameters, the architecture has {len(names)} parameters"
            )
        sd.update(_fit(dict(zip(names, shadow)), {n: expected[n] for n in names}, f"{what} (EMA)"))
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def refuse_release_or_onnx(path: str) -> None:
    if path.endswith(".onnx"):
        raise TeacherImportError(
            f"{path} is an ONNX model (an exported student); import-teacher takes an "
            "I2SB run folder or a DDBM/DBIM checkpoint"
        )
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as fh:
                fmt = (fh.metadata() or {}).get("format")
        except Exception:
            fmt = None
        if fmt == GENERATOR_FORMAT:
            raise TeacherImportError(
                f"{path} is an ibmd-fast generator release (a distilled student), not a teacher checkpoint"
            )
        if fmt == TEACHER_FORMAT:
            raise TeacherImportError(f"{path} is already an ibmd-fast teacher release: pass it to distill directly")
