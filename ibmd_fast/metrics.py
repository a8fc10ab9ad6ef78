"""Evaluation as in the paper (MATH.md section 7): FID and CA on classifier features, PSNR, SSIM,
and bootstrap / binomial intervals for them.

FID and CA use the penultimate features and the predictions of the project's own classifier
(``ibmd_fast.classifier``: ``Classifier``, ``train_classifier``, ``save_classifier``,
``load_classifier``), trained on the clean training split of the data set in
place of the paper's Inception network and ImageNet ResNet-50.

Intervals: ``bootstrap_fid`` (a percentile bootstrap over test images), ``paired_bootstrap_fid_diff``
(the FID difference of two models on the same resampled images) and ``wilson_interval`` (CA as a
binomial proportion).

Images everywhere are float tensors [B, C, H, W] in [-1, 1] (data_range 2).
Evaluation is deterministic: eval mode, no gradients, float64 statistics.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ibmd_fast.classifier import (
    Classifier,
)

__all__ = [
    "psnr",
    "ssim",
    "compute_features",
    "feature_stats",
    "frechet_distance",
    "fid_from_features",
    "fid_from_stats",
    "classifier_accuracy",
    "evaluate_restoration",
    "bootstrap_counts",
    "bootstrap_fid",
    "paired_bootstrap_fid_diff",
    "unpaired_bootstrap_fid_diff",
    "wilson_interval",
]


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images [B, C, H, W], got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------
# PSNR and SSIM


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(data_range^2 / MSE).

    Computed in float64 and returned as float64 `[B]`. Identical images have MSE 0 and
    give `inf` (the honest value; averaging it gives inf, so callers see it).
    """
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    # Same 1-D kernel as scipy.ndimage.gaussian_filter, which skimage uses.
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image, float64 `[B]`.

    Matches skimage's `structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=...)`: an 11-tap
    Gaussian window (truncate 3.5), the SSIM map kept on the valid region only (a
    5-pixel border is dropped, as skimage crops it), averaged per channel and then over
    channels. Images must be at least 11 pixels on each side.
    """
    _check_pair(x, y, "ssim")
    window = _gaussian_window(sigma, 3.5, torch.float64, x.device)
    size = window.numel()
    b, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"ssim: images must be at least {size}x{size}, got {h}x{w}")
    # Channels are folded into the batch so one depthwise pass filters all of them.
    x = x.double().reshape(b * c, 1, h, w)
    y = y.double().reshape(b * c, 1, h, w)
    win_h = window.view(1, 1, 1, size)
    win_v = window.view(1, 1, size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, win_h), win_v)

    # One conv call for the five local moments.
    moments = blur(torch.cat([x, y, x * x, y * y, x * y], dim=0))
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = moments.chunk(5, dim=0)
    var_x = mu_xx - mu_x * mu_x
    var_y = mu_yy - mu_y * mu_y
    cov_xy = mu_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, c, -1).mean(dim=2).mean(dim=1)


# ----------------------------------------------------------------------------------------
# Features, FID and CA


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _batched(model: nn.Module, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = _model_device(model)
    try:
        outs = [
            fn(images[i : i + batch_size].to(device, torch.float32)).double().cpu()
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def compute_features(classifier: Classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features, float64 [N, feature_dim] on the CPU."""
    return _batched(classifier, classifier.features, images, batch_size)


def feature_stats(classifier: Classifier, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], covariance [F, F]) of the classifier's features, float64 numpy."""
    return _stats(compute_features(classifier, images, batch_size))


