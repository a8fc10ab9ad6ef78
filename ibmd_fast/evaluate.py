"""Measuring released models as in the paper (MATH.md 7): the logic behind ``ibmd-fast eval`` and
``train-classifier``, as functions that benchmarks and paper scripts reuse.

- ``evaluate(...)``: teacher at several NFE and student against clean images: PSNR, SSIM, FID on
  classifier features, CA (when labels exist), seconds per image; writes ``eval.json`` and
  ``eval-grid.png``; ``format_table`` prints its rows.
- ``load_eval_data(...)``: the held-out test items as tensors.
- ``fit_classifier(...)`` / ``get_classifier(...)``: the feature classifier of FID/CA: the one that
  ships for the embedded default's data, else one trained on a data set's clean training split (and
  cached beside the evaluation); ``classifier_line`` says which, with its held-out accuracy.

Restoring is ``ibmd_fast.restore`` (and ``restore_files`` for image files), loading releases
``ibmd_fast.release``, pictures ``ibmd_fast.imageio``. Images are float32 ``[B, C, H, W]`` in [-1, 1]. Errors
the user can fix are raised as ValueError / FileNotFoundError / ReleaseError with one-line
messages.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ibmd_fast import __version__, paper_metrics
from ibmd_fast.classifier import (
    Classifier,
    describe_classifier,
    load_classifier,
    save_classifier,
    top1_fraction,
    train_classifier,
)
from ibmd_fast.data import collate, get_degradation, make_dataset, make_source
from ibmd_fast.data.folders import ImageFolder
from ibmd_fast.data.layouts import LAYOUTS
from ibmd_fast.device import resolve_device
from ibmd_fast.imageio import save_grid
from ibmd_fast.data.images import uint8_to_tensor
from ibmd_fast.metrics import (
    bootstrap_fid,
    classifier_accuracy,
    compute_features,
    evaluate_restoration,
    fid_from_stats,
    paired_bootstrap_fid_diff,
)
from ibmd_fast.models.unet import check_image_size
from ibmd_fast.paths import DEFAULT_GENERATOR, DEFAULT_TEACHER, EMBEDDED_CLASSIFIER
from ibmd_fast.release import LoadedModel, atomic_write, load_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from ibmd_fast.restore import (
    check_eta,
    check_labels,
    used_eta,
    natural_sampler,
    timed_restore,
    valid_teacher_nfe,
)

__all__ = [
    "load_eval_data",
    "teacher_cache_key",
    "classifier_training_data",
    "fit_classifier",
    "get_classifier",
    "classifier_line",
    "evaluate",
    "bootstrap_plan",
    "format_table",
    "format_differences",
]


Log = Optional[Callable[[str], None]]


def _done_line(row: dict) -> str:
    """One line per evaluated NFE, so a long evaluation shows its progress in a log file too."""
    numbers = ", ".join(
        f"{k.upper()} {row[k]:.4g}" for k in ("psnr", "ssim", "fid", "is", "ca") if isinstance(row.get(k), float)
    )
    return f"{row['model']}, NFE {row['nfe']}: {numbers}, {row['sec_per_image']:.3g} s/image"


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------
# Data


def _describe(data) -> str:
    return data if isinstance(data, str) else type(data).__name__


def load_eval_data(
    data, degradation=None, image_size=None, channels: int = 3, num_images: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The first ``num_images`` test items as tensors ``{"x0", "xT"[, "mask"][, "label"]}``.

    ``data`` is a spec (``ibmd_fast.data.SPEC_HELP``; the test split is read, and ``degradation``
    makes ``xT`` unless the spec is paired) or a Dataset of such dicts.
    """
    if isinstance(data, str):
        dataset = make_dataset(
            data, degradation=degradation, size=image_size, channels=channels, split="test", seed=seed
        )
    else:
        dataset = data
    n = len(dataset) if num_images is None or num_images <= 0 else min(int(num_images), len(dataset))
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 test images; {_describe(data)} has {len(dataset)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random corruptions (free-form masks) drawn from the seed
        items = [dataset[i] for i in range(n)]
    if not isinstance(items[0], dict) or "x0" not in items[0] or "xT" not in items[0]:
        raise ValueError(f"evaluation data {_describe(data)} must yield clean and corrupted images (x0, xT)")
    shapes = {tuple(item["x0"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"evaluation images of {_describe(data)} have different sizes {sorted(shapes)[:3]}; pass an image size"
        )
    batch = collate(items)
    batch = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in batch.items()}
    if batch["x0"].shape != batch["xT"].shape:
        raise ValueError(
            f"clean and corrupted images differ in shape: {tuple(batch['x0'].shape)} vs {tuple(batch['xT'].shape)}"
        )
    return batch


def _clean_and_label(item) -> tuple[torch.Tensor, Optional[int]]:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        return item[0], int(item[1])
    if isinstance(item, dict):
        if "x0" not in item:
            raise ValueError("the classifier needs clean images, and this data set holds corrupted images only")
        return item["x0"], (int(item["label"]) if "label" in item else None)
    raise ValueError(f"unsupported data item {type(item).__name__} for classifier training")


def _split_items(
    data,
    image_size,
    channels: int,
    max_items: int,
    seed: int,
    progress: bool,
    split: str = "train",
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One read of a split (TRAINING by default): the clean images, the items' own labels (None unless
    every item has one) and the index of the photograph each is cropped from (None unless the data set
    has ``photo_index``, as the scikit-image crops do)."""
    if isinstance(data, str):
        source = make_source(data, size=image_size, channels=channels, split=split, seed=seed)
    else:
        source = data
    n = len(source) if max_items is None or max_items <= 0 else min(int(max_items), len(source))
    if n < 2:
        raise ValueError(f"classifier training needs at least 2 images; {_describe(data)} has {len(source)}")
    images, labels = [], []
    for i in tqdm(range(n), desc=f"reading {split} images", disable=not progress, leave=False):
        x, y = _clean_and_label(source[i])
        images.append(x)
        labels.append(y)
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"classifier training images have different sizes {sorted(shapes)[:3]}; pass an image size")
    own = None if any(y is None for y in labels) else torch.tensor(labels, dtype=torch.long)
    photo_index = getattr(source, "photo_index", None)
    photos = None if photo_index is None else torch.tensor([photo_index(i) for i in range(n)], dtype=torch.long)
    return torch.stack(images), own, photos


def classifier_training_data(
    data,
    image_size=None,
    channels: int = 3,
    max_items: int = 8192,
    seed: int = 0,
    progress: bool = False,
    labels_from: str = "data",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Clean images of the TRAINING split and their labels: with ``labels_from="data"`` the items'
    own (None unless every item has one), with ``"photo"`` the index of the photograph each item
    is cropped from (data sets with ``photo_index``, e.g. the scikit-image crops; else None).

    ``data``: a spec or a Dataset (items: image, (image, label) or dicts with "x0"[, "label"]).
    """
    if labels_from not in ("data", "photo"):
        raise ValueError(f"labels_from must be 'data' or 'photo', got {labels_from!r}")
    images, own, photos = _split_items(data, image_size, channels, max_items, seed, progress)
    return images, (own if labels_from == "data" else photos)


def fit_classifier(
    data,
    image_size=None,
    channels: int = 3,
    task: Optional[str] = None,
    epochs: int = 5,
    batch_size: int = 128,
    max_items: int = 8192,
    seed: int = 0,
    device="auto",
    progress: bool = False,
    log: Log = None,
    test_items: int = 512,
):
    """Train the FID/CA feature classifier on the clean training split of ``data``.

    ``task``: "labels" (needs labels), "photo" (which photograph a crop comes from: the proxy
    label of the scikit-image crops, a task a small network learns in a few epochs),
    "rotation" (self-supervised 4-way rotation, any square images), or None: labels when the
    data has them, else photo when the data says where each crop comes from, else rotation.
    A photo classifier is saved as task "labels" with ``config["label_source"] = "photo"``.
    ``model.info`` records the data, the items and epochs, and (for a data spec with a test split)
    the accuracy on the first ``test_items`` test images, which ``describe_classifier`` prints.
    """
    if task not in (None, "labels", "photo", "rotation"):
        raise ValueError(f"classifier task must be labels, photo or rotation, got {task!r}")
    images, own, photos = _split_items(data, image_size, channels, max_items, seed, progress)
    if task is None:
        task = "labels" if own is not None else ("photo" if photos is not None else "rotation")
    if task == "labels" and own is None:
        raise ValueError(f"{_describe(data)} has no labels; train the classifier with task 'rotation'")
    if task == "photo" and photos is None:
        raise ValueError(
            f"{_describe(data)} does not say which photograph each image comes from; "
            "train the classifier with task 'rotation'"
        )
    if task == "rotation" and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"the rotation task needs square images, got {images.shape[-2]}x{images.shape[-1]}")
    if task == "photo":
        what = f"a photo classifier: which of {int(photos.max()) + 1} photographs a crop comes from"
    else:
        what = {"labels": "a label classifier", "rotation": "a rotation classifier: which of 4 rotations"}[task]
    _say(
        log,
        f"training the feature classifier ({what}) on {images.shape[0]} clean training images "
        f"of {_describe(data)}, {epochs} epoch(s)",
    )
    data_arg = {"labels": (images, own), "photo": (images, photos)}.get(task, images)
    model = train_classifier(
        data_arg,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        task="labels" if task == "photo" else task,
        device=resolve_device(device),
        log=log,
        label_source="photo" if task == "photo" else None,
    )
    model.info = {
        "data": _describe(data),
        "image_size": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "train_items": int(images.shape[0]),
        "epochs": int(epochs),
        "seed": int(seed),
    }
    model.info.update(_test_accuracy(model, data, images.shape[-1], images.shape[1], task, test_items, seed, log))
    return model


def _test_accuracy(
    model, data, image_size: int, channels: int, task: str, test_items: int, seed: int, log: Log
) -> dict:
    """``{"test_accuracy", "test_items"}`` of ``model`` on the TEST split of ``data`` (its own task's
    labels), or ``{}`` where the data has no test split or no labels of that kind."""
    if not isinstance(data, str) or test_items <= 0:
        return {}
    try:
        images, own, photos = _split_items(data, image_size, channels, test_items, seed, False, split="test")
    except (ValueError, FileNotFoundError, OSError) as exc:
        _say(log, f"classifier accuracy not measured: no test split of {data} ({_one_line(exc)})")
        return {}
    labels = {"labels": own, "photo": photos}.get(task)
    if task != "rotation" and labels is None:
        return {}
    accuracy = top1_fraction(model, images, labels)
    _say(log, f"classifier accuracy on {images.shape[0]} held-out test images: {100.0 * accuracy:.2f}%")
    return {"test_accuracy": round(accuracy, 4), "test_items": int(images.shape[0])}


def save_classifier_atomic(model, path: str) -> None:
    atomic_write(path, lambda tmp: save_classifier(model, tmp))


def _check_classifier(model, path: str, image_size: int, channels: int) -> None:
    config = getattr(model, "config", {})
    if config.get("in_channels") != channels or config.get("image_size") != image_size:
        raise ValueError(
            f"classifier {path} was trained on {config.get('in_channels')}-channel "
            f"{config.get('image_size')}px images; these are {channels}-channel {image_size}px"
        )


def _embedded_classifier(data, image_size: int, channels: int, task: Optional[str]) -> Optional[str]:
    """The classifier that ships for the embedded default (``EMBEDDED_CLASSIFIER``) when it was
    trained for this data, size and channels (its ``info``) and no other task is asked for."""
    if not isinstance(data, str) or task not in (None, "photo") or not os.path.isfile(EMBEDDED_CLASSIFIER):
        return None
    from safetensors import safe_open

    with safe_open(EMBEDDED_CLASSIFIER, framework="pt", device="cpu") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    fits = info.get("data") == data and info.get("image_size") == image_size and info.get("channels") == channels
    return EMBEDDED_CLASSIFIER if fits else None


def _labelled(model, origin: str, path: Optional[str]):
    """``model`` with where it came from: ``origin`` (given, embedded, cached, trained) and its file."""
    model.origin, model.path = origin, path
    return model


def get_classifier(
    classifier,
    run_dir: Optional[str],
    data,
    image_size: int,
    channels: int,
    task: Optional[str] = None,
    epochs: int = 5,
    max_items: int = 8192,
    batch_size: int = 128,
    seed: int = 0,
    device="auto",
    progress: bool = False,
    log: Log = None,
):
    """The classifier for FID/CA: ``classifier`` (a path or a Classifier) or, when None, the one that
    ships for the embedded default where it fits (``EMBEDDED_CLASSIFIER``: the scikit-image crops at
    the default size), else the one cached in ``run_dir/classifier.safetensors`` if it was trained
    for the same data, else a new one trained on ``data``'s clean training split and cached there.

    The model comes back with ``origin`` ("given", "embedded", "cached" or "trained") and ``path``
    (its file, None for a Classifier given as an object or trained without a run_dir).
    """
    dev = resolve_device(device)
    if isinstance(classifier, Classifier):
        _check_classifier(classifier, "given", image_size, channels)
        return _labelled(classifier.to(dev).eval(), "given", None)
    if classifier is not None:
        path = os.fspath(classifier)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classifier file not found: {path}")
        model = load_classifier(path, device=dev)
        _check_classifier(model, path, image_size, channels)
        return _labelled(model, "given", path)
    embedded = _embedded_classifier(data, image_size, channels, task)
    if embedded is not None:
        model = load_classifier(embedded, device=dev)
        _check_classifier(model, embedded, image_size, channels)
        return _labelled(model, "embedded", embedded)

    key = {
        "data": _describe(data),
        "image_size": image_size,
        "channels": channels,
        "task": task,
        "epochs": epochs,
        "max_items": max_items,
        "seed": seed,
    }
    cache = sidecar = None
    if run_dir is not None and isinstance(data, str):
        cache = os.path.join(run_dir, "classifier.safetensors")
        sidecar = os.path.join(run_dir, "classifier.json")
        if os.path.isfile(cache) and os.path.isfile(sidecar):
            try:
                with open(sidecar, encoding="utf-8") as fh:
                    cached_key = json.load(fh)
                if cached_key == key:
                    model = load_classifier(cache, device=dev)
                    _check_classifier(model, cache, image_size, channels)
                    return _labelled(model, "cached", cache)
            except (ValueError, OSError):
                pass  # stale or damaged cache: train a new one
    model = fit_classifier(data, image_size, channels, task, epochs, batch_size, max_items, seed, dev, progress, log)
    if cache is not None:
        save_classifier_atomic(model, cache)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(key, indent=2) + "\n"))
    return _labelled(model, "trained", cache)


