"""Importing released I2SB, DDBM and DBIM checkpoints as ibmd-fast teacher releases.

``import_teacher(source, format, out, **overrides)`` reads a foreign checkpoint and writes an
ordinary teacher release (``ibmd_fast.release``) that ``distill``, ``sample``, ``eval`` and
``export`` take like any other. Its config records where it came from (``config["source"]``:
format, file name, SHA-256, the options read).

- ``format="i2sb"`` (NVlabs/I2SB): SOURCE is the run folder or its ``latest.pt``, with
  ``options.pkl`` beside it. ``latest.pt["net"]`` is ``Image256Net.state_dict()`` (keys
  prefixed ``diffusion_model.``); ``latest.pt["ema"]["shadow_params"]`` lists the EMA weights in
  ``net.parameters()`` order and ``weights="ema"`` lays them over the net by position, as
  ``torch_ema``'s ``copy_to`` does. The architecture is guided-diffusion's ``create_model``
  keyword arguments: ``model_kwargs`` (I2SB's ``256x256_diffusion_*_fixedsigma.pkl``, or JSON /
  YAML with the same keys), else such a pickle in the run folder, else I2SB's ImageNet-256
  configuration. The bridge is ``I2SBBridge(interval, beta_max, ot_ode, t0, T)`` with the noise
  levels computed as I2SB does, so ``predict_x0`` is I2SB's ``compute_pred_x0(step, xt, net(xt,
  step, cond))``. ``options.pkl``'s ``corrupt`` becomes the release's degradation, the operator of
  the same name (``ibmd_fast.data.i2sb_corruptions``: I2SB's own); ``mixture`` and names I2SB
  does not have are refused unless ``degradation`` is given.
- ``format="ddbm"`` (alexzhou907/DDBM, thu-ml/DiffusionBridge): SOURCE is a state-dict file
  (``*ema_0.9999_*.pt``, ``model_*.pt``, DBIM's ``*_adapted.pt``). The architecture and schedule
  come from ``model_kwargs`` (the keys of their ``create_model_and_diffusion``) or ``preset``
  (``PRESETS``: DBIM's ``scripts/args.sh`` on its ``model_and_diffusion_defaults()``).
  ``noise_schedule`` vp / ve / i2sb_cond gives ``VPBridge`` / ``VEBridge`` (with the DDBM
  preconditioning's ``sigma_data`` and ``cov_xy``) / ``I2SBBridge`` (DBIM's time ``t`` is step
  ``round((N - 1) t)``), so ``predict_x0`` is their ``KarrasDenoiser.denoise(...)[1]``.

Nothing but plain data is unpickled: tensors via ``torch.load(weights_only=True)`` (memory-mapped:
a 552M-parameter teacher imports in about twice its size), ``.pkl`` files via ``restricted_load``.
"""
from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import copyreg
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
from typing import Any, Optional

import torch

from ibmd_fast.bridges import I2SBBridge, VEBridge, VPBridge
from ibmd_fast.models.unet import UNet, attention_rates

__all__ = ["TeacherImportError", "UnsafePickleError", "PRESETS", "import_teacher", "restricted_load",
           "i2sb_degradation", "unet_kwargs", "ddbm_kwargs", "i2sb_default_kwargs"]


class TeacherImportError(ValueError):
    """A checkpoint that cannot be imported: missing files, wrong kind, wrong architecture."""


class UnsafePickleError(TeacherImportError):
    """A pickle that names a global outside the allowed plain-data set (it is never run)."""


# ----------------------------------------------------------------------------
# Plain-data pickles (options.pkl, *_fixedsigma.pkl)

_PATHS = ("Path", "PosixPath", "PurePath", "PurePosixPath")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("argparse", "Namespace"): argparse.Namespace,
    **{(m, n): getattr(pathlib, n) for m in ("pathlib", "pathlib._local") for n in _PATHS},
    # Windows paths cannot be instantiated on POSIX; their pure form keeps the text
    **{(m, n): pathlib.PureWindowsPath for m in ("pathlib", "pathlib._local")
       for n in ("WindowsPath", "PureWindowsPath")},
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
                "paths and builtin containers/scalars are allowed; nothing in the file was run)")
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


