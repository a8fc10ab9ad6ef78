"""NVlabs/I2SB run folders (``latest.pt`` with ``options.pkl`` beside it) as an ``ImportedNet``.

``latest.pt["net"]`` is ``Image256Net.state_dict()`` (keys prefixed ``diffusion_model.``);
``latest.pt["ema"]["shadow_params"]`` lists the EMA weights in ``net.parameters()`` order and
``weights="ema"`` lays them over the net by position, as ``torch_ema``'s ``copy_to`` does. The
architecture is guided-diffusion's ``create_model`` keyword arguments: ``model_kwargs``, else
such a pickle in the run folder, else I2SB's ImageNet-256 configuration (``i2sb_default_kwargs``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from ibmd_fast.bridges import I2SBBridge
from ibmd_fast.data import canonical_name
from ibmd_fast.importers.unpickle import TeacherImportError, plain, read_kwargs, restricted_load
from ibmd_fast.importers.weights import ImportedNet, load_net, refuse_release_or_onnx, torch_load, unet_kwargs

__all__ = ["i2sb_default_kwargs", "i2sb_degradation", "read_i2sb"]


def i2sb_default_kwargs(cond: bool) -> dict[str, Any]:
    """I2SB's ImageNet-256 network (its ``ckpt_util.create_argparser`` with learn_sigma off)."""
    return dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult="",
        learn_sigma=False,
        class_cond=False,
        attention_resolutions="32,16,8",
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        dropout=0.0,
        resblock_updown=True,
        use_new_attention_order=False,
        in_channels=6 if cond else 3,
    )


# I2SB's corruption names (corruption/__init__.py build_corruption), each the operator of the same name
# in ibmd_fast.data (i2sb_corruptions: DDRM's operators, exactly)
_I2SB_CORRUPT = re.compile(
    r"^(sr4x-(pool|bicubic)|jpeg-\d+|blur-(uni|gauss)|inpaint-(center|freeform1020|freeform2030))$"
)


def i2sb_degradation(corrupt: Any) -> str:
    """The degradation an I2SB run's ``opt.corrupt`` names; anything else is refused in one line."""
    text = str(corrupt)
    if text == "mixture":
        raise TeacherImportError(
            "options.pkl says corrupt='mixture': I2SB trained this network on nine corruptions drawn at random per "
            "image (corruption/mixture.py), so there is no single operator to distill on; pass --degradation NAME "
            "to distill it on one of them"
        )
    known = _I2SB_CORRUPT.match(text)
    if not known or (text.startswith("jpeg-") and not 1 <= int(text[len("jpeg-") :]) <= 100):
        raise TeacherImportError(
            f"options.pkl says corrupt={text!r}, which is not one of I2SB's corruptions "
            "(sr4x-pool|bicubic, jpeg-<q>, blur-uni|gauss, inpaint-center|freeform1020|"
            "freeform2030); pass --degradation NAME"
        )
    return canonical_name(text)


def read_i2sb(source: str, model_kwargs: Optional[str], weights: str, overrides: dict[str, Any]) -> ImportedNet:
    """The network, bridge and options of an I2SB run folder (or its ``latest.pt``)."""
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    ckpt = os.path.join(folder, "latest.pt") if os.path.isdir(source) else source
    refuse_release_or_onnx(ckpt)
    if not os.path.isfile(ckpt):
        raise TeacherImportError(f"I2SB run folder {folder} has no latest.pt")
    options_path = os.path.join(folder, "options.pkl")
    if not os.path.isfile(options_path):
        raise TeacherImportError(f"no options.pkl beside {ckpt} (I2SB writes it into the run folder)")
    options = plain(restricted_load(options_path))
    if not isinstance(options, dict):
        raise TeacherImportError(f"{options_path} holds a {type(options).__name__}, not I2SB's options Namespace")
    overrides = dict(overrides)
    size = overrides.pop("image_size", None)
    known = ("interval", "beta_max", "t0", "T", "ot_ode", "cond_x1")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TeacherImportError(f"unknown I2SB setting(s) {unknown}; known: {list(known)}")
    opt = {
        **dict(interval=1000, beta_max=0.3, t0=1e-4, T=1.0, ot_ode=False, cond_x1=False),
        **{k: options[k] for k in known if k in options},
        **overrides,
    }
    cond = bool(opt["cond_x1"])
    pkl = os.path.join(folder, f"256x256_diffusion_{'cond' if cond else 'uncond'}_fixedsigma.pkl")
    kw_source = model_kwargs or (pkl if os.path.isfile(pkl) else None)
    kw = read_kwargs(kw_source) if kw_source else i2sb_default_kwargs(cond)
    kw = {**kw, "image_size": int(size or kw.get("image_size") or options.get("image_size", 256))}
    if kw.get("learn_sigma"):  # I2SB's released pickles set it False
        raise TeacherImportError("learn_sigma=True: an I2SB network outputs 3 channels")
    in_channels = int(kw.get("in_channels", 3))
    if in_channels != (6 if cond else 3):
        raise TeacherImportError(f"options say cond_x1={cond} but the network takes {in_channels} input channels")
    bridge = I2SBBridge(
        n_steps=int(opt["interval"]),
        beta_max=float(opt["beta_max"]),
        ot_ode=bool(opt["ot_ode"]),
        t0=float(opt["t0"]),
        T=float(opt["T"]),
        float32_levels=True,
    )
    checkpoint = torch_load(ckpt)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("net"), dict):
        raise TeacherImportError(f"{ckpt} is not an I2SB checkpoint (expected a dict with 'net' and 'ema')")
    shadow = None
    if weights == "ema":
        ema = checkpoint.get("ema")
        if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
            raise TeacherImportError(f"{ckpt} has no EMA shadow_params; pass --weights raw for the plain net")
        shadow = list(ema["shadow_params"])
    net = load_net(unet_kwargs(kw, in_channels, 3), checkpoint["net"], ckpt, shadow)
    info = dict(options=options, model_kwargs=plain(kw), model_kwargs_file=kw_source and os.path.basename(kw_source))
    return ImportedNet(
        checkpoint=ckpt,
        net=net,
        bridge=bridge,
        conditional=cond,
        image_size=int(size or options.get("image_size", kw["image_size"])),
        channels=3,
        degradation=options.get("corrupt"),
        info=info,
    )