def classifier_line(model) -> str:
    """One line for the reader: which classifier FID and CA were measured with, and how good it is."""
    where = {"given": "given", "embedded": "embedded", "cached": "cached", "trained": "trained just now"}.get(
        getattr(model, "origin", None), "given"
    )
    path = getattr(model, "path", None)
    return f"FID/CA classifier ({where}{', ' + path if path else ''}): {describe_classifier(model)}"


# ----------------------------------------------------------------------------
# The paper's metric networks (ibmd_fast.paper_metrics): Inception FID / IS and ResNet-50 CA


FEATURE_KINDS = ("classifier", "inception-pytorch", "inception-tf")


def _paper_features(extractor, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inception features [N, 2048] (float64, CPU) and, for the TorchScript Inception, its logits."""
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f, g = extractor.features_and_logits(images[i : i + batch_size])
        feats.append(f.double().cpu())
        if g is not None:
            logits.append(g.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def _fid_reference(
    extractor,
    fid_ref: Optional[str],
    clean: torch.Tensor,
    run_dir: Optional[str],
    image_size: int,
    batch_size: int,
    log: Log,
):
    """(reference, what): the clean test images' features [N, F] with no ``fid_ref`` (resampled with
    the test items by the intervals), else fixed statistics (mu, sigma) from an .npz with mu and sigma,
    from an .npz of reference images (``arr_0``, uint8 [N, H, W, 3] as ADM's and DDBM's reference
    batches; cached as RUN_DIR/fid_ref.npz) or from a folder of clean images (cached likewise)."""

    if fid_ref is None:
        return _paper_features(extractor, clean, batch_size)[0], "the clean test images"
    if os.path.isfile(fid_ref):
        images = paper_metrics.reference_images(fid_ref)
        if images is None:
            mu, sigma = paper_metrics.reference_stats(fid_ref)
            if mu.shape[0] != extractor.feature_dim:
                raise ValueError(
                    f"--fid-ref {fid_ref} holds {mu.shape[0]}-d statistics, the features are {extractor.feature_dim}-d"
                )
            return (mu, sigma), fid_ref
        what, count = f"the {images.shape[0]} reference images (arr_0) of {fid_ref}", images.shape[0]
        key = {"npz": os.path.abspath(fid_ref), "bytes": os.path.getsize(fid_ref)}

        def batches():  # as the data sets convert pixels (the features quantise again, truncating)
            for i in range(0, images.shape[0], batch_size):
                yield torch.stack([uint8_to_tensor(image) for image in images[i : i + batch_size]])
    elif os.path.isdir(fid_ref):
        folder = ImageFolder(fid_ref, size=image_size, channels=3, crop="center")
        what, count = f"{len(folder)} images of {fid_ref}", len(folder)
        key = {"folder": os.path.abspath(fid_ref), "image_size": int(image_size)}

        def batches():
            for i in range(0, len(folder), batch_size):
                yield torch.stack([folder[j] for j in range(i, min(i + batch_size, len(folder)))])
    else:
        raise FileNotFoundError(
            f"--fid-ref {fid_ref}: neither an .npz (mu and sigma, or reference images arr_0) nor a folder of images"
        )
    key.update(features=extractor.protocol, weights=os.path.abspath(extractor.path))
    cache = None if run_dir is None else os.path.join(run_dir, "fid_ref.npz")
    if cache is not None and os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as data:
            if "key" in data and json.loads(str(data["key"])) == key:
                _say(log, f"using the cached FID reference statistics {cache}")
                return (data["mu"], data["sigma"]), cache
    _say(log, f"FID reference statistics from {what} ...")
    feats = torch.cat([_paper_features(extractor, batch, batch_size)[0] for batch in batches()])
    if feats.shape[0] < 2:
        raise ValueError(f"--fid-ref {fid_ref}: {count} reference image(s); FID statistics need at least 2")
    if cache is None:
        f = feats.double().numpy()
        return (f.mean(axis=0), np.cov(f, rowvar=False)), fid_ref
    os.makedirs(run_dir, exist_ok=True)
    mu, sigma = paper_metrics.save_reference_stats(cache, feats, key=json.dumps(key, sort_keys=True))
    return (mu, sigma), cache


# ----------------------------------------------------------------------------
# Output: tables and grids


_COLUMNS = (
    ("model", "model", "{}"),
    ("nfe", "NFE", "{}"),
    ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("fid", "FID", "{:.3f}"),
    ("fid_ci", "FID 95% CI", "[{0[0]:.3f}, {0[1]:.3f}]"),
    ("is", "IS", "{:.2f}"),
    ("ca", "CA %", "{:.2f}"),
    ("sec_per_image", "s/image", "{:.4f}"),
    ("cached", "cached", "{}"),  # a teacher row whose restorations (and s/image) come from an earlier eval
)


def format_table(rows: Sequence[dict]) -> str:
    """Rows of metrics as an aligned text table; columns are those present in any row."""
    columns = [c for c in _COLUMNS if any(c[0] in row for row in rows)]
    extra = [k for row in rows for k in row if k not in {c[0] for c in _COLUMNS}]
    columns += [(k, k, "{}") for k in dict.fromkeys(extra)]

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    table = [[title for _, title, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        "  ".join(text.rjust(w) if i else text.ljust(w) for i, (text, w) in enumerate(zip(line, widths)))
        for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Above this many feature dimensions, with at least as many images, every bootstrap resample needs an
# F x F eigensolve: R = 1000 of them at F = 2048 (Inception) take hours on a CPU.
CHEAP_BOOTSTRAP_DIM = 512
DEFAULT_RESAMPLES = 1000


def bootstrap_plan(bootstrap: Optional[int], num_images: int, feature_dim: int) -> tuple[int, str]:
    """(resamples, a line saying why none are taken, else ""): ``bootstrap`` as asked, or for None
    ``DEFAULT_RESAMPLES`` where each resample is cheap (fewer images than features: N x N matrices;
    or at most ``CHEAP_BOOTSTRAP_DIM`` features)."""
    if bootstrap is not None:
        if bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {bootstrap}")
        return int(bootstrap), ""
    if num_images < feature_dim or feature_dim <= CHEAP_BOOTSTRAP_DIM:
        return DEFAULT_RESAMPLES, ""
    return 0, (
        f"FID intervals off: {num_images} images of {feature_dim}-d features need a "
        f"{feature_dim}x{feature_dim} eigensolve per resample; ask with --bootstrap R (quick on a GPU)"
    )


def _fid(features: torch.Tensor, reference) -> float:
    """FID of restored-image features against the clean features [N, F] or fixed (mu, sigma)."""
    f = features.double().cpu().numpy()
    if isinstance(reference, torch.Tensor):
        r = reference.double().cpu().numpy()
        mu, sigma = r.mean(axis=0), np.cov(r, rowvar=False).reshape(r.shape[1], r.shape[1])
    else:
        mu, sigma = reference
    return fid_from_stats(f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), mu, sigma)


def format_differences(differences: Sequence[dict]) -> str:
    """One line per paired FID difference (student minus teacher) with its interval."""
    return "\n".join(
        f"FID {d['a']} - {d['b']}: {d['diff']:+.3f}, {int(100 * d['level'])}% paired bootstrap "
        f"interval [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] ({d['resamples']} resamples)"
        for d in differences
    )


TEACHER_CACHE = "teacher-restorations"  # RUN_DIR/<this>/<key>.safetensors


def _release_digest(path: str) -> str:
    """The release's own content digest (its ``sha256`` metadata), else the sha256 of the file's bytes."""
    with safe_open(path, framework="pt") as fh:
        recorded = (fh.metadata() or {}).get("sha256")
    if recorded:
        return recorded
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_cache_key(teacher_path: str, inputs: Sequence[Optional[torch.Tensor]], **settings) -> str:
    """The name of a teacher row's cached restorations: sha256 of the teacher release's digest, the
    restoration's settings (NFE, sampler, eta, seed, batch size, device type, versions) and the bytes of
    its inputs (xT, mask, labels), so any change to the data, the teacher or the sampling misses."""
    digest = hashlib.sha256(_release_digest(teacher_path).encode())
    for name in sorted(settings):
        digest.update(f"{name}={settings[name]}\0".encode())
    for tensor in inputs:
        if tensor is None:
            digest.update(b"none\0")
        else:
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{t.dtype}|{tuple(t.shape)}\0".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:32]


def _cached_teacher_row(path: str, log: Log) -> Optional[tuple[torch.Tensor, float]]:
    """(restored, seconds per image when made) from a cache file, or None (absent or unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as fh:
            seconds = float((fh.metadata() or {})["sec_per_image"])
        restored = load_file(path)["restored"]
    except Exception as exc:  # a damaged cache file is recomputed, never trusted
        _say(log, f"note: ignoring the unreadable cached restorations {path} ({_one_line(str(exc))})")
        return None
    if not torch.isfinite(restored).all():
        _say(log, f"note: ignoring the cached restorations {path}: they hold NaN or inf")
        return None
    return restored, seconds


def _write_json(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------
# Evaluation


def _release_check(teacher: Optional[LoadedModel], student: Optional[LoadedModel]) -> None:
    if teacher is None or student is None:
        return
    if teacher.image_channels != student.image_channels:
        raise ValueError(
            f"teacher {teacher.path} makes {teacher.image_channels}-channel images, student "
            f"{student.path} {student.image_channels}-channel ones"
        )
    if teacher.degradation and student.degradation and teacher.degradation != student.degradation:
        raise ValueError(
            f"teacher {teacher.path} restores {teacher.degradation}, student {student.path} "
            f"{student.degradation}: they cannot be compared on one data set"
        )


def evaluate(
    teacher: Optional[str] = DEFAULT_TEACHER,
    student: Optional[str] = DEFAULT_GENERATOR,
    data=None,
    degradation: Optional[str] = None,
    masks: Optional[str] = None,
    image_size: Optional[int] = None,
    teacher_nfe: Sequence[int] = (1, 10, 100),
    sampler: Optional[str] = None,
    eta: Optional[float] = None,
    classifier=None,
    classifier_task: Optional[str] = None,
    classifier_epochs: int = 5,
    classifier_items: int = 8192,
    num_images: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    device="auto",
    run_dir: Optional[str] = "runs/eval",
    grid_rows: int = 8,
    progress: bool = False,
    log: Log = None,
    features: str = "classifier",
    ca: Optional[str] = None,
    fid_ref: Optional[str] = None,
    bootstrap: Optional[int] = None,
    reuse_teacher: bool = True,
) -> dict[str, Any]:
    """Teacher (at each of ``teacher_nfe``) and student against clean test images (MATH.md 7).

    teacher, student -- release paths; None leaves that model out (one is needed).
    data             -- a spec (default: the release's data set, else 'skimage') or a Dataset of
                        {"x0", "xT"[, "mask"][, "label"]} items; the test split is used.
    degradation      -- default: the release's; used to make xT from clean images.
    masks            -- the mask file of the free-form inpainting degradations.
    image_size       -- default: the release's training size.
    classifier       -- a path or Classifier; None takes the one that ships for the embedded
                        default where it fits, else trains one on the clean training split of
                        ``data`` (labels if it has them, else the source photograph of each crop
                        where the data knows it, else rotation; needs a spec) and caches
                        it as ``run_dir/classifier.safetensors`` (``get_classifier``). CA is
                        reported only with labels.
    features         -- "classifier[:FILE]" (the above; FILE as ``classifier``), or the paper's Inception
                        from a local weights file: "inception-pytorch:FILE" (I2SB's FID) or
                        "inception-tf:FILE" (DDBM/DBIM's FID, and their Inception Score, row key "is").
    ca               -- "resnet50:FILE": CA of torchvision's ResNet-50 IMAGENET1K_V1 as I2SB (needs labels).
    fid_ref          -- Inception FID against these statistics (an .npz with mu and sigma, or a folder of
                        clean images, cached as RUN_DIR/fid_ref.npz) instead of the clean test images.
    bootstrap        -- resamples of the test images for FID intervals (MATH.md 7): each row's "fid_ci" and,
                        for the student, "fid_differences" against each teacher row (paired). 0: none;
                        None: 1000 where it is cheap (fewer images than features, or features of at
                        most 512 dimensions), else none (``bootstrap_plan`` says why).
    reuse_teacher    -- keep each teacher row's restorations in ``run_dir/teacher-restorations/`` and
                        reuse them when the teacher, its inputs and every sampling setting are the
                        same (``teacher_cache_key``): the teacher's 100 steps run once per test set,
                        not once per student. Its row then says "cached" and keeps the time per
                        image measured when they were made. False: always sample.
    Rows: "corrupted" (xT itself, for reference), "teacher" per NFE, "student". Writes
    ``run_dir/eval.json`` and ``run_dir/eval-grid.png`` (corrupted | teacher at its largest NFE |
    student | clean) when ``run_dir`` is given. Returns the eval.json payload.
    """
    dev = resolve_device(device)
    feature_kind, feature_file = paper_metrics.parse_network_spec(features, FEATURE_KINDS)
    if feature_kind == "classifier" and feature_file is not None:
        classifier = feature_file
    if fid_ref is not None and feature_kind == "classifier":
        raise ValueError("--fid-ref needs Inception features: --features inception-pytorch:FILE or inception-tf:FILE")
    # the weight files are checked before anything runs
    extractor = None if feature_kind == "classifier" else paper_metrics.load_inception(feature_kind, feature_file, dev)
    resnet = (
        None if ca is None else paper_metrics.load_resnet50(paper_metrics.parse_network_spec(ca, ("resnet50",))[1], dev)
    )
    t_model = None if teacher is None else load_model(teacher, dev, expect="teacher")
    s_model = None if student is None else load_model(student, dev, expect="generator")
    if t_model is None and s_model is None:
        raise ValueError("nothing to evaluate: give a teacher, a student or both")
    _release_check(t_model, s_model)
    if t_model is not None:
        check_eta(eta, sampler or natural_sampler(t_model.bridge_type))  # before the classifier is trained
    ref = t_model or s_model
    channels = ref.image_channels
    if degradation is None:
        degradation = ref.degradation
    elif ref.degradation and degradation != ref.degradation:
        _say(log, f"warning: {ref.path} was trained for {ref.degradation}, evaluating on {degradation}")
    image_size = image_size or ref.image_size
    if data is None:
        data = ref.config.get("data") or "skimage"
    # paired specs (paired:, and DDBM's layouts edges2handbags:, diode:) carry their corrupted images
    if isinstance(data, str) and data.partition(":")[0].lower() not in ("paired", *LAYOUTS) and degradation is None:
        raise ValueError(f"{ref.path} names no degradation; pass one to corrupt {data}")
    teacher_nfe = sorted({int(n) for n in teacher_nfe}) if t_model is not None else []
    if t_model is not None and not teacher_nfe:
        raise ValueError("give at least one teacher NFE")
    if t_model is not None and t_model.bridge_type == "i2sb":
        # An I2SB teacher of N steps runs at most N - 1 network calls.
        top = int(t_model.model.bridge.n_steps) - 1
        if teacher_nfe[-1] > top:
            _say(log, f"note: {t_model.path} has {top + 1} bridge steps, so its NFE is capped at {top}")
            teacher_nfe = valid_teacher_nfe(t_model.model.bridge, teacher_nfe)

    for model in (t_model, s_model):
        if model is not None and image_size:
            check_image_size(model.channel_mult, image_size, image_size, f"--image-size {image_size}", model.network)
    operator = None if degradation is None else get_degradation(degradation, masks=masks)
    batch = load_eval_data(data, operator, image_size, channels, num_images, seed)
    x0, xT, mask, labels = batch["x0"], batch["xT"], batch.get("mask"), batch.get("label")
    if x0.shape[1] != channels:
        raise ValueError(f"the data has {x0.shape[1]}-channel images, the models make {channels}-channel ones")
    for model in (t_model, s_model):
        if model is not None:
            check_image_size(model.channel_mult, x0.shape[-2], x0.shape[-1], "the evaluation image size", model.network)
    if min(x0.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, these are {x0.shape[-2]}x{x0.shape[-1]}")

    def class_labels(model):
        """The data's labels for a class-conditional model (checked before anything runs), None otherwise."""
        if model is None or getattr(model.model, "num_classes", None) is None:
            return None
        check_labels(model.model, labels, f"{model.path} (data {_describe(data)})")
        return labels

    t_labels, s_labels = class_labels(t_model), class_labels(s_model)
    if resnet is not None and labels is None:
        raise ValueError(
            f"--ca needs a class label per test image, and {_describe(data)} has none "
            "(use classes:DIR, an ImageNet-style folder of class folders)"
        )
    if extractor is None:
        clf = get_classifier(
            classifier,
            run_dir,
            data,
            x0.shape[-1],
            channels,
            classifier_task,
            classifier_epochs,
            classifier_items,
            seed=seed,
            device=dev,
            progress=progress,
            log=log,
        )
        _say(log, classifier_line(clf))

        def features_of(images):
            return compute_features(clf, images, batch_size)

        # FID intervals resample the test items; the clean features go with them
        fid_reference, ref_what = features_of(x0), "the clean test images"
    else:
        clf = extractor

        def features_of(images):
            return _paper_features(extractor, images, batch_size)

        # the clean features [N, F] (resampled with the items) or fixed --fid-ref statistics (mu, sigma)
        fid_reference, ref_what = _fid_reference(extractor, fid_ref, x0, run_dir, x0.shape[-1], batch_size, log)
    feature_dim = int(fid_reference.shape[1]) if isinstance(fid_reference, torch.Tensor) else int(fid_reference[0].size)
    resamples, why = bootstrap_plan(bootstrap, x0.shape[0], feature_dim)
    if why:
        _say(log, why)
    row_features = {}

    def measure(restored, key):
        result = evaluate_restoration(restored, x0)
        if extractor is None:
            f = features_of(restored)
            if labels is not None and clf.task == "labels":
                result["ca"] = classifier_accuracy(clf, restored, labels, batch_size)
        else:
            f, logits = features_of(restored)
            if logits is not None:
                result["is"] = paper_metrics.inception_score(logits)
        result["fid"] = _fid(f, fid_reference)
        if resamples:
            row_features[key] = f
            result["fid_ci"] = bootstrap_fid(f, fid_reference, resamples, seed=seed)["ci"]
        if resnet is not None:
            correct = torch.cat(
                [
                    resnet.correct(restored[i : i + batch_size], labels[i : i + batch_size])
                    for i in range(0, restored.shape[0], batch_size)
                ]
            )
            result["ca"] = 100.0 * correct.double().mean().item()
        return result

    rows = [{"model": "corrupted", "nfe": 0, **measure(xT, ("corrupted", 0)), "sec_per_image": 0.0}]
    restored_by_row = {}
    for nfe in teacher_nfe:
        cache = None
        if reuse_teacher and run_dir is not None:
            key = teacher_cache_key(
                t_model.path,
                (xT, mask, t_labels),
                nfe=nfe,
                sampler=sampler or natural_sampler(t_model.bridge_type),
                eta=used_eta(t_model, sampler, eta),
                seed=seed,
                batch_size=batch_size,
                device=dev.type,
                torch=torch.__version__,
                ibmd_fast=__version__,
            )
            cache = os.path.join(run_dir, TEACHER_CACHE, f"{key}.safetensors")
        found = None if cache is None else _cached_teacher_row(cache, log)
        if found is not None:
            restored, seconds = found
            restored = restored.to(xT.device)
            _say(log, f"teacher, NFE {nfe}: the restorations cached in {cache} (delete it to sample again)")
        else:
            _say(log, f"teacher, NFE {nfe} ...")
            restored, seconds = timed_restore(
                t_model, xT, nfe, sampler, mask, seed, batch_size, progress, eta=eta, labels=t_labels
            )
            if cache is not None:
                state = {"restored": restored.detach().to("cpu", torch.float32).contiguous()}
                meta = {"sec_per_image": repr(float(seconds)), "nfe": str(nfe), "teacher": t_model.path}
                atomic_write(cache, lambda tmp: save_file(state, tmp, metadata=meta))
        rows.append({"model": "teacher", "nfe": nfe, **measure(restored, ("teacher", nfe)), "sec_per_image": seconds})
        if found is not None:
            rows[-1]["cached"] = True
        _say(log, _done_line(rows[-1]))
        restored_by_row[("teacher", nfe)] = restored
    if s_model is not None:
        _say(log, f"student, NFE {s_model.nfe} ...")
        restored, seconds = timed_restore(s_model, xT, None, None, mask, seed, batch_size, progress, labels=s_labels)
        rows.append(
            {
                "model": "student",
                "nfe": s_model.nfe,
                **measure(restored, ("student", s_model.nfe)),
                "sec_per_image": seconds,
            }
        )
        _say(log, _done_line(rows[-1]))
        restored_by_row[("student", s_model.nfe)] = restored
    differences = []
    if resamples and s_model is not None and t_model is not None:
        for nfe in teacher_nfe:  # the same resampled items for both models (a paired interval)
            out = paired_bootstrap_fid_diff(
                row_features[("student", s_model.nfe)],
                row_features[("teacher", nfe)],
                fid_reference,
                resamples,
                seed=seed,
            )
            differences.append(
                {
                    "a": f"student NFE {s_model.nfe}",
                    "b": f"teacher NFE {nfe}",
                    "diff": out["diff"],
                    "ci": out["ci"],
                    "level": out["level"],
                    "resamples": resamples,
                }
            )
    for row in rows:
        for key, value in list(row.items()):
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None  # strict JSON has no NaN or inf (inf PSNR: identical images)

    payload = {
        "data": _describe(data),
        "degradation": degradation,
        "image_size": int(x0.shape[-1]),
        "channels": channels,
        "num_images": int(x0.shape[0]),
        "teacher": None if t_model is None else t_model.path,
        "student": None if s_model is None else s_model.path,
        "sampler": (sampler or natural_sampler(t_model.bridge_type)) if t_model is not None else None,
        "eta": used_eta(t_model, sampler, eta),
        "classifier": (
            {
                "path": clf.path,
                "origin": clf.origin,
                "task": clf.task,
                "description": describe_classifier(clf),
                "config": getattr(clf, "config", None),
                "info": getattr(clf, "info", {}),
            }
            if extractor is None
            else {
                "path": extractor.path,
                "task": feature_kind,
                "fid_reference": ref_what,
                "description": f"features {feature_kind} ({extractor.path}), FID against {ref_what}",
            }
        ),
        "ca_network": None if resnet is None else resnet.path,
        "device": str(dev),
        "seed": seed,
        "results": rows,
        "bootstrap": {"resamples": resamples, "level": 0.95, "note": why or None},
        "fid_differences": differences,
    }
    if run_dir is not None:
        n = min(grid_rows, x0.shape[0])
        columns, titles = [xT[:n]], ["corrupted"]
        if t_model is not None:
            columns.append(restored_by_row[("teacher", teacher_nfe[-1])][:n])
            titles.append(f"teacher NFE {teacher_nfe[-1]}")
        if s_model is not None:
            columns.append(restored_by_row[("student", s_model.nfe)][:n])
            titles.append(f"student NFE {s_model.nfe}")
        columns.append(x0[:n])
        titles.append("clean")
        grid_path = os.path.join(run_dir, "eval-grid.png")
        save_grid(columns, grid_path, titles=titles)
        payload["grid"] = grid_path
        payload["grid_columns"] = titles
        _write_json(os.path.join(run_dir, "eval.json"), payload)
    return payload
