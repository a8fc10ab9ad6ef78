"""Fashion-MNIST from local idx files (never downloaded).

Looks in ``root`` or, by default, ``$IBMD_FAST_FASHION_MNIST`` when set, else
``/usr/share/datasets/fashion-mnist`` (where the Debian package
``dataset-fashion-mnist`` installs it), for
``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with or without ``.gz``.
Images are padded 28 -> 32 with black (-1), so the 4x and 2x downsamplings of
the degradations and the U-Net divide evenly.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ibmd_fast.data.images import Size, as_hw, check_channels, to_channels

__all__ = ["FashionMNIST", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx"]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR = Path(os.environ.get("IBMD_FAST_FASHION_MNIST") or DEBIAN_FASHION_MNIST_DIR)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_PAD = 2  # 28 + 2 + 2 = 32


def read_idx(path) -> np.ndarray:
    """Read an unsigned-byte idx file (raw or gzipped) into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: idx element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data for shape {shape}, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in folder {str(root)!r}. "
        f"Install the Debian package `dataset-fashion-mnist` (it puts the files in {DEBIAN_FASHION_MNIST_DIR}) "
        "or pass (or set IBMD_FAST_FASHION_MNIST to) the folder that holds the idx files."
    )


@functools.lru_cache(maxsize=4)
def _load(images_path: Path, labels_path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files disagree: images {images.shape} in {images_path}, "
            f"labels {labels.shape} in {labels_path}"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST items ``(image, label)``: image float ``[C, 32, 32]`` in [-1, 1].

    ``size``: 32 by default (the padded size); another size resizes the padded
    image (bilinear, antialiased). ``channels``: 1, or 3 (replicated gray).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root=None, split: str = "train", size: Size = 32, channels: int = 1):
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root) if root is not None else FASHION_MNIST_DIR
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST folder {str(self.root)!r} does not exist. Install the Debian package "
                f"`dataset-fashion-mnist` (it puts the idx files in {DEBIAN_FASHION_MNIST_DIR}) "
                "or pass (or set IBMD_FAST_FASHION_MNIST to) the folder that holds them."
            )
        self.split = split
        self.size = as_hw(size) or (28 + 2 * _PAD, 28 + 2 * _PAD)
        self.channels = check_channels(channels)
        images_name, labels_name = _FILES[split]
        self.images, self.labels = _load(_find(self.root, images_name), _find(self.root, labels_name))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.images[index].to(torch.float32).div(127.5).sub(1.0)[None]
        x = F.pad(x, (_PAD, _PAD, _PAD, _PAD), value=-1.0)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(
                -1.0, 1.0
            )
        return to_channels(x, self.channels), int(self.labels[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, size={self.size})"
