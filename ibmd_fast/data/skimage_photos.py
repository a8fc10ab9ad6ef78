"""Random crops of the color photographs bundled with scikit-image.

The embedded default data set: it needs no download, so ``distill``,
``sample``, ``eval`` and ``export`` run out of the box. Only images shipped
inside the scikit-image wheel are used (checked on scikit-image 0.26 with no
network and no ``pooch``); an image that fails to load is left out with one
warning.

Train/test split by disjoint regions: each photo is cut across its longer
side; the first ``1 - test_fraction`` of it gives train crops, the rest test
crops, so no test pixel is ever seen in training. A region smaller than
``size`` (or a ``scale`` that would make it so) is upscaled just enough.

Scale: by default the photos are downscaled by ``DEFAULT_SCALE`` (1/4) before
cropping, so a 32x32 crop holds a piece of a scene (an eye, a cup's rim) rather
than a smooth patch of a 512-pixel photo; at full scale most crops are nearly
flat and a restoration has little to restore (measured on 64 test crops: 4x
bicubic super-resolution of full-scale crops keeps 32.5 dB PSNR, of 1/4-scale
crops 25.7 dB).

Held out: ``HELD_OUT_PHOTO`` (chelsea, the cat) is in neither split by default;
``held_out_photo()`` returns it whole, at the data's scale, for figures of a
photograph no model has seen.

Determinism: item ``i`` comes from photo ``i % n_photos``; its crop offset and
flip come from ``numpy.random.default_rng([seed, split, epoch, i])``. Test
items ignore the epoch, so they are the same crops forever; train items change
when ``set_epoch(epoch)`` is called (call it once per epoch, before building
the DataLoader iterator) and are otherwise fixed too.
"""

from __future__ import annotations

import functools
import warnings
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ibmd_fast.data.images import check_channels, to_channels, uint8_to_tensor

__all__ = [
    "SkimagePhotos",
    "SKIMAGE_PHOTOS",
    "DATASET_PHOTOS",
    "HELD_OUT_PHOTO",
    "DEFAULT_SCALE",
    "load_skimage_photo",
    "held_out_photo",
]

# Color photographs that ship inside the scikit-image package (no pooch download).
SKIMAGE_PHOTOS = (
    "astronaut",  # 512 x 512
    "coffee",  # 400 x 600
    "chelsea",  # 300 x 451 (the same file as data.cat)
    "rocket",  # 427 x 640
    "hubble_deep_field",  # 872 x 1000
    "immunohistochemistry",  # 512 x 512
    "motorcycle",  # 500 x 741, left view of data.stereo_motorcycle
)
HELD_OUT_PHOTO = "chelsea"
DATASET_PHOTOS = tuple(name for name in SKIMAGE_PHOTOS if name != HELD_OUT_PHOTO)  # both splits, by default
DEFAULT_SCALE = 0.25
_SPLITS = {"train": 0, "test": 1}


