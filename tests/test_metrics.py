"""Tests for ibmd_fast.metrics: PSNR, SSIM (vs skimage), Frechet distance, the feature classifier."""

import math

import numpy as np
import pytest
import torch

from ibmd_fast import classifier as classifier_module
from ibmd_fast import metrics
from ibmd_fast.classifier import describe_classifier

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_data = pytest.importorskip("skimage.data")


def _to_unit(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 127.5 - 1.0


# ---------------------------------------------------------------------------- PSNR


def test_psnr_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(4, 3, 16, 16, generator=g)).clamp(-1, 1)
    got = metrics.psnr(x, y)
    assert got.shape == (4,)
    xd, yd = x.double().numpy(), y.double().numpy()
    for i in range(4):
        mse = np.mean((xd[i] - yd[i]) ** 2)
        assert got[i].item() == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-12)
    # data_range enters as 20 log10(range).
    assert metrics.psnr(x, y, data_range=1.0)[0].item() == pytest.approx(got[0].item() - 20 * math.log10(2), rel=1e-12)


def test_psnr_identical_images_is_inf():
    x = torch.rand(2, 1, 8, 8)
    assert torch.isinf(metrics.psnr(x, x)).all()


def test_psnr_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


# ---------------------------------------------------------------------------- SSIM


def _skimage_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    # x, y: [C, H, W]
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)
    if x.shape[0] == 1:
        return skimage_metrics.structural_similarity(x[0], y[0], **kwargs)
    return skimage_metrics.structural_similarity(x, y, channel_axis=0, **kwargs)


def _natural_pairs(channels: int):
    """Crops of skimage photographs and noisy/blurred versions of them, in [-1, 1]."""
    if channels == 1:
        img = _to_unit(skimage_data.camera())[None]  # [1, 512, 512]
    else:
        img = _to_unit(skimage_data.astronaut()).transpose(2, 0, 1)  # [3, 512, 512]
    clean = np.stack([img[:, 100:164, 120:184], img[:, 300:364, 200:264]])  # [2, C, 64, 64]
    rng = np.random.default_rng(1)
    noisy = np.clip(clean + 0.15 * rng.standard_normal(clean.shape), -1, 1)
    return clean, noisy


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage_random(channels):
    rng = np.random.default_rng(channels)
    x = rng.uniform(-1, 1, (3, channels, 24, 29))
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1)
    y[2] = rng.uniform(-1, 1, x.shape[1:])  # an unrelated pair too
    got = metrics.ssim(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got.shape == (3,)
    x32, y32 = torch.from_numpy(x).float().double().numpy(), torch.from_numpy(y).float().double().numpy()
    for i in range(3):
        assert got[i].item() == pytest.approx(_skimage_ssim(x32[i], y32[i]), abs=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage_natural(channels):
    clean, noisy = _natural_pairs(channels)
    got = metrics.ssim(torch.from_numpy(clean), torch.from_numpy(noisy))
    for i in range(clean.shape[0]):
        assert got[i].item() == pytest.approx(_skimage_ssim(clean[i], noisy[i]), abs=1e-4)
    # Identical images have SSIM 1, and another data range matches skimage too.
    same = metrics.ssim(torch.from_numpy(clean), torch.from_numpy(clean))
    assert torch.allclose(same, torch.ones(2, dtype=torch.float64))
    got_r1 = metrics.ssim(torch.from_numpy(clean), torch.from_numpy(noisy), data_range=1.0)
    assert got_r1[0].item() == pytest.approx(_skimage_ssim(clean[0], noisy[0], data_range=1.0), abs=1e-4)


def test_ssim_too_small_raises():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 1, 10, 32), torch.zeros(1, 1, 10, 32))


# ---------------------------------------------------------------------------- Frechet distance