def _stats(features) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(features, torch.Tensor):
        f = features.detach().cpu().double().numpy()
    else:
        f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    As in pytorch-fid: when the matrix square root is not finite (singular covariances,
    e.g. fewer samples than feature dimensions) or has a non-negligible imaginary part,
    `eps` is added to both diagonals and the root taken again; a tiny imaginary part
    left by round-off is dropped.
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"frechet_distance: means have shapes {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance: covariances have shapes {sigma1.shape} and {sigma2.shape}, "
            f"expected {(mu1.size, mu1.size)}"
        )

    def sqrt_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result
            return linalg.sqrtm(s1 @ s2)

    def usable(root: np.ndarray) -> bool:
        return bool(np.isfinite(root).all()) and (
            not np.iscomplexobj(root) or np.allclose(np.diagonal(root).imag, 0, atol=1e-3)
        )

    covmean = sqrt_product(sigma1, sigma2)
    if not usable(covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrt_product(sigma1 + offset, sigma2 + offset)
        if not usable(covmean):
            raise ValueError(
                "frechet_distance: the square root of sigma1 @ sigma2 is not finite or has a "
                "large imaginary component; check the covariances"
            )
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance of ``frechet_distance`` for symmetric PSD covariances, through two symmetric
    eigendecompositions instead of a general matrix square root (``_frechet_batched``): the same number
    up to round-off (tests/test_paper_metrics.py checks it against clean-fid's), and seconds rather than
    minutes for 2048-d Inception statistics on a CPU."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.dim() != 1 or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(),) * 2:
        raise ValueError(
            f"fid_from_stats: means {tuple(mu1.shape)}, {tuple(mu2.shape)} and covariances "
            f"{tuple(cov1.shape)}, {tuple(cov2.shape)} do not match"
        )
    cov1, cov2 = 0.5 * (cov1 + cov1.T), 0.5 * (cov2 + cov2.T)
    return float(_frechet_batched(mu1, cov1, mu2, cov2, _sqrt_psd(cov2)))


def fid_from_features(features1, features2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N1, F], [N2, F]."""
    mu1, sigma1 = _stats(features1)
    mu2, sigma2 = _stats(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def classifier_accuracy(
    classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """CA: top-1 accuracy of the classifier on `images`, in percent."""
    if getattr(classifier, "task", "labels") != "labels":
        raise ValueError(
            f"classifier_accuracy: the classifier was trained for task={classifier.task!r}; "
            "CA needs one trained on labels"
        )
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"classifier_accuracy: labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    logits = _batched(classifier, classifier, images, batch_size)
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()


def evaluate_restoration(
    restored: torch.Tensor,
    clean: torch.Tensor,
    classifier: Classifier | None = None,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
    data_range: float = 2.0,
) -> dict[str, float]:
    """Metrics of restored images against their clean references (MATH.md section 7).

    Returns {"psnr": mean dB, "ssim": mean} always, "fid" (restored vs clean features)
    when a classifier is given, and "ca" (top-1 % on the restored images) when labels
    are given too and the classifier was trained on labels.
    """
    _check_pair(restored, clean, "evaluate_restoration")
    psnr_values, ssim_values = [], []
    for i in range(0, restored.shape[0], batch_size):
        r, c = restored[i : i + batch_size], clean[i : i + batch_size]
        psnr_values.append(psnr(r, c, data_range).cpu())
        ssim_values.append(ssim(r, c, data_range).cpu())
    result = {"psnr": torch.cat(psnr_values).mean().item(), "ssim": torch.cat(ssim_values).mean().item()}
    if classifier is not None:
        result["fid"] = fid_from_features(
            compute_features(classifier, restored, batch_size), compute_features(classifier, clean, batch_size)
        )
        if labels is not None and classifier.task == "labels":
            result["ca"] = classifier_accuracy(classifier, restored, labels, batch_size)
    return result


# ----------------------------------------------------------------------------------------
# Intervals: bootstrap over test images for FID, Wilson for CA
#
# Restored image i and clean image i are one test item, so a bootstrap resample draws item indices
# with replacement and takes the same indices from every feature set involved (the restored images
# of one model, or of two models for a paired difference, and the clean references). A resample is
# represented by its multiplicity counts [R, N]; every Gaussian fit is a weighted mean/covariance.


def _as_float64(features, name: str) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    f = f.detach().cpu().double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: features must be [N, F] with N >= 2, got shape {tuple(f.shape)}")
    return f


def _same_items(name: str, *sets: torch.Tensor) -> None:
    if len({tuple(f.shape) for f in sets}) != 1:
        raise ValueError(
            f"{name}: the feature sets must hold the same N test items and F features, got shapes "
            f"{[tuple(f.shape) for f in sets]}"
        )


def bootstrap_counts(num_items: int, num_resamples: int, seed: int = 0) -> torch.Tensor:
    """Multiplicities [R, N] (float64) of ``num_resamples`` bootstrap resamples of N items: row r
    counts how often each item was drawn in N draws with replacement. Seeded, so every caller with
    the same (N, R, seed) resamples the same items."""
    if num_items < 2 or num_resamples < 1:
        raise ValueError(f"bootstrap needs N >= 2 items and R >= 1 resamples, got N={num_items}, R={num_resamples}")
    rng = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, num_items, (num_resamples, num_items), generator=rng)
    counts = torch.zeros(num_resamples, num_items, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def _weighted_gaussians(features: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [R, F] and unbiased covariances [R, F, F] of the resamples that ``counts`` describe
    (a resample of N draws is N points, so the unbiased factor is N / (N - 1), as np.cov gives)."""
    n = counts.sum(dim=1, keepdim=True)  # = N for every bootstrap row
    mean = counts @ features / n
    second = (counts[:, None, :] * features.T[None]) @ features / n[..., None]  # [R, F, N] @ [N, F]
    cov = (second - mean[:, :, None] * mean[:, None, :]) * (n / (n - 1))[..., None]
    return mean, cov


def _sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    return evecs @ (evals.clamp_min(0).sqrt()[..., None] * evecs.transpose(-1, -2))


def _frechet_batched(mu1, cov1, mu2, cov2, root2) -> torch.Tensor:
    """Frechet distances [R] in float64: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with
    tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S2^(1/2) S1 S2^(1/2)) (``root2`` = S2^(1/2)), a
    symmetric PSD matrix with the same spectrum as S1 S2, so no general matrix square root is
    needed; negative round-off eigenvalues are clipped to 0."""
    middle = root2 @ cov1 @ root2
    middle = 0.5 * (middle + middle.transpose(-1, -2))
    trace_root = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum(dim=-1)
    diff = mu1 - mu2
    return (
        (diff * diff).sum(-1)
        + cov1.diagonal(dim1=-2, dim2=-1).sum(-1)
        + cov2.diagonal(dim1=-2, dim2=-1).sum(-1)
        - 2.0 * trace_root
    )


# The clean reference's resampled fits (means, covariances, square roots) are the same for every model
# compared with it on the same resamples: kept for the last few (reference, resamples) pairs.
_REFERENCE_CACHE: dict = {}


def _fixed_reference(reference) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(mu [F], sigma [F, F]) in float64 when ``reference`` is fixed statistics (a pair, e.g. an .npz's
    mu and sigma), None when it is a feature set [N, F] resampled with the test items."""
    if not isinstance(reference, (tuple, list)):
        return None
    if len(reference) != 2:
        raise ValueError(f"a fixed FID reference is (mu, sigma), got {len(reference)} arrays")
    mu, sigma = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in reference)
    if mu.dim() != 1 or sigma.shape != (mu.numel(), mu.numel()):
        raise ValueError(
            f"a fixed FID reference needs mu [F] and sigma [F, F], got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    return mu, 0.5 * (sigma + sigma.T)


def _reference_fits(reference, counts: torch.Tensor, chunk: int, device) -> list:
    """Per chunk of resamples: (means, covariances, square roots) of the reference, or, for fixed
    statistics, the one fit every resample shares (broadcast over the chunk)."""
    import hashlib

    fixed = _fixed_reference(reference)
    arrays = fixed if fixed is not None else (reference,)
    key = (
        tuple(hashlib.sha1(a.numpy().tobytes()).hexdigest() for a in arrays),
        hashlib.sha1(counts.numpy().tobytes()).hexdigest(),
        chunk,
        str(device),
    )
    if key not in _REFERENCE_CACHE:
        if len(_REFERENCE_CACHE) >= 4:
            _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
        if fixed is not None:
            mu, cov = (a.to(device) for a in fixed)
            fits = [(mu, cov, _sqrt_psd(cov))] * len(range(0, counts.shape[0], chunk))
        else:
            ref = reference.to(device)
            fits = []
            for start in range(0, counts.shape[0], chunk):
                mu, cov = _weighted_gaussians(ref, counts[start : start + chunk].to(device))
                fits.append((mu, cov, _sqrt_psd(cov)))
        _REFERENCE_CACHE[key] = fits
    return _REFERENCE_CACHE[key]


def _centered_rows(features: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [R, F], A [R, N, F]) of the resamples ``counts`` describe, with A's rows
    sqrt(c_i / (n - 1)) (x_i - mean): the unbiased weighted covariance is A^T A."""
    n = counts.sum(dim=1, keepdim=True)
    mean = counts @ features / n
    rows = (counts / (n - 1)).sqrt()[..., None] * (features[None] - mean[:, None, :])
    return mean, rows


def _frechet_low_rank(features: torch.Tensor, counts: torch.Tensor, reference) -> torch.Tensor:
    """The Frechet distances of ``_frechet_batched`` for N items < F features, through N x N matrices.

    With S1 = A^T A (``_centered_rows``), the non-zero eigenvalues of S2^(1/2) S1 S2^(1/2) are those of
    A S2 A^T [N, N], so tr (S1 S2)^(1/2) = sum of their square roots and tr S1 = |A|^2 (MATH.md 7).
    A resampled reference S2 = B^T B gives A S2 A^T = M M^T with M = A B^T, all N x N; fixed
    statistics give A S2 A^T directly, once per resample, at N F^2 instead of F^3 operations."""
    mean, a = _centered_rows(features, counts)
    fixed = _fixed_reference(reference)
    if fixed is not None:
        mu2, cov2 = (t.to(features.device) for t in fixed)
        gram = a @ cov2 @ a.transpose(-1, -2)
        trace2 = cov2.diagonal().sum()
    else:
        mu2, b = _centered_rows(reference, counts)
        m = a @ b.transpose(-1, -2)
        gram = m @ m.transpose(-1, -2)
        trace2 = (b * b).sum(dim=(-1, -2))
    gram = 0.5 * (gram + gram.transpose(-1, -2))
    trace_root = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(dim=-1)
    diff = mean - mu2
    return (diff * diff).sum(-1) + (a * a).sum(dim=(-1, -2)) + trace2 - 2.0 * trace_root


def _resampled_fids(
    features: torch.Tensor, reference, counts: torch.Tensor, device: Optional[str | torch.device] = None
) -> torch.Tensor:
    """FID of each resample [R] (float64, on the CPU); the work runs on ``device`` (default CPU) in
    chunks of resamples that keep the [chunk, F, N] product near 200 MB. ``reference``: the clean
    features [N, F] of the same items (resampled with them) or fixed statistics (mu, sigma).
    With fewer items than features (64 test images, 2048-d Inception features) the distances are
    taken on N x N matrices (``_frechet_low_rank``): the same numbers, without F x F eigensolves."""
    n, f = features.shape
    chunk = int(max(1, min(100, 2.5e7 // (n * f))))
    features = features.to(device)
    out = []
    if n < f:
        ref = reference if _fixed_reference(reference) is not None else reference.to(device)
        for start in range(0, counts.shape[0], chunk):
            out.append(_frechet_low_rank(features, counts[start : start + chunk].to(device), ref).cpu())
        return torch.cat(out)
    fits = _reference_fits(reference, counts, chunk, device)
    for i, start in enumerate(range(0, counts.shape[0], chunk)):
        mu, cov = _weighted_gaussians(features, counts[start : start + chunk].to(device))
        out.append(_frechet_batched(mu, cov, *fits[i]).cpu())
    return torch.cat(out)


def _reference_arg(reference, name: str, *items: torch.Tensor):
    """``reference`` as ``_resampled_fids`` takes it: fixed (mu, sigma) checked against the features'
    width, or clean features [N, F] of the same items as ``items``."""
    fixed = _fixed_reference(reference)
    if fixed is not None:
        if fixed[0].numel() != items[0].shape[1]:
            raise ValueError(
                f"{name}: the reference statistics are {fixed[0].numel()}-d, the features {items[0].shape[1]}-d"
            )
        return fixed
    r = _as_float64(reference, name)
    _same_items(name, *items, r)
    return r


def _interval(estimate: float, values: torch.Tensor, level: float) -> tuple[list[float], list[float]]:
    """(interval, plain percentile interval) of a bootstrap with resample statistics ``values``.

    FID is biased upwards by its finite sample, and a resample (N draws with replacement, about 63%
    distinct items) is biased further, so the resample FIDs sit above the estimate: in 32 or more
    feature dimensions a plain percentile interval misses the estimate itself, and the basic
    (reflected) interval, which assumes the two biases are equal, misses in the other direction.
    The interval returned is the percentile interval shifted by the bootstrap estimate of that
    extra bias, mean(values) - estimate: it keeps the skew of the resample distribution (FID is a
    squared distance) and is centred on the estimate's side (tests/test_metrics_intervals.py:
    95% intervals cover the expected N-item FID in 90-99% of trials where the other two fail).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    low, high = torch.quantile(values, q).tolist()
    bias = float(values.mean()) - estimate
    return [low - bias, high - bias], [low, high]


def bootstrap_fid(
    features,
    reference,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    device: Optional[str | torch.device] = None,
) -> dict[str, Any]:
    """FID of restored-image ``features`` [N, F] against the clean ``reference`` [N, F] of the same
    N test items, with a percentile bootstrap interval over test items. ``reference`` may instead be
    fixed statistics ``(mu, sigma)`` (an .npz reference such as ADM's): then only the restored
    images are resampled.

    Returns ``{"fid", "ci": [low, high], "percentile_ci", "level", "method", "resamples", "seed"}``:
    ``fid`` is the estimate on all N items (``fid_from_features`` up to round-off), ``ci`` the
    bias-shifted percentile interval (``_interval`` says why; the plain one is ``percentile_ci``).
    """
    f = _as_float64(features, "bootstrap_fid")
    r = _reference_arg(reference, "bootstrap_fid", f)
    full = torch.ones(1, f.shape[0], dtype=torch.float64)
    fid = float(_resampled_fids(f, r, full, device)[0])
    counts = bootstrap_counts(f.shape[0], num_resamples, seed)
    ci, percentile = _interval(fid, _resampled_fids(f, r, counts, device), level)
    return {
        "fid": fid,
        "ci": ci,
        "percentile_ci": percentile,
        "level": level,
        "method": "percentile bootstrap, shifted by the bootstrap bias",
        "resamples": int(num_resamples),
        "seed": int(seed),
    }


def paired_bootstrap_fid_diff(
    features_a,
    features_b,
    reference,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    device: Optional[str | torch.device] = None,
) -> dict[str, Any]:
    """FID(a) - FID(b) for two models' restorations of the same N test items (``features_a``,
    ``features_b`` [N, F], clean ``reference`` [N, F]; ``features_a`` may be a list of [N, F], e.g. one
    student per distillation seed, and FID(a) is then their mean FID), with the PAIRED bootstrap
    interval: each resample takes the same items for a, b and the reference, so what the two models
    share (the test items' difficulty, the reference's own sampling noise) cancels in the difference.

    ``reference`` may be fixed statistics ``(mu, sigma)``, as in ``bootstrap_fid``.

    Returns ``{"diff", "ci": [low, high], "percentile_ci", "level", "method", "resamples", "seed"}``
    (the interval of ``bootstrap_fid``). Identical inputs give exactly 0 and [0, 0]. ``device``: where
    the resampled Gaussian fits run (a GPU makes 10,000-image intervals quick).
    """
    group = list(features_a) if isinstance(features_a, (list, tuple)) else [features_a]
    if not group:
        raise ValueError("paired_bootstrap_fid_diff: features_a is an empty list")
    a = [_as_float64(f, "paired_bootstrap_fid_diff") for f in group]
    b = _as_float64(features_b, "paired_bootstrap_fid_diff")
    _same_items("paired_bootstrap_fid_diff", *a, b)
    r = _reference_arg(reference, "paired_bootstrap_fid_diff", *a, b)
    counts = bootstrap_counts(b.shape[0], num_resamples, seed)
    full = torch.ones(1, b.shape[0], dtype=torch.float64)

    def fid_a(c: torch.Tensor) -> torch.Tensor:  # a list (e.g. students of several seeds): their mean FID
        return torch.stack([_resampled_fids(f, r, c, device) for f in a]).mean(dim=0)

    values = fid_a(counts) - _resampled_fids(b, r, counts, device)
    diff = float(fid_a(full)[0] - _resampled_fids(b, r, full, device)[0])
    ci, percentile = _interval(diff, values, level)
    return {
        "diff": diff,
        "ci": ci,
        "percentile_ci": percentile,
        "level": level,
        "method": "percentile bootstrap, shifted by the bootstrap bias",
        "resamples": int(num_resamples),
        "seed": int(seed),
    }


def unpaired_bootstrap_fid_diff(
    features_a, features_b, reference, num_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """FID(a) - FID(b) with independent resamples for a and for b (what a reader gets by combining two
    separate FID intervals): the baseline the paired interval is narrower than when a and b are
    correlated. Same returns as ``paired_bootstrap_fid_diff``."""
    a, b = (
        _as_float64(features_a, "unpaired_bootstrap_fid_diff"),
        _as_float64(features_b, "unpaired_bootstrap_fid_diff"),
    )
    r = _as_float64(reference, "unpaired_bootstrap_fid_diff")
    _same_items("unpaired_bootstrap_fid_diff", a, b, r)
    values = _resampled_fids(a, r, bootstrap_counts(a.shape[0], num_resamples, seed)) - _resampled_fids(
        b, r, bootstrap_counts(a.shape[0], num_resamples, seed + 1)
    )
    full = torch.ones(1, a.shape[0], dtype=torch.float64)
    diff = float(_resampled_fids(a, r, full)[0] - _resampled_fids(b, r, full)[0])
    ci, percentile = _interval(diff, values, level)
    return {
        "diff": diff,
        "ci": ci,
        "percentile_ci": percentile,
        "level": level,
        "method": "percentile bootstrap, shifted by the bootstrap bias",
        "resamples": int(num_resamples),
        "seed": int(seed),
    }


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> list[float]:
    """Wilson score interval [low, high] of a binomial proportion (e.g. CA: correct / images), as
    fractions in [0, 1]. Unlike the normal approximation it stays inside [0, 1] and is sensible at
    0 or ``trials`` successes."""
    from statistics import NormalDist

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    p, n = successes / trials, trials
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]