def _plain(value: Any) -> Any:
    """Options as JSON-safe data: Namespace -> dict, paths -> str, sets -> sorted lists."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _read_kwargs(path: str) -> dict[str, Any]:
    """``create_model`` keyword arguments from a plain-data pickle, JSON or YAML file."""
    if str(path).endswith(".pkl"):
        kwargs = _plain(restricted_load(path))
    else:
        from ibmd_fast.config_io import load_config_file

        kwargs = load_config_file(path)
    if not isinstance(kwargs, dict):
        raise TeacherImportError(f"{path} holds a {type(kwargs).__name__}, expected a mapping of model keywords")
    return kwargs


# ----------------------------------------------------------------------------
# Architecture: guided-diffusion / DDBM create_model keywords -> UNet keywords

_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                 64: (1, 2, 3, 4), 32: (1, 2, 3, 4)}


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
        image_size=size, in_channels=in_channels, model_channels=int(kw["num_channels"]),
        out_channels=out_channels, num_res_blocks=int(kw["num_res_blocks"]),
        attention_resolutions=attention_rates(size, resolutions), dropout=float(kw.get("dropout", 0.0)),
        channel_mult=_channel_mult(kw.get("channel_mult", ""), size),
        num_classes=1000 if kw.get("class_cond", False) else None,
        num_heads=int(kw.get("num_heads", 1)), num_head_channels=int(kw.get("num_head_channels", -1)),
        num_heads_upsample=int(kw.get("num_heads_upsample", -1)),
        use_scale_shift_norm=bool(kw.get("use_scale_shift_norm", False)),
        resblock_updown=bool(kw.get("resblock_updown", False)),
        use_new_attention_order=bool(kw.get("use_new_attention_order", False)),
    )


def i2sb_default_kwargs(cond: bool) -> dict[str, Any]:
    """I2SB's ImageNet-256 network (its ``ckpt_util.create_argparser`` with learn_sigma off)."""
    return dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=False,
                class_cond=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
                use_new_attention_order=False, in_channels=6 if cond else 3)


# DiffusionBridge's model_and_diffusion_defaults() (the model and schedule keys)
DBIM_DEFAULTS: dict[str, Any] = dict(
    sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, beta_d=2.0, beta_min=0.1, beta_max=1.0, cov_xy=0.0,
    image_size=64, in_channels=3, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=64, attention_resolutions="32,16,8", channel_mult="", dropout=0.0, class_cond=False,
    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, condition_mode=None,
    noise_schedule="ve",
)
_VP = dict(noise_schedule="vp", beta_d=2.0, beta_min=0.1, sigma_max=1.0, sigma_min=1e-4)
# DiffusionBridge scripts/args.sh, on top of DBIM_DEFAULTS
PRESETS: dict[str, dict[str, Any]] = {
    "e2h": dict(image_size=64, num_channels=192, num_res_blocks=3, use_new_attention_order=True, dropout=0.1,
                class_cond=False, condition_mode="concat", degradation="sketch", data_layout="edges2handbags",
                **_VP),
    "diode": dict(image_size=256, num_channels=256, num_res_blocks=2, use_new_attention_order=True, dropout=0.1,
                  class_cond=False, condition_mode="concat", data_layout="diode", **_VP),
    "imagenet-inpaint": dict(image_size=256, num_channels=256, num_res_blocks=2, use_new_attention_order=False,
                             dropout=0.0, class_cond=True, condition_mode="concat", noise_schedule="i2sb_cond",
                             beta_max=1.0, beta_min=0.1, sigma_max=1.0, sigma_min=1e-4,
                             degradation="inpaint-center"),
}
# DDBM / DBIM keys that do not change the network or the x0 prediction
_IGNORED = {"use_fp16", "use_checkpoint", "unet_type", "weight_schedule", "rho", "loss_norm"}
# data_layout: the paired folder layout the teacher was trained on (ibmd_fast.data.layouts), recorded in the
# release so that distill reads a bare --data DIR that way
_DDBM_KEYS = set(DBIM_DEFAULTS) | _IGNORED | {"pred_mode", "attention_type", "learn_sigma", "degradation",
                                              "data_layout"}


