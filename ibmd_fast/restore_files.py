"""Restoring image files: the logic behind ``ibmd-fast sample``.

``restore_files(model, inputs, output)`` reads image files (one file, or a folder recursively;
default: held-out crops of the bundled photos, degraded as the release was trained), restores
them with a release through ``restore.restore_release`` and writes PNGs (``imageio.save_image``)
under ``output``, keeping relative names. Everything is checked before anything is written.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ibmd_fast.device import resolve_device
from ibmd_fast.imageio import save_image
from ibmd_fast.paths import DEFAULT_GENERATOR
from ibmd_fast.models.unet import check_image_size
from ibmd_fast.release import LoadedModel, load_model
from ibmd_fast.restore import SAMPLERS, check_eta, check_labels, natural_sampler, restore_release, used_eta
from ibmd_fast.data import (
    IMAGE_EXTENSIONS,
    SkimagePhotos,
    SuperResolution,
    canonical_name,
    get_degradation,
    list_images,
)
from ibmd_fast.data.folders import file_labels
from ibmd_fast.data.images import load_image, pil_to_tensor

__all__ = ["restore_files"]

Log = Optional[Callable[[str], None]]


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _default_inputs(model: LoadedModel, count: int, seed: int, degradation):
    """Held-out crops of the bundled photos, degraded as the release was trained: (names, xT, x0, mask)."""
    if degradation is None:
        raise ValueError(f"{model.path} names no degradation, so there are no default inputs; pass --input")
    size = model.image_size or 64
    photos = SkimagePhotos(size=size, split="test", n_items=count, channels=model.image_channels, seed=seed, flip=False)
    x0 = torch.stack([photos[i] for i in range(count)])
    xT, mask = degradation(x0, rng=torch.Generator().manual_seed(seed))
    names = [f"skimage-{i:03d}.png" for i in range(count)]
    return names, xT, x0, mask


def _available_bytes(device: torch.device) -> Optional[int]:
    """Memory this process can still take on ``device`` (CUDA: free memory; CPU: MemAvailable, and the
    address-space limit when one is set), or None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            found.append(int(limit))
    except (ImportError, OSError, ValueError):
        pass
    return min(found) if found else None


def batch_bytes(model: LoadedModel, count: int, height: int, width: int) -> int:
    """A lower bound on the memory one network call on ``count`` images of ``height x width`` takes: the
    input, output and the skip activations the U-Net keeps at full resolution (float32)."""
    unet = model.config.get("unet") or {}
    channels = int(unet.get("model_channels", 64))
    kept = int(unet.get("num_res_blocks", 2)) + 3  # skips of the top level, the block's input and output
    per_pixel = 4 * (channels * kept + 4 * model.image_channels)
    return int(count * height * width * per_pixel)


def check_memory(model: LoadedModel, sizes: list, upsample: int, batch_size: int, device: torch.device) -> None:
    """Refuse, with the figure, a batch that cannot fit before upsampling or restoring anything."""
    if not sizes:
        return
    height, width = max(sizes, key=lambda s: s[0] * s[1])
    count = min(batch_size, sum(1 for s in sizes if s == (height, width)))
    needed = batch_bytes(model, count, height * upsample, width * upsample)
    available = _available_bytes(device)
    if available is None or needed <= available:
        return
    gib = 2.0**30
    how = (
        f"--upsample {upsample} makes the {width}x{height} inputs {width * upsample}x{height * upsample}: "
        if upsample > 1
        else f"inputs of {width}x{height}: "
    )
    lower = (
        "lower --upsample" + (" or --batch-size" if count > 1 else "")
        if upsample > 1
        else ("lower --batch-size" if count > 1 else "use smaller inputs")
    )
    raise ValueError(
        f"{how}a batch of {count} needs at least {needed / gib:.1f} GiB on {device}, more than the "
        f"{available / gib:.1f} GiB available; {lower}"
    )


def _read_mask(path: str, height: int, width: int) -> torch.Tensor:
    """A mask image -> float [1, H, W], 1 where the pixel is bright (the hole); resized (nearest) to size."""
    try:
        image = load_image(path).convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except Exception as exc:
        raise ValueError(f"cannot read mask image {path} ({_one_line(exc)})") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.NEAREST)
    return torch.from_numpy((np.asarray(image) >= 128).astype(np.float32))[None]


