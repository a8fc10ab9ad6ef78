"""The paired data sets of DDBM and DBIM, read as DiffusionBridge's ``datasets/aligned_dataset.py`` reads them.

Two layouts (``LAYOUTS``), each with ``train/`` and ``val/`` (the test split) under ``DIR``:

- ``edges2handbags`` (pix2pix): one image file per pair, the edge map A on the left half and the
  photo B on the right half (``A = crop(0, 0, w // 2, h)``, ``B = crop(w // 2, 0, w, h)``; with an
  odd width B gets the extra column). ``x0`` is the photo B, ``xT`` the edges A: their
  ``EdgesDataset`` returns ``(B, A)`` and their trainer takes the first as the data, the second
  as the bridge's other end. Files are found recursively by extension, sorted.
- ``diode``: ``X.png`` (the RGB photo, ``x0``) beside ``X_normal.png`` (the surface-normal map,
  ``xT``) in one folder (not recursive), as their ``preprocess_depth.py`` writes DIODE-256;
  ``X_depth.png`` is ignored. Their ``DIODE`` lists every file but the ``_depth.png`` and
  ``_normal.png`` ones and opens ``X[:-4] + "_normal.png"``; here a photo whose normal map is
  missing is an error naming it (``allow_unmatched=True``: dropped with a warning), not a crash in
  the middle of training.

Transforms, their ``get_transform`` (``get_params`` + ``__scale`` + ``__flip``): both images
converted to RGB; each RESIZED to ``size x size`` (the aspect ratio is not kept, and nothing is
cropped: their ``random_crop`` reaches ``get_transform`` but no crop is ever applied), bicubic,
except DIODE's normal map, resized with nearest (its values are directions, not intensities);
then, in the train split, one horizontal flip with probability 1/2 for BOTH images; then
``[0, 1] -> [-1, 1]``. The test split (``val/``) is not flipped, as their ``train=False`` sets
have ``random_flip=False``. Their flip comes from Python's ``random``; here from torch's default
generator, as every folder of this package (seeded per item by the trainers), with the same law.

``corrupted_only=True`` hands out ``{"xT"}`` only (distillation: MATH.md 5 needs no clean image;
DIODE's photo is then never opened). Nothing is decoded when the data set is built: see
``folders`` for the lazy check and ``Listing``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from PIL import Image

from ibmd_fast.data.folders import _SHOW, Listing, _FolderBase, list_images
from ibmd_fast.data.images import Size, pil_to_tensor

__all__ = ["LAYOUTS", "EdgesToHandbags", "DIODE", "layout_split_dir", "make_layout"]

PathLike = Union[str, os.PathLike]
LAYOUTS = ("edges2handbags", "diode")
_SPLIT_DIRS = {"train": "train", "test": "val"}


def layout_split_dir(root: PathLike, split: str, layout: str) -> Path:
    """``root/train`` or ``root/val`` (the test split), which must exist."""
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) / _SPLIT_DIRS[split]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{layout} layout: {str(folder)!r} does not exist (expected {str(root)!r} to hold "
            f"train/ and val/, as DiffusionBridge's {layout} data set does)"
        )
    return folder


def _square(image: Image.Image, size: Optional[Tuple[int, int]], method) -> Image.Image:
    """Their ``__scale``: resize to exactly ``size`` (height, width), the aspect ratio not kept."""
    if size is None:
        return image
    h, w = size
    return image if image.size == (w, h) else image.resize((w, h), method)


class _PairLayout(_FolderBase):
    """What both layouts share: the split folder, the transforms, the items."""

    yields_pairs = True  # BridgePairs needs no degradation for it
    layout = ""

    def _init(
        self, root: PathLike, split: str, size: Size, channels: int, flip: Optional[bool], corrupted_only: bool
    ) -> None:
        self._setup(size, channels, "center", split == "train" if flip is None else flip)
        self.dataset_root = Path(root)
        self.split = split
        self.root = layout_split_dir(root, split, self.layout)
        self.corrupted_only = bool(corrupted_only)

    def _transform(self, x0: Optional[Image.Image], xT: Image.Image, xT_method) -> Dict[str, torch.Tensor]:
        """Both images (RGB) resized, flipped together, in [-1, 1]; ``x0`` None is left out."""
        flip = self._flip_now()  # one draw for both images, as their get_params
        item = {}
        for key, image, method in (("x0", x0, Image.BICUBIC), ("xT", xT, xT_method)):
            if image is None:
                continue
            x = pil_to_tensor(_square(image, self.size, method), self.channels)
            item[key] = x.flip(-1) if flip else x
        return item

    def corrupted_side(self) -> "_PairLayout":
        """The same data set handing out ``{"xT"}`` only."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.runtime_skipped = {}
        twin.corrupted_only = True
        return twin

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.dataset_root)!r}, split={self.split!r}, n={len(self)}, "
            f"size={self.size}, flip={self.flip}, corrupted_only={self.corrupted_only})"
        )


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, inside the fallback of __getitem__
        return image.convert("RGB")