def ddbm_kwargs(preset: Optional[str], path: Optional[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """DBIM defaults < preset < ``--model-kwargs`` file < overrides; DDBM's ``pred_mode`` and
    ``attention_type="flash"`` (its new-order attention) are translated."""
    if preset is None and path is None:
        raise TeacherImportError("DDBM/DBIM checkpoints do not record their architecture: pass --model-kwargs FILE "
                                 f"or --preset {'|'.join(PRESETS)}")
    kw = dict(DBIM_DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise TeacherImportError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        kw.update(PRESETS[preset])
    if path is not None:
        given = _read_kwargs(path)
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
            raise TeacherImportError(f"the DDBM VP schedule is pinned at T = 1; sigma_max={kw['sigma_max']} "
                                     "would sample a different bridge")
        return VPBridge(beta_min=float(kw["beta_min"]), beta_d=float(kw["beta_d"]), t_min=float(kw["sigma_min"]),
                        t_max=1.0, sigma_data=sd, cov_xy=cov)
    if schedule == "ve":
        return VEBridge(sigma_max=float(kw["sigma_max"]), sigma_min=float(kw["sigma_min"]), sigma_data=sd, cov_xy=cov)
    if schedule.startswith("i2sb"):
        # DBIM's I2SBNoiseSchedule: linspace(sqrt(beta_min/N), sqrt(beta_max/N), N)^2 with N = 1000; ours
        # starts at 1e-4, which is beta_min = 0.1
        if abs(float(kw["beta_min"]) / 1000 - 1e-4) > 1e-12:
            raise TeacherImportError(f"i2sb_cond with beta_min={kw['beta_min']} is not supported (only 0.1)")
        return I2SBBridge(n_steps=1000, beta_max=float(kw["beta_max"]), float32_levels=True)
    raise TeacherImportError(f"unknown noise_schedule {schedule!r}; expected vp, ve or i2sb_cond")


# ----------------------------------------------------------------------------
# Weights


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # an old (non-zip) file cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TeacherImportError(f"{path}: refusing to load objects other than tensors and plain containers "
                                 f"({_first_line(exc)})") from None
    except Exception as exc:
        raise TeacherImportError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _strip(sd: dict[str, Any], prefixes=("module.", "_orig_mod.", "diffusion_model.")) -> dict[str, Any]:
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _fit(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Cast to float32 and reshape squeezed 1-d attention convs; name the first key that does not fit."""
    out = {}
    for key, want in expected.items():
        if key not in sd:
            raise TeacherImportError(f"{what} does not fit the architecture: key {key!r} (model shape "
                                     f"{tuple(want.shape)}) is missing from the checkpoint")
        value = sd[key]
        if not isinstance(value, torch.Tensor):
            raise TeacherImportError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(want.shape) and value.numel() == want.numel() and want.dim() == 3 \
                and want.shape[-1] == 1 and tuple(value.shape[:2]) == tuple(want.shape[:2]):
            value = value.reshape(want.shape)  # DDBM's 2-d [O, I, 1, 1] or squeezed [O, I] attention convs
        if tuple(value.shape) != tuple(want.shape):
            raise TeacherImportError(f"{what} does not fit the architecture: first mismatched key {key!r}: "
                                     f"checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
        out[key] = value.float() if value.is_floating_point() else value
    extra = [k for k in sd if k not in expected]
    if extra:
        raise TeacherImportError(f"{what} does not fit the architecture: checkpoint key {extra[0]!r} is not in "
                                 f"the model ({len(extra)} such keys)")
    return out


def _load_net(kwargs: dict[str, Any], sd: dict[str, torch.Tensor], what: str,
              shadow: Optional[list] = None) -> UNet:
    """The U-Net holding ``sd`` (optionally with ``shadow`` laid over its parameters by position)
    without a second copy: built on the meta device, the (memory-mapped) tensors assigned."""
    with torch.device("meta"):
        net = UNet(**kwargs)
    expected = net.state_dict()
    sd = _fit(_strip(dict(sd)), expected, what)
    if shadow is not None:
        names = [n for n, _ in net.named_parameters()]
        if len(shadow) != len(names):
            raise TeacherImportError(f"{what}: the EMA holds {len(shadow)} shadow parameters, the architecture "
                                     f"has {len(names)} parameters")
        sd.update(_fit(dict(zip(names, shadow)), {n: expected[n] for n in names}, f"{what} (EMA)"))
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def _refuse_release_or_onnx(path: str) -> None:
    if path.endswith(".onnx"):
        raise TeacherImportError(f"{path} is an ONNX model (an exported student); import-teacher takes an "
                                 "I2SB run folder or a DDBM/DBIM checkpoint")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                fmt = (fh.metadata() or {}).get("format")
        except Exception:
            fmt = None
        if fmt == "ibmd_fast.generator":
            raise TeacherImportError(f"{path} is an ibmd-fast generator release (a distilled student), not a "
                                     "teacher checkpoint")
        if fmt == "ibmd_fast.teacher":
            raise TeacherImportError(f"{path} is already an ibmd-fast teacher release: pass it to distill directly")


# ----------------------------------------------------------------------------
# The two formats


# I2SB's corruption names (corruption/__init__.py build_corruption), each the operator of the same name
# in ibmd_fast.data (i2sb_corruptions: DDRM's operators, exactly)
_I2SB_CORRUPT = re.compile(
    r"^(sr4x-(pool|bicubic)|jpeg-\d+|blur-(uni|gauss)|inpaint-(center|freeform1020|freeform2030))$")


def i2sb_degradation(corrupt: Any) -> str:
    """The degradation an I2SB run's ``opt.corrupt`` names; anything else is refused in one line."""
    text = str(corrupt)
    if text == "mixture":
        raise TeacherImportError(
            "options.pkl says corrupt='mixture': I2SB trained this network on nine corruptions drawn at random per "
            "image (corruption/mixture.py), so there is no single operator to distill on; pass --degradation NAME "
            "to distill it on one of them")
    known = _I2SB_CORRUPT.match(text)
    if not known or (text.startswith("jpeg-") and not 1 <= int(text[len("jpeg-"):]) <= 100):
        raise TeacherImportError(f"options.pkl says corrupt={text!r}, which is not one of I2SB's corruptions "
                                 "(sr4x-pool|bicubic, jpeg-<q>, blur-uni|gauss, inpaint-center|freeform1020|"
                                 "freeform2030); pass --degradation NAME")
    from ibmd_fast.data import canonical_name

    return canonical_name(text)


def _read_i2sb(source: str, model_kwargs: Optional[str], weights: str, overrides: dict[str, Any]):
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    ckpt = os.path.join(folder, "latest.pt") if os.path.isdir(source) else source
    _refuse_release_or_onnx(ckpt)
    if not os.path.isfile(ckpt):
        raise TeacherImportError(f"I2SB run folder {folder} has no latest.pt")
    options_path = os.path.join(folder, "options.pkl")
    if not os.path.isfile(options_path):
        raise TeacherImportError(f"no options.pkl beside {ckpt} (I2SB writes it into the run folder)")
    options = _plain(restricted_load(options_path))
    if not isinstance(options, dict):
        raise TeacherImportError(f"{options_path} holds a {type(options).__name__}, not I2SB's options Namespace")
    overrides = dict(overrides)
    size = overrides.pop("image_size", None)
    known = ("interval", "beta_max", "t0", "T", "ot_ode", "cond_x1")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TeacherImportError(f"unknown I2SB setting(s) {unknown}; known: {list(known)}")
    opt = {**dict(interval=1000, beta_max=0.3, t0=1e-4, T=1.0, ot_ode=False, cond_x1=False),
           **{k: options[k] for k in known if k in options}, **overrides}
    cond = bool(opt["cond_x1"])
    pkl = os.path.join(folder, f"256x256_diffusion_{'cond' if cond else 'uncond'}_fixedsigma.pkl")
    kw_source = model_kwargs or (pkl if os.path.isfile(pkl) else None)
    kw = _read_kwargs(kw_source) if kw_source else i2sb_default_kwargs(cond)
    kw = {**kw, "image_size": int(size or kw.get("image_size") or options.get("image_size", 256))}
    if kw.get("learn_sigma"):  # I2SB's released pickles set it False
        raise TeacherImportError("learn_sigma=True: an I2SB network outputs 3 channels")
    in_channels = int(kw.get("in_channels", 3))
    if in_channels != (6 if cond else 3):
        raise TeacherImportError(f"options say cond_x1={cond} but the network takes {in_channels} input channels")
    bridge = I2SBBridge(n_steps=int(opt["interval"]), beta_max=float(opt["beta_max"]), ot_ode=bool(opt["ot_ode"]),
                        t0=float(opt["t0"]), T=float(opt["T"]), float32_levels=True)
    checkpoint = _torch_load(ckpt)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("net"), dict):
        raise TeacherImportError(f"{ckpt} is not an I2SB checkpoint (expected a dict with 'net' and 'ema')")
    shadow = None
    if weights == "ema":
        ema = checkpoint.get("ema")
        if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
            raise TeacherImportError(f"{ckpt} has no EMA shadow_params; pass --weights raw for the plain net")
        shadow = list(ema["shadow_params"])
    net = _load_net(unet_kwargs(kw, in_channels, 3), checkpoint["net"], ckpt, shadow)
    info = dict(options=options, model_kwargs=_plain(kw), model_kwargs_file=kw_source and os.path.basename(kw_source))
    degradation = options.get("corrupt")
    return ckpt, net, bridge, cond, degradation, int(size or options.get("image_size", kw["image_size"])), info


def _read_ddbm(source: str, model_kwargs: Optional[str], preset: Optional[str], overrides: dict[str, Any]):
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
        from safetensors.torch import load_file

        state = load_file(source)
    else:
        state = _torch_load(source)
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("ema", "model", "state_dict", "net"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise TeacherImportError(f"{source} holds a {type(state).__name__}, expected a state dict")
    net = _load_net(unet_kwargs(kw, channels * (2 if cond else 1), channels), state, source)
    info = dict(model_kwargs=_plain(kw), preset=preset, model_kwargs_file=model_kwargs and os.path.basename(model_kwargs))
    return source, net, bridge, cond, kw.get("degradation"), int(kw["image_size"]), info, channels


def import_teacher(source: str | os.PathLike, format: str, out: str | os.PathLike, *,
                   model_kwargs: Optional[str] = None, weights: str = "ema", degradation: Optional[str] = None,
                   image_size: Optional[int] = None, preset: Optional[str] = None, label: Optional[int] = None,
                   nfe: Optional[int] = None, **overrides) -> dict[str, Any]:
    """Import a released checkpoint (``format`` "i2sb" or "ddbm") into the teacher release ``out``.

    ``overrides`` replace what the source says: I2SB options (``interval``, ``beta_max``, ``t0``,
    ``T``, ``ot_ode``, ``cond_x1``) or DDBM keys (``noise_schedule``, ``sigma_data``, ``cov_xy``,
    ``sigma_min``, ``sigma_max``, ``beta_d``, ``beta_min``, ``beta_max``, ...). ``label`` is the
    class a class-conditional teacher samples with. Returns the release config.
    """
    from ibmd_fast.data import canonical_name
    from ibmd_fast.release import TEACHER_FORMAT, save_release
    from ibmd_fast.restore import default_teacher_nfe

    source, out = os.fspath(source), os.fspath(out)
    if not os.path.exists(source):
        raise TeacherImportError(f"source not found: {source}")
    if os.path.isfile(source):
        _refuse_release_or_onnx(source)
    if weights not in ("ema", "raw"):
        raise TeacherImportError(f"weights must be 'ema' or 'raw', got {weights!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if image_size:
        overrides["image_size"] = int(image_size)
    channels = 3
    if format == "i2sb":
        if preset is not None:
            raise TeacherImportError("--preset is for --format ddbm; I2SB run folders carry their options")
        ckpt, net, bridge, cond, found_deg, size, info = _read_i2sb(source, model_kwargs, weights, overrides)
    elif format == "ddbm":
        ckpt, net, bridge, cond, found_deg, size, info, channels = _read_ddbm(source, model_kwargs, preset, overrides)
    else:
        raise TeacherImportError(f"unknown format {format!r}; expected i2sb or ddbm")
    if os.path.abspath(out) == os.path.abspath(ckpt):
        raise TeacherImportError(f"--out {out} is the source checkpoint itself")
    if label is not None and net.num_classes is None:
        raise TeacherImportError("--label given, but the network is not class-conditional")
    if label is not None and not 0 <= int(label) < net.num_classes:
        raise TeacherImportError(f"--label must be in [0, {net.num_classes}), got {label}")

    config: dict[str, Any] = {"unet": net.config, "conditional": cond, "bridge": bridge.config(),
                              "nfe": int(nfe or default_teacher_nfe(bridge)), "image_size": size, "channels": channels}
    if degradation:
        config["degradation"] = canonical_name(degradation)
    elif found_deg and format == "i2sb":
        config["degradation"] = i2sb_degradation(found_deg)
    elif found_deg:
        try:
            config["degradation"] = canonical_name(found_deg)
        except (KeyError, ValueError):
            pass  # the source's own word may name a task with no operator here (DDBM's e2h, diode)
    layout = info.get("model_kwargs", {}).get("data_layout")
    if layout:
        config["data_layout"] = layout
    if net.num_classes is not None:
        config["class_label"] = None if label is None else int(label)
    config["source"] = {"format": format, "file": os.path.basename(ckpt), "sha256": _sha256(ckpt),
                        "weights": weights if format == "i2sb" else "as stored", **info}
    json.dumps(config)  # fail here, not half-way through writing, if something is not plain data
    save_release(out, net, TEACHER_FORMAT, config, extra={"imported_from": os.path.abspath(ckpt)})
    return config
