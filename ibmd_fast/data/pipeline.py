"""From sources to what trainers read: (x0, xT) pairs, or corrupted images only.

- ``BridgePairs(source, degradation)``: items ``{"x0", "xT"}`` plus ``"mask"``
  (inpainting) and ``"label"`` (sources with labels). Teacher training and
  evaluation use it.
- ``CorruptedOnly(source_or_folder, degradation)``: items ``{"xT"}`` plus
  ``"mask"`` and ``"label"`` (labelled sources), never a clean image. IBMD distillation uses it (MATH.md section
  5: only corrupted images are needed). Given a clean source it synthesizes
  ``xT`` from clean pixels it reads internally and drops: that form is for
  synthetic experiments. Given a folder (or a CorruptedFolder, or the
  corrupted side of a PairedFolders) it reads corrupted images only: the
  real-data form.
- ``make_source`` / ``make_dataset``: the CLI's data specs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import Dataset, default_collate

from ibmd_fast.data.degradations import Degradation, get_degradation
from ibmd_fast.data.fashion_mnist import FashionMNIST
from ibmd_fast.data.folders import CorruptedFolder, ImageFolder, LabelledFolder, Listing, PairedFolders
from ibmd_fast.data.layouts import LAYOUTS, make_layout
from ibmd_fast.data.skimage_photos import SkimagePhotos

__all__ = ["BridgePairs", "CorruptedOnly", "make_source", "make_dataset", "collate", "SPEC_HELP"]

SPEC_HELP = (
    "data spec: 'skimage' (photos bundled with scikit-image), 'fashion-mnist' or "
    "'fashion-mnist:/dir' (idx files), 'folder:/dir' or an existing /dir (images), "
    "'paired:/clean_dir,/corrupted_dir' (pairs by relative path), "
    "'corrupted:/dir' (corrupted images only, for distillation), 'classes:/dir' "
    "(class labels: one subfolder per class, index = sorted name, as ImageNet's train/n01440764/), "
    "'classes:/dir,/labels.csv' (labels from lines path,label), 'edges2handbags:/dir' "
    "(pix2pix A|B files, edges the corrupted side) or 'diode:/dir' (X.png with X_normal.png) "
    "as DDBM/DBIM read them, from /dir/train and /dir/val. A folder with a "
    "subfolder named after the split (train/, test/) uses that subfolder."
)


def _split_item(item) -> tuple:
    """A source item -> (image, label or None)."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        return item[0], int(item[1])
    raise TypeError(f"a source item must be an image tensor or (image, label), got {type(item).__name__}")


