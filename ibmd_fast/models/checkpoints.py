"""Reading network weights: find the state dict inside a checkpoint, load it with one clear error.

- `extract_state_dict(model, checkpoint, prefer)`: a plain state dict, or one held under
  "ema" / "net" / "model" / "state_dict" (I2SB's `torch_ema` shadow list included), with wrapper
  prefixes stripped.
- `load_state_dict_checked(model, state_dict)`: load it, explaining any mismatch in one ValueError.
- `load_checkpoint_file(path)`: safetensors, or `torch.load(weights_only=True)`: never unpickles code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["extract_state_dict", "load_state_dict_checked", "load_checkpoint_file"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def _strip_prefixes(state_dict: Mapping[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    sd = dict(state_dict)
    prefixes = _WRAPPER_PREFIXES + extra
    changed = True
    while changed and sd:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(model: nn.Module, checkpoint: Mapping[str, Any], prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Find the network weights inside a checkpoint.

    Accepts a plain state dict, or a dict holding one under "ema" / "net" /
    "model" / "state_dict" (`prefer` first). The I2SB form, where "ema" is a
    `torch_ema` state ({"shadow_params": [...]}, a list in `model.parameters()`
    order), is laid over the "net" state dict by position. Wrapper prefixes
    (`module.`, `_orig_mod.`, I2SB's `diffusion_model.`) are stripped.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint is a {type(checkpoint).__name__}, expected a dict of tensors")
    if _is_tensor_dict(checkpoint):
        return _strip_prefixes(checkpoint, ("diffusion_model.",))

    if prefer not in ("ema", "net"):
        raise ValueError(f"prefer must be 'ema' or 'net', got {prefer!r}")
    order = [prefer] + [k for k in ("ema", "net", "model", "state_dict") if k != prefer]
    net_sd = None
    for key in ("net", "model", "state_dict"):
        if _is_tensor_dict(checkpoint.get(key)):
            net_sd = _strip_prefixes(checkpoint[key], ("diffusion_model.",))
            break
    for key in order:
        entry = checkpoint.get(key)
        if _is_tensor_dict(entry):
            return _strip_prefixes(entry, ("diffusion_model.",))
        if key == "ema" and isinstance(entry, Mapping) and isinstance(entry.get("shadow_params"), (list, tuple)):
            return _shadow_params_to_state_dict(model, entry["shadow_params"], net_sd)
    raise ValueError(
        f"no state dict found in checkpoint with keys {sorted(map(str, checkpoint))[:10]}; "
        "expected a dict of tensors or one under 'ema', 'net', 'model' or 'state_dict'"
    )


def _shadow_params_to_state_dict(
    model: nn.Module, shadow: list, net_sd: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    if len(shadow) != len(names):
        raise ValueError(f"EMA checkpoint holds {len(shadow)} shadow parameters, the model has {len(names)} parameters")
    sd = dict(net_sd) if net_sd is not None else dict(model.state_dict())
    sd.update(zip(names, shadow))
    return sd


def _format_keys(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, Any], prefer: str = "ema", strict: bool = True
) -> nn.Module:
    """Load weights into `model`, explaining any mismatch in one ValueError.

    `state_dict` may be a plain state dict or a checkpoint dict (see
    `extract_state_dict`; `prefer` picks "ema" or "net" when both are there).
    With `strict`, missing and unexpected keys are errors; mis-shaped keys
    always are. Returns `model`.
    """
    sd = extract_state_dict(model, state_dict, prefer=prefer)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if misshaped or (strict and (missing or unexpected)):
        lines = [f"state dict does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys: {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_format_keys(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys: {_format_keys(misshaped, 3)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects.

    `.safetensors` files go through safetensors; anything else through
    `torch.load(weights_only=True)` (tensors, dicts, lists, numbers only).
    Raises FileNotFoundError / ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors checkpoint {path}: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {path} (corrupt, or holds objects other than tensors and "
            f"plain containers, which are refused for safety): {type(e).__name__}: {e}"
        ) from e
