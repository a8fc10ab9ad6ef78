"""Tests for ibmd_fast.data: sources, degradations, pair and corrupted-only pipelines."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import ibmd_fast
from ibmd_fast.data import (
    DATASET_PHOTOS,
    DEFAULT_SCALE,
    DEGRADATIONS,
    I2SB_DEGRADATIONS,
    FASHION_MNIST_DIR,
    HELD_OUT_PHOTO,
    SKIMAGE_PHOTOS,
    BridgePairs,
    CorruptedFolder,
    CorruptedOnly,
    FashionMNIST,
    ImageFolder,
    PairedFolders,
    SkimagePhotos,
    UnreadableImageWarning,
    collate,
    get_degradation,
    load_skimage_photo,
    make_dataset,
    make_source,
    read_idx,
    tensor_to_uint8,
)
from ibmd_fast.data.degradations import Degradation


# ---------------------------------------------------------------- helpers


def _smooth_image(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """A uint8 test picture with gradients, a disk and a little texture."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = []
    for _ in range(channels):
        a, b, c = rng.uniform(-1, 1, 3)
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        plane = 0.5 + 0.25 * (a * xx + b * yy) + 0.3 * c * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        plane += 0.05 * rng.standard_normal((h, w))
        planes.append(plane)
    image = np.clip(np.stack(planes, -1) * 255, 0, 255).astype(np.uint8)
    return image[:, :, 0] if channels == 1 else image


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _batch_image(seed: int = 0, channels: int = 3, size: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    a = _smooth_image(rng, size, size, channels)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture()
def image_tree(tmp_path: Path) -> Path:
    """Nested folder: 7 good images in 6 formats, 1 truncated, 1 non-image, 1 ignored .txt."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    _save(root / "a.png", _smooth_image(rng, 40, 48))
    _save(root / "sub" / "b.JPG", _smooth_image(rng, 36, 36), quality=90)
    _save(root / "sub" / "deeper" / "c.webp", _smooth_image(rng, 32, 40))
    _save(root / "sub" / "d.bmp", _smooth_image(rng, 33, 35))
    _save(root / "sub" / "deeper" / "e.tiff", _smooth_image(rng, 50, 40))
    _save(root / "f_gray.png", _smooth_image(rng, 40, 40, channels=1))
    sixteen = (np.linspace(0, 65535, 36 * 36).reshape(36, 36)).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "g16.png")
    good = root / "sub" / "h.png"
    _save(good, _smooth_image(rng, 64, 64))
    data = good.read_bytes()
    (root / "sub" / "truncated.png").write_bytes(data[: len(data) // 2])
    good.unlink()
    (root / "notes.jpg").write_text("this is not an image")
    (root / "readme.txt").write_text("ignored: not an image extension")
    (root / ".hidden.png").write_text("ignored: hidden")
    return root


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_skips_unreadable_with_one_warning(image_tree: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(image_tree, size=32, check="load")  # decode up front (the default only lists)
    unreadable = [w for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(unreadable) == 1
    message = str(unreadable[0].message)
    assert "skipped 2" in message and "truncated.png" in message and "notes.jpg" in message
    assert len(ds) == 7 and len(ds.skipped) == 2
    assert sorted(ds.files)[0] == "a.png" and "sub/deeper/c.webp" in ds.files
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0


def test_image_folder_gray_sizes_and_crops(image_tree: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        gray = ImageFolder(image_tree, size=(24, 16), channels=1, crop="random", flip=True)
        native = ImageFolder(image_tree)
    assert all(gray[i].shape == (1, 24, 16) for i in range(len(gray)))
    assert native[native.files.index("a.png")].shape == (3, 40, 48)  # no size: own size
    x16 = native[native.files.index("g16.png")]
    assert x16.min() == -1.0 and x16.max() == 1.0  # 16-bit scaled to the full range, not clipped


def test_image_folder_never_crashes_mid_epoch(image_tree: Path):
    ds = ImageFolder(image_tree, size=16)  # the default: no scan, the bad files stay listed
    assert len(ds) == 9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) for x in items)
    assert len(ds.runtime_skipped) == 2
    assert len([w for w in caught if issubclass(w.category, UnreadableImageWarning)]) == 2  # one per bad file


def test_image_folder_empty_or_missing(tmp_path: Path):
    empty = tmp_path / "empty_dir"
    (empty / "nested").mkdir(parents=True)
    (empty / "nested" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty_dir"):
        ImageFolder(empty)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ImageFolder(tmp_path / "no_such_dir")
    broken = tmp_path / "all_broken"
    broken.mkdir()
    (broken / "x.png").write_text("nope")
    with pytest.raises(ValueError, match="all_broken"):
        ImageFolder(broken, check="load")
    lazy = ImageFolder(broken)  # the default lists only: the failure comes with the first read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        with pytest.raises(RuntimeError, match="none of the 1 items could be read.*all_broken"):
            lazy[0]


# ---------------------------------------------------------------- PairedFolders


def _make_pairs(tmp_path: Path, n: int = 3, corrupted_ext: str = ".png", low_res: bool = False):
    rng = np.random.default_rng(1)
    clean_root, corrupted_root = tmp_path / "clean", tmp_path / "corrupted"
    for i in range(n):
        rel = Path(f"part{i % 2}") / f"img{i}"
        image = _smooth_image(rng, 48, 64)
        _save(clean_root / rel.with_suffix(".png"), image)
        if low_res:
            image = np.asarray(Image.fromarray(image).resize((16, 12), Image.BICUBIC))
        _save(corrupted_root / rel.with_suffix(corrupted_ext), image)
    return clean_root, corrupted_root


def test_paired_folders_match_by_path_and_share_crops(tmp_path: Path):
    clean_root, corrupted_root = _make_pairs(tmp_path)  # corrupted == clean, so crops must agree exactly
    ds = PairedFolders(clean_root, corrupted_root, size=32, crop="random", flip=True)
    assert len(ds) == 3
    torch.manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"x0", "xT"} and item["x0"].shape == (3, 32, 32)
        assert torch.equal(item["x0"], item["xT"])


def test_paired_folders_other_extension_low_res_and_mask(tmp_path: Path):
    clean_root, corrupted_root = _make_pairs(tmp_path, corrupted_ext=".jpg", low_res=True)
    ds = PairedFolders(clean_root, corrupted_root, size=32, channels=1, degradation="inpaint-center")
    item = ds[0]
    assert item["x0"].shape == item["xT"].shape == (1, 32, 32)
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 16 * 16
    assert torch.all(item["xT"][item["mask"].bool()] == 0)


def test_paired_folders_unmatched(tmp_path: Path):
    clean_root, corrupted_root = _make_pairs(tmp_path, n=4)
    (corrupted_root / "part0" / "img0.png").unlink()
    _save(corrupted_root / "extra" / "stray.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1 clean file\(s\).*1 corrupted file\(s\)"):
        PairedFolders(clean_root, corrupted_root)
    with pytest.warns(UserWarning, match="dropping"):
        ds = PairedFolders(clean_root, corrupted_root, allow_unmatched=True)
    assert len(ds) == 3


# ---------------------------------------------------------------- SkimagePhotos


@pytest.fixture(scope="module")
def photos_train():
    return SkimagePhotos(size=32, split="train", n_items=24, seed=0)


def test_skimage_photos_all_bundled_photos_load_offline():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a photo that failed to load would warn
        ds = SkimagePhotos(size=64, split="test", n_items=len(SKIMAGE_PHOTOS), images=SKIMAGE_PHOTOS)
    assert list(ds.photos) == list(SKIMAGE_PHOTOS)
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01


def test_skimage_photos_default_scale_and_held_out_photo():
    """By default each photo is downscaled by DEFAULT_SCALE before cropping, and chelsea is in no split."""
    assert DEFAULT_SCALE == 0.25 and HELD_OUT_PHOTO not in DATASET_PHOTOS
    assert set(DATASET_PHOTOS) | {HELD_OUT_PHOTO} == set(SKIMAGE_PHOTOS)
    for split in ("train", "test"):
        ds = SkimagePhotos(size=32, split=split, n_items=12, flip=False)
        assert list(ds.photos) == list(DATASET_PHOTOS)
        for name in DATASET_PHOTOS:
            h, w = load_skimage_photo(name).shape[:2]
            long_side = round((h if h >= w else w) * (0.75 if split == "train" else 0.25))
            region = (long_side, w) if h >= w else (h, long_side)
            expected = tuple(max(32, round(side * DEFAULT_SCALE)) for side in region)
            assert tuple(ds.photos[name].shape[-2:]) == expected, (split, name)
        for i in range(len(ds)):
            name, top, left, _ = ds.crop_params(i)
            assert torch.equal(ds[i], ds.photos[name][:, top : top + 32, left : left + 32])


def test_skimage_default_scale_leaves_something_to_restore():
    """The docstring's figures: 4x bicubic SR (antialiased down, bicubic up) keeps 32.5 dB on full-scale
    test crops, 25.7 dB at 1/4 scale."""
    from ibmd_fast.metrics import psnr

    sr = get_degradation("sr4x-bicubic-aa")
    scores = {}
    for scale in (1.0, DEFAULT_SCALE):
        ds = SkimagePhotos(size=32, split="test", n_items=64, scale=scale, flip=False, images=SKIMAGE_PHOTOS)
        x0 = torch.stack([ds[i] for i in range(64)])
        scores[scale] = float(psnr(sr(x0)[0], x0).mean())
    assert scores[1.0] == pytest.approx(32.5, abs=0.1) and scores[DEFAULT_SCALE] == pytest.approx(25.7, abs=0.1)


def test_skimage_photos_deterministic_and_splits_differ(photos_train):
    again = SkimagePhotos(size=32, split="train", n_items=24, seed=0)
    other_seed = SkimagePhotos(size=32, split="train", n_items=24, seed=1)
    test = SkimagePhotos(size=32, split="test", n_items=24, seed=0)
    for i in range(len(photos_train)):
        assert torch.equal(photos_train[i], again[i])
        assert torch.equal(photos_train[i], photos_train[i])
    assert any(not torch.equal(photos_train[i], other_seed[i]) for i in range(24))
    assert all(not torch.equal(photos_train[i], test[i]) for i in range(24))
    # disjoint regions: train and test cut each photo in two along its longer side
    for name in DATASET_PHOTOS:
        tr, te = photos_train.photos[name].shape[-2:], test.photos[name].shape[-2:]
        assert tr[0] == te[0] or tr[1] == te[1]


def test_skimage_photos_epochs_and_grayscale(photos_train):
    first = [photos_train[i] for i in range(8)]
    photos_train.set_epoch(1)
    try:
        assert any(not torch.equal(a, photos_train[i]) for i, a in enumerate(first))
    finally:
        photos_train.set_epoch(0)
    test = SkimagePhotos(size=32, split="test", n_items=8, channels=1)
    before = [test[i] for i in range(8)]
    test.set_epoch(5)
    assert all(torch.equal(a, test[i]) for i, a in enumerate(before))  # test crops never change
    assert before[0].shape == (1, 32, 32)
    big = SkimagePhotos(size=160, split="test", n_items=7, flip=False)  # larger than some test regions
    assert all(big[i].shape == (3, 160, 160) for i in range(7))


# ---------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path: Path, gz: bool):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 2], np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    ds = FashionMNIST(tmp_path, split="test")
    x, label = ds[2]
    assert len(ds) == 5 and label == 9 and x.shape == (1, 32, 32)
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, -2:] == -1)  # black padding
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(images[2]).float() / 127.5 - 1)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(tmp_path, split="train")


def test_fashion_mnist_missing_folder_names_it_and_the_package(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")


def test_fashion_mnist_default_folder_from_the_environment(tmp_path: Path):
    """IBMD_FAST_FASHION_MNIST moves the default folder (a copy carried to another machine, say)."""
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 5, 6], np.uint8), True)
    code = (
        "from ibmd_fast.data import FASHION_MNIST_DIR, FashionMNIST; ds = FashionMNIST(split='test'); "
        "print(FASHION_MNIST_DIR, len(ds), ds[1][1])"
    )
    env = {
        **os.environ,
        "IBMD_FAST_FASHION_MNIST": str(tmp_path),
        "PYTHONPATH": str(Path(ibmd_fast.__file__).resolve().parent.parent),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path), "3", "5"]
    env["IBMD_FAST_FASHION_MNIST"] = str(tmp_path / "gone")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "gone" in out.stderr and "IBMD_FAST_FASHION_MNIST" in out.stderr


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason=f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist"
)
def test_fashion_mnist_installed():
    test = FashionMNIST(split="test")
    train = FashionMNIST(split="train", channels=3)
    assert len(test) == 10000 and len(train) == 60000
    x, label = test[0]
    assert x.shape == (1, 32, 32) and 0 <= label <= 9 and x.min() == -1.0 and x.max() <= 1.0
    assert torch.all(x[:, :2] == -1)
    assert train[0][0].shape == (3, 32, 32)
    labels = test.labels.bincount()
    assert labels.tolist() == [1000] * 10


# ---------------------------------------------------------------- degradations


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", DEGRADATIONS)
def test_degradation_shapes_and_range(name: str, channels: int, tmp_path):
    masks = None
    if "freeform" in name:  # I2SB's mask file layout, at this test's size
        masks = tmp_path / f"imagenet_{name.split('-')[1]}_masks.npz"
        np.savez(masks, mask=(np.random.default_rng(0).random((3, 32, 32)) < 0.2).astype(np.uint8))
    degradation = get_degradation(name, masks=masks)
    assert degradation.name == name and degradation.is_inpainting == name.startswith("inpaint-")
    x0 = _batch_image(channels=channels)
    xT, mask = degradation(x0, rng=torch.Generator().manual_seed(0))
    assert xT.shape == x0.shape and xT.dtype == torch.float32
    # I2SB's operators are not clipped (JPEG and bicubic ringing may leave [-1, 1] a little)
    bound = 1.1 if name in I2SB_DEGRADATIONS else 1.0
    assert -bound <= xT.min() and xT.max() <= bound
    assert (mask is not None) == degradation.is_inpainting
    batch = torch.stack([x0, _batch_image(seed=1, channels=channels)])
    xT_batch, mask_batch = degradation(batch, rng=torch.Generator().manual_seed(0))
    assert xT_batch.shape == batch.shape
    assert torch.allclose(xT_batch[0], xT, atol=1e-5)
    if mask is not None:
        assert mask.shape == (1, 32, 32) and mask_batch.shape == (2, 1, 32, 32)


def test_jpeg_changes_image_and_lower_quality_changes_more():
    x0 = _batch_image(size=64)
    err5 = (get_degradation("jpeg-5")(x0)[0] - x0).abs().mean()
    err10 = (get_degradation("jpeg-10")(x0)[0] - x0).abs().mean()
    assert err10 > 0.01 and err5 > err10
    gray = _batch_image(channels=1, size=64)
    assert (get_degradation("jpeg-10")(gray)[0] - gray).abs().mean() > 0.005


@pytest.mark.parametrize("channels", [1, 3])
def test_super_resolution_inputs(channels: int):
    x0 = _batch_image(channels=channels)
    pool = get_degradation("sr4x-pool")
    xT, _ = pool(x0)
    # nearest upsampling of the 4x average-pooled image: pooling it again recovers that image
    assert torch.allclose(F.avg_pool2d(xT[None], 4)[0], F.avg_pool2d(x0[None], 4)[0], atol=1e-6)
    assert torch.equal(xT, xT[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))
    # I2SB's bicubic (DDRM's matrix) upsamples with nearest too
    i2sb, _ = get_degradation("sr4x-bicubic")(x0)
    assert torch.equal(i2sb, i2sb[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))
    bicubic = get_degradation("sr4x-bicubic-aa")
    xT, _ = bicubic(x0)
    low = F.interpolate(x0[None], size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(xT, F.interpolate(low, size=(32, 32), mode="bicubic").clamp(-1, 1)[0], atol=1e-6)
    assert torch.allclose(bicubic.downsample(x0), low[0])
    # the low-resolution content survives the round trip; the detail does not
    again = bicubic.downsample(xT)
    assert (again - low[0]).abs().mean() < 0.5 * (xT - x0).abs().mean()
    with pytest.raises(ValueError, match="divisible"):
        bicubic(torch.zeros(3, 30, 30))


@pytest.mark.parametrize("channels", [1, 3])
def test_inpaint_center_mask_and_known_pixels(channels: int):
    x0 = _batch_image(channels=channels)
    xT, mask = get_degradation("inpaint-center")(x0)
    expected = torch.zeros(1, 32, 32)
    expected[:, 8:24, 8:24] = 1
    assert torch.equal(mask, expected)
    known = ~mask.bool().expand_as(x0)
    assert torch.equal(xT[known], x0[known])
    assert torch.all(xT[~known] == 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_sketch_is_binary_edges(channels: int):
    x0 = -torch.ones(channels, 32, 32)
    x0[:, 8:24, 8:24] = 0.8
    xT, _ = get_degradation("sketch")(x0)
    assert set(xT.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(xT, xT[:1].expand_as(xT))
    edges = xT[0] > 0
    assert edges[8:24, 8:24].sum() + edges[6:26, 6:26].sum() > 0 and not edges[:4].any()
    flat, _ = get_degradation("sketch")(torch.zeros(channels, 32, 32))
    assert torch.all(flat == -1)


def test_get_degradation_names():
    with pytest.raises(ValueError, match="unknown degradation"):
        get_degradation("blur")
    assert get_degradation("jpeg-30").quality == 30 and get_degradation("sr2x-pool").factor == 2
    degradation = get_degradation("sketch")
    assert get_degradation(degradation) is degradation


# ---------------------------------------------------------------- pipelines


class _LabelledSource(Dataset):
    def __init__(self, n: int = 4, channels: int = 3):
        self.images = [_batch_image(seed=i, channels=channels) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].clone(), i % 10


def test_bridge_pairs_items_and_collate():
    pairs = BridgePairs(_LabelledSource(), "inpaint-center")
    item = pairs[1]
    assert set(item) == {"x0", "xT", "mask", "label"} and item["label"] == 1
    batch = next(iter(DataLoader(pairs, batch_size=4, collate_fn=collate)))
    assert batch["x0"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["label"].tolist() == [0, 1, 2, 3]
    sr = BridgePairs(SkimagePhotos(size=32, n_items=4, channels=1), "sr4x-bicubic")
    assert set(sr[0]) == {"x0", "xT"} and sr[0]["xT"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="degradation"):
        BridgePairs(_LabelledSource())
    with pytest.raises(ValueError, match="keys"):
        collate([{"xT": torch.zeros(1)}, {"xT": torch.zeros(1), "mask": torch.zeros(1)}])


class _PoisoningDegradation(Degradation):
    """Degrades, then overwrites the clean tensor with NaN: any later use of it shows."""

    def __init__(self, inner: str):
        self.inner = get_degradation(inner)
        self.name, self.is_inpainting = self.inner.name, self.inner.is_inpainting

    def __call__(self, x0, rng=None):
        xT, mask = self.inner(x0, rng)
        x0.fill_(float("nan"))
        return xT, mask


@pytest.mark.parametrize("name", ["jpeg-10", "inpaint-center"])
def test_corrupted_only_synthetic_never_returns_clean(name: str):
    source = _LabelledSource()
    dataset = CorruptedOnly(source, _PoisoningDegradation(name))
    assert dataset.synthetic
    for i in range(len(dataset)):
        item = dataset[i]
        expected_keys = {"xT", "mask", "label"} if name == "inpaint-center" else {"xT", "label"}
        assert set(item) == expected_keys  # no "x0"; the class label stays (a class-conditional teacher takes it)
        assert item["label"].dtype == torch.int64 and int(item["label"]) == i % 10
        assert torch.isfinite(item["xT"]).all()  # nothing derived from x0 after the degradation
        assert not torch.equal(item["xT"], source.images[i])
    with pytest.raises(ValueError, match="degradation"):
        CorruptedOnly(source)


def test_corrupted_folder_end_to_end(tmp_path: Path):
    """A folder holding ONLY corrupted images feeds the corrupted-only pipeline."""
    rng = np.random.default_rng(3)
    root = tmp_path / "only_corrupted"
    jpeg = get_degradation("jpeg-10")
    for i in range(5):
        x0 = torch.from_numpy(_smooth_image(rng, 32, 32)).permute(2, 0, 1).float() / 127.5 - 1
        _save(root / f"d{i % 2}" / f"{i}.png", tensor_to_uint8(jpeg(x0)[0]))
    dataset = make_dataset(f"corrupted:{root}", "jpeg-10", size=32, split="test", corrupted_only=True)
    assert isinstance(dataset, CorruptedFolder)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate))
    assert [set(b) for b in batches] == [{"xT"}] * 3
    assert sum(b["xT"].shape[0] for b in batches) == 5
    # the same folder through CorruptedOnly(path), with the inpainting mask
    inpaint = CorruptedOnly(root, "inpaint-center", size=32, channels=1)
    item = inpaint[0]
    assert set(item) == {"xT", "mask"} and item["xT"].shape == (1, 32, 32) and item["mask"].sum() == 256
    with pytest.raises(ValueError, match="corrupted_only"):
        make_dataset(f"corrupted:{root}", "jpeg-10")
    with pytest.raises(ValueError, match="crop"):
        CorruptedFolder(root, size=16, degradation="inpaint-center", crop="random")


def test_corrupted_only_paired_reads_only_corrupted_side(tmp_path: Path):
    clean_root, corrupted_root = _make_pairs(tmp_path)
    paired = PairedFolders(clean_root, corrupted_root, size=32)
    shutil.rmtree(clean_root)  # clean images are gone: reading one would fail
    dataset = CorruptedOnly(paired)
    assert not dataset.synthetic
    assert all(set(dataset[i]) == {"xT"} for i in range(len(dataset)))
    assert len(dataset) == 3


# ---------------------------------------------------------------- specs


def test_make_source_specs(tmp_path: Path, image_tree: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        folder = make_source(f"folder:{image_tree}", size=16, split="test")
        bare = make_source(str(image_tree), size=16, channels=1)
    assert isinstance(folder, ImageFolder) and folder.crop == "center" and not folder.flip
    assert isinstance(bare, ImageFolder) and bare.crop == "random" and bare.flip and bare[0].shape == (1, 16, 16)
    # training folders are listed only; held-out ones are decoded up front and lose their 2 bad files
    assert len(bare) == 9 and len(folder) == 7 and len(folder.skipped) == 2
    skim = make_source("skimage", split="test")
    assert isinstance(skim, SkimagePhotos) and skim[0].shape == (3, 64, 64)
    clean_root, corrupted_root = _make_pairs(tmp_path)
    paired = make_dataset(f"paired:{clean_root},{corrupted_root}", size=32, split="test")
    assert isinstance(paired, BridgePairs) and set(paired[0]) == {"x0", "xT"}
    only = make_dataset(f"paired:{clean_root},{corrupted_root}", size=32, corrupted_only=True)
    assert set(only[0]) == {"xT"}
    synthetic = make_dataset("skimage", "sr4x-pool", size=32, split="test", corrupted_only=True)
    assert isinstance(synthetic, CorruptedOnly) and synthetic.synthetic and set(synthetic[0]) == {"xT"}
    # a folder with train/ and test/ subfolders uses the one named after the split
    _save(tmp_path / "split" / "train" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "split" / "test" / "b.png", np.zeros((8, 8, 3), np.uint8))
    assert make_source(f"folder:{tmp_path / 'split'}", split="test").files == ["b.png"]
    with pytest.raises(ValueError, match="unknown data spec"):
        make_source("imagenet")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        make_source(f"folder:{tmp_path / 'missing_dir'}")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        make_source(str(tmp_path / "missing_dir"))


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason=f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist"
)
def test_make_dataset_fashion_mnist():
    pairs = make_dataset("fashion-mnist", "sr4x-pool", channels=1, split="test")
    item = pairs[0]
    assert set(item) == {"x0", "xT", "label"} and item["x0"].shape == (1, 32, 32)
    only = make_dataset(f"fashion-mnist:{FASHION_MNIST_DIR}", "jpeg-10", channels=1, split="test", corrupted_only=True)
    assert set(only[0]) == {"xT", "label"}  # the class a class-conditional teacher takes