class BridgePairs(Dataset):
    """Clean/corrupted pairs: ``{"x0", "xT"[, "mask"][, "label"]}``.

    ``source`` yields images or ``(image, label)``; ``degradation`` (a name or
    a Degradation) makes ``xT`` from ``x0``. A source that already yields pairs
    (PairedFolders) needs no degradation; an inpainting one given with it adds
    the fixed mask if the source did not.
    """

    def __init__(self, source: Dataset, degradation=None):
        self.source = source
        self.degradation: Optional[Degradation] = None if degradation is None else get_degradation(degradation)
        self.yields_pairs = bool(getattr(source, "yields_pairs", False))
        if self.degradation is None and not self.yields_pairs:
            raise ValueError(
                f"BridgePairs: {type(source).__name__} yields clean images only; "
                "pass a degradation to make the corrupted ones"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.source[index]
        if isinstance(item, dict):
            out = dict(item)
            if self.degradation is not None and self.degradation.is_inpainting and "mask" not in out:
                mask = self.degradation.hole_mask(*out["xT"].shape[-2:]).to(out["xT"])
                out["xT"], out["mask"] = out["xT"] * (1.0 - mask), mask
            return out
        x0, label = _split_item(item)
        xT, mask = self.degradation(x0)
        out = {"x0": x0, "xT": xT}
        if mask is not None:
            out["mask"] = mask
        if label is not None:
            out["label"] = label
        return out

    def __repr__(self) -> str:
        name = None if self.degradation is None else self.degradation.name
        return f"BridgePairs({self.source!r}, degradation={name!r})"


class CorruptedOnly(Dataset):
    """Corrupted images only: ``{"xT"[, "mask"][, "label"]}``; never returns a clean image.

    ``source_or_folder``:
    - a path: read corrupted images from that folder (``CorruptedFolder``;
      ``degradation`` then only supplies the inpainting mask, and
      ``folder_kwargs`` go to it: size, channels, crop, flip, check);
    - a ``CorruptedFolder``: used as is;
    - a ``PairedFolders``: only its corrupted folder is read (same size,
      channels, crop and flip);
    - a DDBM layout (``layouts``): its ``corrupted_side()``, which never opens
      a clean image;
    - a clean source (images or (image, label)): SYNTHETIC mode, for
      experiments only. Each clean image is read here, degraded, and dropped;
      only ``xT`` (and the mask) leave, with the source's class label (int64) when
      it has one (``classes:``): a class-conditional teacher takes it, as it does
      at inference.
    """

    def __init__(self, source_or_folder, degradation=None, **folder_kwargs):
        self.degradation: Optional[Degradation] = None if degradation is None else get_degradation(degradation)
        source = source_or_folder
        if isinstance(source, (str, os.PathLike)):
            source = CorruptedFolder(source, degradation=self.degradation, **folder_kwargs)
        elif isinstance(source, PairedFolders):
            source = CorruptedFolder(
                source.corrupted_root,
                size=source.size,
                channels=source.channels,
                degradation=self.degradation or source.hole,
                crop=source.crop,
                flip=source.flip,
            )
        elif getattr(source, "corrupted_side", None) is not None:
            source = source.corrupted_side()
        elif folder_kwargs:
            raise TypeError(f"CorruptedOnly: folder options {sorted(folder_kwargs)} need a folder path")
        self.synthetic = not (isinstance(source, CorruptedFolder) or getattr(source, "corrupted_only", False))
        if self.synthetic and self.degradation is None:
            raise ValueError(
                f"CorruptedOnly: {type(source).__name__} yields clean images; "
                "pass the degradation that makes the corrupted ones"
            )
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not self.synthetic:
            return self.source[index]
        clean, label = _split_item(self.source[index])
        xT, mask = self.degradation(clean)
        del clean  # synthesize-and-drop: nothing below may see it
        out = {"xT": xT} if mask is None else {"xT": xT, "mask": mask}
        if label is not None:
            out["label"] = torch.tensor(label, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        name = None if self.degradation is None else self.degradation.name
        return f"CorruptedOnly({self.source!r}, degradation={name!r}, synthetic={self.synthetic})"


def _split_dir(path: Path, split: str) -> Path:
    sub = path / split
    return sub if sub.is_dir() else path


def _existing_dir(text: str, spec: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"data spec {spec!r}: folder {str(path)!r} {what}")
    return path


def make_source(
    spec: str,
    size=None,
    channels: int = 3,
    split: str = "train",
    degradation=None,
    seed: int = 0,
    listing: Optional[Listing] = None,
    corrupted_only: bool = False,
) -> Dataset:
    """Build a source from a spec string (``SPEC_HELP`` lists the forms).

    ``size`` defaults to 64 for 'skimage' and 32 for 'fashion-mnist'; folders
    keep each image's size when it is None. Train folders get random crops and
    flips, test folders center crops; training folders are only listed, test
    folders are decoded up front (``check="load"``: a bad file is dropped, not
    replaced by its neighbour in the metrics); the DDBM layouts resize and flip as
    DDBM does (``layouts``). ``degradation`` is needed only for the
    inpainting mask of 'paired:' and 'corrupted:' specs (which then use center
    crops). ``listing``: folders are listed through it (``folders.Listing``:
    made once, shared by the ranks). ``corrupted_only``: a DDBM layout hands
    out ``{"xT"}`` only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = split == "train"
    text = str(spec).strip()
    kind, _, arg = text.partition(":")
    kind = kind.lower()
    inpainting = degradation is not None and get_degradation(degradation).is_inpainting
    crop = "random" if train and size is not None and not inpainting else "center"
    # Training folders are listed only (a bad file is skipped when met); held-out folders are decoded up
    # front, so that a bad file is dropped rather than replaced by its neighbour in the metrics.
    check = "none" if train else "load"

    if kind == "skimage" and not arg:
        return SkimagePhotos(size=64 if size is None else size, split=split, channels=channels, seed=seed)
    if kind == "fashion-mnist":
        return FashionMNIST(root=arg or None, split=split, size=32 if size is None else size, channels=channels)
    if kind in LAYOUTS:
        if not arg:
            raise ValueError(f"data spec {spec!r}: expected '{kind}:/dir' (the folder holding train/ and val/)")
        return make_layout(
            kind, _existing_dir(arg, spec), split, size, channels, corrupted_only=corrupted_only, listing=listing
        )
    if kind == "paired":
        roots = [p.strip() for p in arg.split(",")]
        if len(roots) != 2 or not all(roots):
            raise ValueError(f"data spec {spec!r}: expected 'paired:/clean_dir,/corrupted_dir'")
        clean, corrupted = (_split_dir(_existing_dir(r, spec), split) for r in roots)
        return PairedFolders(
            clean,
            corrupted,
            size=size,
            channels=channels,
            crop=crop,
            flip=train,
            degradation=degradation,
            listing=listing,
            check=check,
        )
    if kind == "corrupted":
        root = _split_dir(_existing_dir(arg, spec), split)
        return CorruptedFolder(
            root,
            size=size,
            channels=channels,
            degradation=degradation,
            crop=crop,
            flip=train,
            listing=listing,
            check=check,
        )
    if kind == "classes":
        folder, _, labels = arg.partition(",")
        root = _split_dir(_existing_dir(folder.strip(), spec), split)
        return LabelledFolder(
            root,
            labels=labels.strip() or None,
            size=size,
            channels=channels,
            crop=crop,
            flip=train,
            listing=listing,
            check=check,
        )
    if kind == "folder":
        root = _split_dir(_existing_dir(arg, spec), split)
        return ImageFolder(root, size=size, channels=channels, crop=crop, flip=train, listing=listing, check=check)
    if Path(text).expanduser().is_dir():
        return ImageFolder(
            _split_dir(Path(text).expanduser(), split),
            size=size,
            channels=channels,
            crop=crop,
            flip=train,
            listing=listing,
            check=check,
        )
    if "/" in text or "\\" in text or text.startswith("."):
        raise FileNotFoundError(f"data spec {spec!r}: folder {text!r} does not exist")
    raise ValueError(f"unknown data spec {spec!r}; {SPEC_HELP}")


def make_dataset(
    spec: str,
    degradation=None,
    size=None,
    channels: int = 3,
    split: str = "train",
    corrupted_only: bool = False,
    seed: int = 0,
    listing: Optional[Listing] = None,
) -> Dataset:
    """A BridgePairs (default) or, with ``corrupted_only``, a corrupted-only dataset.

    With ``corrupted_only``: 'corrupted:', 'paired:' and the DDBM layout specs
    read corrupted images only; clean specs (skimage, fashion-mnist, folders)
    synthesize ``xT`` from clean images (synthetic experiments, see
    CorruptedOnly). ``listing``: see ``make_source``.
    """
    source = make_source(
        spec,
        size=size,
        channels=channels,
        split=split,
        degradation=degradation,
        seed=seed,
        listing=listing,
        corrupted_only=corrupted_only,
    )
    if corrupted_only:
        if isinstance(source, CorruptedFolder) or getattr(source, "corrupted_only", False):
            return source
        return CorruptedOnly(source, degradation)
    if isinstance(source, CorruptedFolder):
        raise ValueError(
            f"data spec {spec!r} holds corrupted images only (no x0); use it with corrupted_only=True (distillation)"
        )
    return BridgePairs(source, degradation)


def collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack a list of item dicts (all with the same keys) into a batch dict."""
    if not items:
        raise ValueError("collate: empty batch")
    keys = set(items[0])
    for i, item in enumerate(items[1:], start=1):
        if set(item) != keys:
            raise ValueError(f"collate: item {i} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    return default_collate(items)