def _list_inputs(path: str) -> tuple[Path, list[str]]:
    """(root, relative paths) of the input images: one file, or every image under a folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if p.is_dir():
        files = list_images(p)
        if not files:
            raise ValueError(
                f"input folder {path} contains no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return p, files
    return p.parent, [p.name]


def _read_inputs(root: Path, files: list[str], channels: int):
    """Decode the inputs; unreadable ones are skipped with one warning, none readable is an error."""
    images, bad = [], []
    for rel in files:
        try:
            images.append((rel, pil_to_tensor(load_image(root / rel), channels)))
        except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
            bad.append(f"{rel} ({type(exc).__name__}: {_one_line(exc)})")
    if not images:
        raise ValueError(f"no readable input image: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    if bad:
        shown = "; ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable input image(s): {shown}", UserWarning, stacklevel=2)
    return images, bad


def _upsampler(model: LoadedModel, factor: int):
    """Bring low-resolution inputs to size as the release's degradation did (bicubic otherwise)."""
    degradation = get_degradation(model.degradation) if str(model.degradation).startswith("sr") else None
    if isinstance(degradation, SuperResolution) and degradation.factor == factor:
        return degradation.upsample
    return SuperResolution(factor, "bicubic-aa").upsample


def restore_files(
    model: str = DEFAULT_GENERATOR,
    inputs: Optional[str] = None,
    output: str = "runs/sample",
    nfe: Optional[int] = None,
    sampler: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 8,
    eta: Optional[float] = None,
    device="auto",
    upsample: Optional[int] = None,
    mask: Optional[str] = None,
    masks: Optional[str] = None,
    num_default: int = 4,
    progress: bool = False,
    log: Log = None,
    labels: Optional[str] = None,
    class_label: Optional[int] = None,
) -> dict[str, Any]:
    """Restore corrupted images with a release and write PNGs under ``output``.

    inputs  -- an image file or a folder (recursively); each result keeps its relative name with a
               .png suffix. None: ``num_default`` held-out crops of the bundled photos, degraded as
               the release was trained; the corrupted crops go to ``output/inputs/`` and the clean
               ones to ``output/clean/`` beside the results.
    upsample-- K: inputs are low-resolution; bring them to K times their size first (the release's
               own upsampling when it is an srKx degradation, else bicubic).
    mask    -- inpainting releases: a mask image (white = hole), resized to each input; default:
               the degradation's fixed mask. The hole of each input is cleared, as in training.
    masks   -- the mask file of a free-form inpainting release's default inputs (one mask drawn
               per image from ``seed``); its own inputs need ``mask``.
    nfe, sampler, eta -- teachers only (defaults: the release's NFE, the bridge's natural sampler,
               ``DBIM_ETA``; eta for the dbim sampler only).
    labels  -- class-conditional releases: the class of each input, as ``classes:`` data gives it
               (``data.folders.file_labels``): "folders" (the input folder holds one folder per
               class, index = sorted name) or a CSV file of ``path,label`` lines (paths relative to
               the input folder). ``class_label``: one class for every image instead.
    Everything is checked before anything is written. Returns a summary dict.
    """
    dev = resolve_device(device)
    loaded = load_model(model, dev)
    if loaded.kind == "generator" and (
        sampler is not None or eta is not None or (nfe is not None and nfe != loaded.nfe)
    ):
        restore_release(loaded, torch.zeros(0), nfe, sampler, eta=eta)  # raises the explanatory error
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if loaded.kind == "teacher":
        check_eta(eta, sampler or natural_sampler(loaded.bridge_type))  # before anything is written
    name = canonical_name(loaded.degradation) if loaded.degradation else None
    inpainting = bool(name) and name.startswith("inpaint-")
    freeform = bool(name) and "freeform" in name
    if freeform and inputs is not None and mask is None:
        raise ValueError(
            f"{loaded.path} restores {name}, whose masks are drawn per image: pass --mask with the hole of your inputs"
        )
    # a free-form release's own inputs come with --mask, so its mask file is needed for default inputs only
    degradation = get_degradation(name, masks=masks) if name and (inputs is None or not freeform) else None
    if mask is not None and not inpainting:
        raise ValueError(f"--mask is for inpainting releases; {loaded.path} restores {loaded.degradation}")
    if labels is not None and class_label is not None:
        raise ValueError("give --labels or --class-label, not both")
    if labels is not None and inputs is None:
        raise ValueError("--labels names the classes of --input images; the default inputs take --class-label N")

    out_root = Path(output).expanduser()
    label_of: Optional[dict[str, int]] = None  # input -> class (class-conditional releases)
    extra_outputs = []
    drawn_masks: dict[str, torch.Tensor] = {}  # default inputs of a free-form release: the mask each was made with
    if inputs is None:
        if upsample:
            raise ValueError("--upsample applies to --input images; the default inputs are already at size")
        names, xT_all, x0_all, masks_all = _default_inputs(loaded, num_default, seed, degradation)
        items = [(name, xT_all[i]) for i, name in enumerate(names)]
        extra_outputs = [(f"inputs/{name}", xT_all[i]) for i, name in enumerate(names)]
        extra_outputs += [(f"clean/{name}", x0_all[i]) for i, name in enumerate(names)]
        if freeform:
            drawn_masks = {name: masks_all[i] for i, name in enumerate(names)}
        skipped: list[str] = []
    else:
        root, files = _list_inputs(inputs)
        if out_root.resolve() == root.resolve():
            raise ValueError(f"--output {output} is the input folder; results would overwrite the inputs")
        items, skipped = _read_inputs(root, files, loaded.image_channels)
        if labels is not None:
            read = [rel for rel, _ in items]
            label_of = dict(zip(read, file_labels(root, read, None if labels == "folders" else labels)[1]))
        check_memory(loaded, [tuple(x.shape[-2:]) for _, x in items], int(upsample or 1), batch_size, dev)
        if upsample:
            up = _upsampler(loaded, int(upsample))
            items = [(rel, up(x)) for rel, x in items]

    if class_label is not None:
        label_of = {rel: int(class_label) for rel, _ in items}
    check_labels(loaded.model, None if label_of is None else list(label_of.values()), loaded.path)

    # Output names: same relative path, .png; refuse collisions (a.jpg and a.png) before writing.
    named = []
    seen: dict[str, str] = {}
    for rel, x in items:
        out_rel = str(Path(rel).with_suffix(".png").as_posix())
        if out_rel in seen:
            raise ValueError(f"inputs {seen[out_rel]} and {rel} would both be written to {out_rel}")
        seen[out_rel] = rel
        check_image_size(
            loaded.channel_mult,
            x.shape[-2],
            x.shape[-1],
            f"input {rel}" + (f" (after --upsample {upsample})" if upsample else ""),
            loaded.network,
        )
        named.append((rel, out_rel, x))

    def mask_for(rel: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not inpainting:
            return None
        if rel in drawn_masks:
            return drawn_masks[rel]
        h, w = x.shape[-2:]
        return _read_mask(mask, h, w) if mask is not None else degradation.hole_mask(h, w)

    # Batch images of one size together.
    groups: dict[tuple, list] = {}
    for entry in named:
        groups.setdefault(tuple(entry[2].shape), []).append(entry)
    written = []
    bar = tqdm(total=len(named), desc=f"restoring ({loaded.kind})", disable=not progress, unit="image")
    results: list[tuple[str, torch.Tensor]] = []
    try:
        for shape, entries in groups.items():
            for start in range(0, len(entries), batch_size):
                chunk = entries[start : start + batch_size]
                xT = torch.stack([x for _, _, x in chunk])
                masks = [mask_for(rel, x) for rel, _, x in chunk]
                m = None if masks[0] is None else torch.stack(masks)
                if m is not None:
                    xT = xT * (1.0 - m)  # the hole carries no information, as in training
                y = None if label_of is None else torch.tensor([label_of[rel] for rel, _, _ in chunk])
                restored = restore_release(loaded, xT, nfe, sampler, m, seed + len(results), batch_size, False, eta, y)
                results.extend((out_rel, restored[i]) for i, (_, out_rel, _) in enumerate(chunk))
                bar.update(len(chunk))
    finally:
        bar.close()
    for out_rel, image in results + extra_outputs:
        path = out_root / out_rel
        save_image(image, str(path))
        written.append(str(path))
    return {
        "model": loaded.path,
        "kind": loaded.kind,
        "nfe": nfe or loaded.nfe,
        "sampler": (sampler or natural_sampler(loaded.bridge_type)) if loaded.kind == "teacher" else None,
        "eta": used_eta(loaded if loaded.kind == "teacher" else None, sampler, eta),
        "output": str(out_root),
        "restored": len(results),
        "written": written,
        "skipped": skipped,
    }
