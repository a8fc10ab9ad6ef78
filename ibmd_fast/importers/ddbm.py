"""alexzhou907/DDBM and thu-ml/DiffusionBridge (DBIM) state-dict files as an ``ImportedNet``.

The files do not record their architecture or schedule: they come from ``model_kwargs`` (the keys
of their ``create_model_and_diffusion``) or a ``preset`` (``PRESETS``: DBIM's ``scripts/args.sh``
on its ``model_and_diffusion_defaults()``). ``noise_schedule`` vp / ve / i2sb_cond gives
``VPBridge`` / ``VEBridge`` (with the DDBM preconditioning's ``sigma_data`` and ``cov_xy``) /
``I2SBBridge`` (DBIM's time ``t`` is step ``round((N - 1) t)``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from ibmd_fast.bridges import I2SBBridge, VEBridge, VPBridge
from ibmd_fast.importers.unpickle import TeacherImportError, plain, read_kwargs
from ibmd_fast.importers.weights import ImportedNet, load_net, torch_load, unet_kwargs

__all__ = ["DBIM_DEFAULTS", "PRESETS", "ddbm_kwargs", "ddbm_bridge", "read_ddbm"]


# DiffusionBridge's model_and_diffusion_defaults() (the model and schedule keys)
DBIM_DEFAULTS: dict[str, Any] = dict(
    sigma_data=0.5,
    sigma_min=0.002,
    sigma_max=80.0,
    beta_d=2.0,
    beta_min=0.1,
    beta_max=1.0,
    cov_xy=0.0,
    image_size=64,
    in_channels=3,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=64,
    attention_resolutions="32,16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
    condition_mode=None,
    noise_schedule="ve",
)
_VP = dict(noise_schedule="vp", beta_d=2.0, beta_min=0.1, sigma_max=1.0, sigma_min=1e-4)
# DiffusionBridge scripts/args.sh, on top of DBIM_DEFAULTS
PRESETS: dict[str, dict[str, Any]] = {
    "e2h": dict(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        use_new_attention_order=True,
        dropout=0.1,
        class_cond=False,
        condition_mode="concat",
        degradation="sketch",
        data_layout="edges2handbags",
        **_VP,
    ),
    "diode": dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        use_new_attention_order=True,
        dropout=0.1,
        class_cond=False,
        condition_mode="concat",
        data_layout="diode",
        **_VP,
    ),
    "imagenet-inpaint": dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        use_new_attention_order=False,
        dropout=0.0,
        class_cond=True,
        condition_mode="concat",
        noise_schedule="i2sb_cond",
        beta_max=1.0,
        beta_min=0.1,
        sigma_max=1.0,
        sigma_min=1e-4,
        degradation="inpaint-center",
    ),
}
# DDBM / DBIM keys that do not change the network or the x0 prediction
_IGNORED = {"use_fp16", "use_checkpoint", "unet_type", "weight_schedule", "rho", "loss_norm"}
# data_layout: the paired folder layout the teacher was trained on (ibmd_fast.data.layouts), recorded in the
# release so that distill reads a bare --data DIR that way
_DDBM_KEYS = (
    set(DBIM_DEFAULTS) | _IGNORED | {"pred_mode", "attention_type", "learn_sigma", "degradation", "data_layout"}
)


def ddbm_kwargs(preset: Optional[str], path: Optional[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """DBIM defaults < preset < ``--model-kwargs`` file < overrides; DDBM's ``pred_mode`` and
    ``attention_type="flash"`` (its new-order attention) are translated."""
    if preset is None and path is None:
        raise TeacherImportError(
            "DDBM/DBIM checkpoints do not record their architecture: pass --model-kwargs FILE "
            f"or --preset {'|'.join(PRESETS)}"
        )
    kw = dict(DBIM_DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise TeacherImportError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        kw.update(PRESETS[preset])
    if path is not None:
        given = read_kwargs(path)
        if "pred_mode" in given:  # alexzhou907/DDBM's name for the schedule
            given.setdefault("noise_schedule", given["pred_mode"])
        if given.get("attention_type") == "flash":  # DDBM's flash attention splits q, k, v first
            given.setdefault("use_new_attention_order", True)
        kw.update({k: v for k, v in given.items() if k in _DDBM_KEYS})
    unknown = sorted(set(overrides) - _DDBM_KEYS)
    if unknown:
        raise TeacherImportError(f"unknown DDBM setting(s) {unknown}; known: {sorted(_DDBM_KEYS - _IGNORED)}")
    kw.update(overrides)
    if kw.get("learn_sigma"):
        raise TeacherImportError("learn_sigma=True is not a DDBM bridge model (its x0 prediction has 3 channels)")
    return kw


def ddbm_bridge(kw: dict[str, Any]):
    """The bridge of a DDBM / DBIM ``noise_schedule`` (their ``create_model_and_diffusion``)."""
    schedule = str(kw.get("noise_schedule"))
    sd, cov = float(kw["sigma_data"]), float(kw["cov_xy"])
    if schedule.startswith("vp") and not schedule.endswith("_simple"):
        if float(kw["sigma_max"]) != 1.0:
            raise TeacherImportError(
                f"the DDBM VP schedule is pinned at T = 1; sigma_max={kw['sigma_max']} would sample a different bridge"
            )
        return VPBridge(
            beta_min=float(kw["beta_min"]),
            beta_d=float(kw["beta_d"]),
            t_min=float(kw["sigma_min"]),
            t_max=1.0,
            sigma_data=sd,
            cov_xy=cov,
        )
    if schedule == "ve":
        return VEBridge(sigma_max=float(kw["sigma_max"]), sigma_min=float(kw["sigma_min"]), sigma_data=sd, cov_xy=cov)
    if schedule.startswith("i2sb"):
        # DBIM's I2SBNoiseSchedule: linspace(sqrt(beta_min/N), sqrt(beta_max/N), N)^2 with N = 1000; ours
        # starts at 1e-4, which is beta_min = 0.1
        if abs(float(kw["beta_min"]) / 1000 - 1e-4) > 1e-12:
            raise TeacherImportError(f"i2sb_cond with beta_min={kw['beta_min']} is not supported (only 0.1)")
        return I2SBBridge(n_steps=1000, beta_max=float(kw["beta_max"]), float32_levels=True)
    raise TeacherImportError(f"unknown noise_schedule {schedule!r}; expected vp, ve or i2sb_cond")


def read_ddbm(
    source: str, model_kwargs: Optional[str], preset: Optional[str], overrides: dict[str, Any]
) -> ImportedNet:
    """The network and bridge of a DDBM / DBIM state-dict file, described by ``preset`` or ``model_kwargs``."""
    if os.path.isdir(source):
        raise TeacherImportError(f"{source} is a folder; --format ddbm takes a state-dict file (*ema_0.9999_*.pt)")
    if not os.path.isfile(source):
        raise TeacherImportError(f"checkpoint file not found: {source}")
    overrides = dict(overrides)
    size = overrides.pop("image_size", None)
    kw = ddbm_kwargs(preset, model_kwargs, overrides)
    if size:
        kw["image_size"] = int(size)
    bridge = ddbm_bridge(kw)
    mode = kw.get("condition_mode")
    if mode not in (None, "concat"):
        raise TeacherImportError(f"condition_mode {mode!r} is not supported (only concat or none)")
    cond = mode == "concat"
    channels = int(kw["in_channels"])
    if source.endswith(".safetensors"):
        state = load_file(source)
    else:
        state = torch_load(source)
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("ema", "model", "state_dict", "net"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise TeacherImportError(f"{source} holds a {type(state).__name__}, expected a state dict")
    net = load_net(unet_kwargs(kw, channels * (2 if cond else 1), channels), state, source)
    info = dict(
        model_kwargs=plain(kw), preset=preset, model_kwargs_file=model_kwargs and os.path.basename(model_kwargs)
    )
    return ImportedNet(
        checkpoint=source,
        net=net,
        bridge=bridge,
        conditional=cond,
        image_size=int(kw["image_size"]),
        channels=channels,
        degradation=kw.get("degradation"),
        info=info,
    )