@functools.lru_cache(maxsize=None)
def load_skimage_photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 ``[H, W, 3]`` (cached)."""
    import skimage.data

    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"skimage.data.{name} is not an 8-bit color photo (shape {image.shape}, {image.dtype})")
    return np.ascontiguousarray(image[:, :, :3])


def _resize(photo: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[C, H, W]`` in [-1, 1] -> ``[C, height, width]`` (bicubic with antialias, clamped)."""
    if tuple(photo.shape[-2:]) == (height, width):
        return photo
    return F.interpolate(photo[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[
        0
    ].clamp_(-1.0, 1.0)


def held_out_photo(
    channels: int = 3, scale: float = DEFAULT_SCALE, multiple: int = 8, name: str = HELD_OUT_PHOTO
) -> torch.Tensor:
    """The whole held-out photo in [-1, 1], ``[C, H, W]``: resized by ``scale``, then
    center-cropped to sides divisible by ``multiple`` (what a U-Net with that many
    downsamplings takes)."""
    if scale <= 0 or multiple < 1:
        raise ValueError(f"scale must be positive and multiple >= 1, got {scale}, {multiple}")
    photo = uint8_to_tensor(load_skimage_photo(name))
    h, w = photo.shape[-2:]
    h, w = max(multiple, round(h * scale)), max(multiple, round(w * scale))
    photo = _resize(photo, h, w)
    top, left = (h % multiple) // 2, (w % multiple) // 2
    photo = photo[:, top : top + h - h % multiple, left : left + w - w % multiple]
    return to_channels(photo, check_channels(channels)).contiguous()


def _region(image: np.ndarray, split: str, test_fraction: float) -> np.ndarray:
    h, w = image.shape[:2]
    if h >= w:
        cut = round(h * (1.0 - test_fraction))
        return image[:cut] if split == "train" else image[cut:]
    cut = round(w * (1.0 - test_fraction))
    return image[:, :cut] if split == "train" else image[:, cut:]


class SkimagePhotos(Dataset):
    """``n_items`` crops of ``size`` x ``size`` from the bundled photos, in [-1, 1].

    Arguments: ``split`` "train" or "test"; ``n_items`` (default 8192 for
    train, 512 for test); ``channels`` 1 (luma) or 3; ``seed``; ``flip``
    (random horizontal flips, deterministic per item); ``scale`` (resize the
    photos by this factor before cropping; < 1 puts more of a scene in a
    crop; default ``DEFAULT_SCALE``); ``images`` (names from ``SKIMAGE_PHOTOS``;
    default ``DATASET_PHOTOS``, all but the held-out one); ``test_fraction``
    (share of each photo held out for test). See the module docstring for
    the split and the seeding.
    """

    def __init__(
        self,
        size: int = 64,
        split: str = "train",
        n_items: int = None,
        channels: int = 3,
        seed: int = 0,
        flip: bool = True,
        scale: float = DEFAULT_SCALE,
        images: Sequence[str] = DATASET_PHOTOS,
        test_fraction: float = 0.25,
    ):
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.size, self.split, self.seed, self.flip = size, split, int(seed), bool(flip)
        self.channels = check_channels(channels)
        self.n_items = int(n_items) if n_items is not None else (8192 if split == "train" else 512)
        if self.n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        self.epoch = 0

        self.photos: Dict[str, torch.Tensor] = {}
        failed = []
        for name in images:
            try:
                region = _region(load_skimage_photo(name), split, test_fraction)
            except Exception as exc:  # e.g. a future scikit-image that needs a download
                failed.append(f"{name} ({type(exc).__name__}: {exc})")
                continue
            photo = uint8_to_tensor(region)
            h, w = photo.shape[-2:]
            factor = max(scale, size / h, size / w)  # never smaller than a crop
            if factor != 1.0:
                photo = _resize(photo, max(size, round(h * factor)), max(size, round(w * factor)))
            self.photos[name] = to_channels(photo, self.channels).contiguous()
        if failed:
            warnings.warn(
                f"SkimagePhotos: left out {len(failed)} photo(s) that did not load: " + "; ".join(failed),
                UserWarning,
                stacklevel=2,
            )
        if not self.photos:
            raise RuntimeError("SkimagePhotos: none of the scikit-image photos could be loaded: " + "; ".join(failed))
        self._names = list(self.photos)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the train crops for a new epoch (test crops never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_items

    @property
    def photo_names(self) -> tuple:
        """The photographs the crops come from, in the order of ``photo_index``."""
        return tuple(self._names)

    def photo_index(self, index: int) -> int:
        """Which photograph (an index into ``photo_names``) item ``index`` is cropped from: the proxy
        label of the FID/CA classifier on this unlabeled data (``evaluate.fit_classifier``)."""
        return (index % self.n_items) % len(self._names)

    def crop_params(self, index: int) -> Tuple[str, int, int, bool]:
        """``(photo name, top, left, flipped)`` of item ``index``."""
        name = self._names[self.photo_index(index)]
        h, w = self.photos[name].shape[-2:]
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], epoch, index])
        top = int(rng.integers(0, h - self.size + 1))
        left = int(rng.integers(0, w - self.size + 1))
        flipped = self.flip and bool(rng.integers(0, 2))
        return name, top, left, flipped

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.n_items <= index < self.n_items:
            raise IndexError(f"index {index} out of range for SkimagePhotos of length {self.n_items}")
        name, top, left, flipped = self.crop_params(index % self.n_items)
        crop = self.photos[name][:, top : top + self.size, left : left + self.size]
        return crop.flip(-1) if flipped else crop.clone()

    def __repr__(self) -> str:
        return (
            f"SkimagePhotos(size={self.size}, split={self.split!r}, n_items={self.n_items}, "
            f"channels={self.channels}, seed={self.seed}, photos={self._names})"
        )
