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

The package: ``unpickle`` (the restricted unpickler, ``UnsafePickleError``), ``weights`` (what both
formats share: ``ImportedNet``, U-Net keywords, loading weights by name and shape), ``i2sb`` and
``ddbm`` (one reader per source, each returning an ``ImportedNet``); ``import_teacher`` here writes
the release.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ibmd_fast.data import canonical_name
from ibmd_fast.importers.ddbm import PRESETS, read_ddbm
from ibmd_fast.importers.i2sb import i2sb_degradation, read_i2sb
from ibmd_fast.importers.unpickle import TeacherImportError, UnsafePickleError
from ibmd_fast.importers.weights import ImportedNet, refuse_release_or_onnx, sha256
from ibmd_fast.release import TEACHER_FORMAT, save_release
from ibmd_fast.restore import default_teacher_nfe

# the package's public API: the entry point, what it returns inside, and the errors it raises
__all__ = ["import_teacher", "ImportedNet", "TeacherImportError", "UnsafePickleError", "PRESETS"]


def import_teacher(
    source: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    model_kwargs: Optional[str] = None,
    weights: str = "ema",
    degradation: Optional[str] = None,
    image_size: Optional[int] = None,
    preset: Optional[str] = None,
    label: Optional[int] = None,
    nfe: Optional[int] = None,
    **overrides,
) -> dict[str, Any]:
    """Import a released checkpoint (``format`` "i2sb" or "ddbm") into the teacher release ``out``.

    ``overrides`` replace what the source says: I2SB options (``interval``, ``beta_max``, ``t0``,
    ``T``, ``ot_ode``, ``cond_x1``) or DDBM keys (``noise_schedule``, ``sigma_data``, ``cov_xy``,
    ``sigma_min``, ``sigma_max``, ``beta_d``, ``beta_min``, ``beta_max``, ...). ``label`` is the
    class a class-conditional teacher samples with. Returns the release config.
    """
    source, out = os.fspath(source), os.fspath(out)
    if not os.path.exists(source):
        raise TeacherImportError(f"source not found: {source}")
    if os.path.isfile(source):
        refuse_release_or_onnx(source)
    if weights not in ("ema", "raw"):
        raise TeacherImportError(f"weights must be 'ema' or 'raw', got {weights!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if image_size:
        overrides["image_size"] = int(image_size)
    if format == "i2sb":
        if preset is not None:
            raise TeacherImportError("--preset is for --format ddbm; I2SB run folders carry their options")
        imported = read_i2sb(source, model_kwargs, weights, overrides)
    elif format == "ddbm":
        imported = read_ddbm(source, model_kwargs, preset, overrides)
    else:
        raise TeacherImportError(f"unknown format {format!r}; expected i2sb or ddbm")
    ckpt, net, found_deg, info = imported.checkpoint, imported.net, imported.degradation, imported.info
    if os.path.abspath(out) == os.path.abspath(ckpt):
        raise TeacherImportError(f"--out {out} is the source checkpoint itself")
    if label is not None and net.num_classes is None:
        raise TeacherImportError("--label given, but the network is not class-conditional")
    if label is not None and not 0 <= int(label) < net.num_classes:
        raise TeacherImportError(f"--label must be in [0, {net.num_classes}), got {label}")

    config: dict[str, Any] = {
        "unet": net.config,
        "conditional": imported.conditional,
        "bridge": imported.bridge.config(),
        "nfe": int(nfe or default_teacher_nfe(imported.bridge)),
        "image_size": imported.image_size,
        "channels": imported.channels,
    }
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
    config["source"] = {
        "format": format,
        "file": os.path.basename(ckpt),
        "sha256": sha256(ckpt),
        "weights": weights if format == "i2sb" else "as stored",
        **info,
    }
    json.dumps(config)  # fail here, not half-way through writing, if something is not plain data
    save_release(out, net, TEACHER_FORMAT, config, extra={"imported_from": os.path.abspath(ckpt)})
    return config