class EdgesToHandbags(_PairLayout):
    """pix2pix pairs ``A | B`` in one file: ``{"x0": B (photo), "xT": A (edges)}`` (see the module docstring).

    ``split``: "train" (``train/``) or "test" (``val/``). ``size``: the side both halves are
    resized to (None keeps their size). ``flip``: None = the train split flips, the test split
    does not.
    """

    layout = "edges2handbags"

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        size: Size = 64,
        channels: int = 3,
        flip: Optional[bool] = None,
        corrupted_only: bool = False,
        listing: Optional[Listing] = None,
    ):
        self._init(root, split, size, channels, flip, corrupted_only)
        self.files: List[str] = list_images(self.root, listing)
        if not self.files:
            raise ValueError(f"edges2handbags layout: no images in {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self.files)

    def _describe_item(self, index: int) -> str:
        return repr(self.files[index])

    def _read_item(self, index: int) -> Dict[str, torch.Tensor]:
        pair = _open_rgb(self.root / self.files[index])
        w, h = pair.size
        half = int(w / 2)
        edges = pair.crop((0, 0, half, h))
        photo = None if self.corrupted_only else pair.crop((half, 0, w, h))
        return self._transform(photo, edges, Image.BICUBIC)


_NORMAL, _DEPTH = "_normal.png", "_depth.png"


class DIODE(_PairLayout):
    """DIODE pairs ``X.png`` / ``X_normal.png``: ``{"x0": photo, "xT": normal map}`` (see the module docstring).

    Arguments as ``EdgesToHandbags``; ``allow_unmatched=True`` drops photos without a normal map
    (with a warning) instead of raising.
    """

    layout = "diode"

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        size: Size = 256,
        channels: int = 3,
        flip: Optional[bool] = None,
        corrupted_only: bool = False,
        listing: Optional[Listing] = None,
        allow_unmatched: bool = False,
    ):
        self._init(root, split, size, channels, flip, corrupted_only)
        listed = list_images(self.root, listing, recursive=False)
        photos = [n for n in listed if not (n.endswith(_NORMAL) or n.endswith(_DEPTH))]
        names = set(listed)
        pairs = [(p, p.rsplit(".", 1)[0] + _NORMAL) for p in photos]
        alone = [p for p, normal in pairs if normal not in names]
        if alone:
            message = (
                f"diode layout: {len(alone)} photo(s) in {str(self.root)!r} have no normal map beside them "
                f"(e.g. {alone[:_SHOW]}; expected X.png with X_normal.png)"
            )
            if not allow_unmatched:
                raise ValueError(message)
            warnings.warn(message + "; dropping them (allow_unmatched=True)", UserWarning, stacklevel=2)
        self.pairs: List[Tuple[str, str]] = [(p, n) for p, n in pairs if n in names]
        if not self.pairs:
            raise ValueError(f"diode layout: no X.png / X_normal.png pairs in {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _describe_item(self, index: int) -> str:
        return "the pair {!r} / {!r}".format(*self.pairs[index])

    def _read_item(self, index: int) -> Dict[str, torch.Tensor]:
        photo_name, normal_name = self.pairs[index]
        normal = _open_rgb(self.root / normal_name)
        photo = None if self.corrupted_only else _open_rgb(self.root / photo_name)
        return self._transform(photo, normal, Image.NEAREST)


def make_layout(
    layout: str,
    root: PathLike,
    split: str,
    size: Size,
    channels: int = 3,
    corrupted_only: bool = False,
    listing: Optional[Listing] = None,
) -> _PairLayout:
    """The data set of ``layout`` (one of ``LAYOUTS``) under ``root``."""
    if layout == "edges2handbags":
        return EdgesToHandbags(root, split, size, channels, corrupted_only=corrupted_only, listing=listing)
    if layout == "diode":
        return DIODE(root, split, size, channels, corrupted_only=corrupted_only, listing=listing)
    raise ValueError(f"unknown data layout {layout!r}; known: {', '.join(LAYOUTS)}")