def _diag_closed_form(m1, s1, m2, s2):
    return float(np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_frechet_distance_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.standard_normal(6)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_diagonal_closed_form_and_symmetric():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = _diag_closed_form(m1, s1, m2, s2)
    d12 = metrics.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    d21 = metrics.frechet_distance(m2, np.diag(s2), m1, np.diag(s1))
    assert d12 == pytest.approx(expected, rel=1e-10)
    assert d21 == pytest.approx(d12, rel=1e-10)
    # Torch tensors are accepted as well.
    dt = metrics.frechet_distance(
        torch.from_numpy(m1), torch.from_numpy(np.diag(s1)), torch.from_numpy(m2), torch.from_numpy(np.diag(s2))
    )
    assert dt == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_covariance():
    # Rank-deficient covariances (fewer samples than dimensions) still give a finite value.
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((4, 10)), rng.standard_normal((4, 10)) + 1.0
    d = metrics.fid_from_features(f1, f2)
    assert np.isfinite(d) and d > 0


def test_frechet_distance_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_from_features_approaches_closed_form():
    rng = np.random.default_rng(3)
    dim, n = 4, 40000
    m1, m2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 1.0])
    s1, s2 = np.array([1.0, 0.5, 2.0, 1.0]), np.array([0.5, 1.0, 1.0, 3.0])
    f1 = m1 + np.sqrt(s1) * rng.standard_normal((n, dim))
    f2 = m2 + np.sqrt(s2) * rng.standard_normal((n, dim))
    expected = _diag_closed_form(m1, s1, m2, s2)
    got = metrics.fid_from_features(torch.from_numpy(f1), torch.from_numpy(f2))
    assert got == pytest.approx(expected, abs=0.05)
    assert metrics.fid_from_features(f1, f2) > metrics.fid_from_features(f1[: n // 2], f1[n // 2 :]) >= -1e-9


# ---------------------------------------------------------------------------- Classifier


def _pattern_dataset(n_per_class=48, size=16, seed=0):
    """Three separable classes: horizontal stripes, vertical stripes, a centred blob."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    horiz = torch.sin(coords * 1.6)[:, None].expand(size, size)
    vert = torch.sin(coords * 1.6)[None, :].expand(size, size)
    c = (size - 1) / 2
    blob = torch.exp(-((coords[:, None] - c) ** 2 + (coords[None, :] - c) ** 2) / 12) * 2 - 1
    images, labels = [], []
    for label, pattern in enumerate([horiz, vert, blob]):
        noise = 0.2 * torch.randn(n_per_class, 1, size, size, generator=g)
        images.append((pattern[None, None] + noise).clamp(-1, 1))
        labels.append(torch.full((n_per_class,), label))
    return torch.cat(images), torch.cat(labels)


def test_classifier_shapes_and_config():
    model = classifier_module.Classifier(in_channels=3, num_classes=7, image_size=32, width=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.features(x).shape == (2, model.feature_dim)
    assert model(x).shape == (2, 7)
    assert model.config == dict(in_channels=3, num_classes=7, image_size=32, width=16, task="labels")


def test_train_classifier_separable_patterns():
    images, labels = _pattern_dataset()
    model = classifier_module.train_classifier(
        (images, labels),
        epochs=6,
        batch_size=32,
        lr=5e-3,
        seed=0,
        progress=False,
        augment="shift",
        width=8,
        device="cpu",
    )
    assert not model.training
    assert model.config["num_classes"] == 3
    test_images, test_labels = _pattern_dataset(n_per_class=20, seed=1)
    assert metrics.classifier_accuracy(model, test_images, test_labels) >= 90.0

    # A dataset of dicts, as the bridge data sets give, works too (one short epoch: the path, not the accuracy).
    class DictDataset(torch.utils.data.Dataset):
        def __len__(self):
            return images.shape[0]

        def __getitem__(self, i):
            return {"x0": images[i], "xT": -images[i], "label": int(labels[i])}

    model_ds = classifier_module.train_classifier(
        DictDataset(), num_classes=3, epochs=1, batch_size=48, seed=0, progress=False, width=8, device="cpu"
    )
    assert model_ds.config == dict(in_channels=1, num_classes=3, image_size=16, width=8, task="labels")
    assert torch.isfinite(metrics.compute_features(model_ds, test_images)).all()

    # evaluate_restoration: clean vs a lightly noised copy.
    noise = torch.randn(test_images.shape, generator=torch.Generator().manual_seed(2))
    restored = (test_images + 0.05 * noise).clamp(-1, 1)
    result = metrics.evaluate_restoration(restored, test_images, classifier=model, labels=test_labels, batch_size=16)
    assert set(result) == {"psnr", "ssim", "fid", "ca"}
    assert result["psnr"] > 20 and 0 < result["ssim"] < 1 and result["fid"] >= 0 and result["ca"] >= 90.0
    assert set(metrics.evaluate_restoration(restored, test_images)) == {"psnr", "ssim"}
    # Evaluation is deterministic.
    assert metrics.evaluate_restoration(
        restored, test_images, classifier=model, labels=test_labels
    ) == metrics.evaluate_restoration(restored, test_images, classifier=model, labels=test_labels)


def test_train_classifier_is_seeded():
    images, labels = _pattern_dataset(n_per_class=8)
    kwargs = dict(epochs=1, batch_size=8, seed=5, progress=False, width=8, device="cpu")
    a = classifier_module.train_classifier((images, labels), **kwargs)
    b = classifier_module.train_classifier((images, labels), **kwargs)
    assert torch.equal(a.features(images), b.features(images))


def test_rotation_task_on_unlabeled_images():
    # Unlabeled crops of a photograph (downscaled 4x so a crop holds some scene layout):
    # the self-supervised fallback learns which way up they are.
    photo = torch.from_numpy(_to_unit(skimage_data.camera())).float()
    photo = torch.nn.functional.avg_pool2d(photo[None, None], 4)[0, 0]
    g = torch.Generator().manual_seed(0)
    tops = torch.randint(0, photo.shape[0] - 16, (96,), generator=g)
    lefts = torch.randint(0, photo.shape[1] - 16, (96,), generator=g)
    crops = torch.stack([photo[t : t + 16, left : left + 16] for t, left in zip(tops.tolist(), lefts.tolist())])[
        :, None
    ]
    model = classifier_module.train_classifier(
        crops,
        epochs=15,
        batch_size=32,
        lr=5e-3,
        seed=0,
        progress=False,
        task="rotation",
        augment="shift",
        width=8,
        device="cpu",
    )
    assert model.task == "rotation" and model.config["num_classes"] == 4
    with torch.no_grad():
        rotated, rot_labels = classifier_module._rotation_batch(crops)
        accuracy = (model(rotated).argmax(1) == rot_labels).float().mean().item()
    assert accuracy > 0.45  # chance is 0.25
    # FID features exist for it, CA does not.
    assert metrics.compute_features(model, crops).shape == (96, model.feature_dim)
    result = metrics.evaluate_restoration(crops, crops, classifier=model, labels=torch.zeros(96))
    assert "ca" not in result and result["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="task"):
        metrics.classifier_accuracy(model, crops, torch.zeros(96))


def test_train_classifier_needs_labels_for_label_task():
    with pytest.raises(ValueError, match="rotation"):
        classifier_module.train_classifier(torch.zeros(4, 1, 16, 16), epochs=1, progress=False)


def test_pseudo_labels():
    images, labels = _pattern_dataset(n_per_class=8)
    model = classifier_module.train_classifier(
        images, pseudo_labels=labels, epochs=1, batch_size=8, progress=False, width=8, device="cpu"
    )
    assert model.task == "labels" and model.config["num_classes"] == 3


# ---------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model = classifier_module.Classifier(in_channels=1, num_classes=3, image_size=16, width=8)
    path = tmp_path / "classifier.safetensors"
    model.info = {"data": "skimage", "test_accuracy": 0.5, "test_items": 4}  # what eval prints beside FID
    classifier_module.save_classifier(model, path)
    loaded = classifier_module.load_classifier(path)
    assert loaded.config == model.config and not loaded.training
    assert loaded.info == model.info
    assert describe_classifier(loaded) == (
        "label classifier (3 classes, 16x16 images), 50.00% accuracy on 4 held-out test images"
    )
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.features(x), model.features(x))
        assert torch.equal(loaded(x), model(x))


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    not_safetensors = tmp_path / "pickle.pt"
    torch.save({"a": torch.zeros(2)}, not_safetensors)
    with pytest.raises(ValueError, match="not a safetensors file"):
        classifier_module.load_classifier(not_safetensors)

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a classifier"):
        classifier_module.load_classifier(other)

    with pytest.raises(FileNotFoundError):
        classifier_module.load_classifier(tmp_path / "missing.safetensors")
