"""Bootstrap intervals of FID and of FID differences, the Wilson interval of CA, and the
classifier's per-epoch progress line (ibmd_fast.classifier)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ibmd_fast import classifier as classifier_module
from ibmd_fast import metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _gauss(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return shift + scale * rng.standard_normal((n, d))


def test_batched_frechet_matches_scipy_sqrtm():
    """The eigenvalue form of tr (S1 S2)^(1/2) used by the bootstrap equals frechet_distance (scipy's sqrtm)."""
    ref = _gauss(300, 16, 0)
    a = 0.8 * ref + _gauss(300, 16, 1, shift=0.3, scale=0.5)
    boot = metrics.bootstrap_fid(a, ref, num_resamples=10)
    assert boot["fid"] == pytest.approx(metrics.fid_from_features(a, ref), rel=1e-9, abs=1e-10)
    # one resample written out: the weighted Gaussian fit equals np.cov of the drawn rows
    counts = metrics.bootstrap_counts(300, 1, seed=3)
    assert counts.sum().item() == 300
    idx = np.repeat(np.arange(300), counts[0].long().numpy())
    expected = metrics.fid_from_features(a[idx], ref[idx])
    got = metrics._resampled_fids(torch.as_tensor(a), torch.as_tensor(ref), counts)[0].item()
    assert got == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("dim, shift, scale, trials, repeats", [(4, 0.5, 1.2, 200, 1500), (32, 0.2, 1.1, 30, 300)])
def test_bootstrap_fid_covers_its_expectation(dim, shift, scale, trials, repeats):
    """Coverage on a known case: restored ~ N(shift, scale^2 I), clean ~ N(0, I), 200 items. The estimand
    is the expected FID of 200 items (the population FID plus the small-sample bias, from ``repeats``
    independent draws); the 95% interval must cover it in 90-99% of independent experiments. In 4 dimensions
    the basic (reflected) interval covers about 87%; in 32 the plain percentile and the basic ones cover
    none (the resample FIDs are biased above the estimate), so each would fail here."""
    n = 200
    expected = np.mean(
        [
            metrics.fid_from_features(_gauss(n, dim, 10_000 + i, shift, scale), _gauss(n, dim, 50_000 + i))
            for i in range(repeats)
        ]
    )
    population = dim * (shift**2 + (scale - 1) ** 2)
    assert expected > population  # FID's small-sample bias is upwards
    hits = 0
    for i in range(trials):
        ci = metrics.bootstrap_fid(
            _gauss(n, dim, i, shift, scale), _gauss(n, dim, 100_000 + i), num_resamples=300, seed=i
        )["ci"]
        hits += ci[0] <= expected <= ci[1]
    assert 0.90 <= hits / trials <= (0.99 if trials >= 100 else 1.0), hits / trials


def test_paired_interval_narrower_than_unpaired_for_correlated_models():
    """Two models whose restorations differ a little per image: pairing cancels what they share."""
    ref = _gauss(256, 8, 0)
    a = ref + _gauss(256, 8, 1, scale=0.6)
    b = a + _gauss(256, 8, 2, scale=0.1)
    paired = metrics.paired_bootstrap_fid_diff(b, a, ref, num_resamples=400)
    unpaired = metrics.unpaired_bootstrap_fid_diff(b, a, ref, num_resamples=400)
    assert paired["diff"] == pytest.approx(unpaired["diff"])
    assert paired["diff"] == pytest.approx(metrics.fid_from_features(b, ref) - metrics.fid_from_features(a, ref))
    width = lambda r: r["ci"][1] - r["ci"][0]  # noqa: E731
    assert width(paired) < 0.5 * width(unpaired), (paired["ci"], unpaired["ci"])
    assert paired["ci"][0] <= paired["diff"] <= paired["ci"][1]


def test_identical_inputs_give_zero_difference():
    ref, a = _gauss(64, 4, 0), _gauss(64, 4, 1)
    out = metrics.paired_bootstrap_fid_diff(a, a.copy(), ref, num_resamples=100)
    assert out["diff"] == 0.0 and out["ci"] == [0.0, 0.0]
    # a list of one seed is that seed; a list of several is their mean FID
    one = metrics.paired_bootstrap_fid_diff([a], a, ref, num_resamples=20)
    assert one["ci"] == [0.0, 0.0]
    b = _gauss(64, 4, 2)
    mean = metrics.paired_bootstrap_fid_diff([a, b], a, ref, num_resamples=20)
    assert mean["diff"] == pytest.approx(0.5 * (metrics.fid_from_features(b, ref) - metrics.fid_from_features(a, ref)))


def test_interval_inputs_are_checked():
    with pytest.raises(ValueError, match="same N test items"):
        metrics.bootstrap_fid(_gauss(10, 3, 0), _gauss(12, 3, 1))
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_fid(_gauss(10, 3, 0), _gauss(10, 3, 1), level=1.5)
    with pytest.raises(ValueError, match="successes"):
        metrics.wilson_interval(11, 10)


def test_wilson_interval_by_hand_and_coverage():
    # 8 of 10, z = 1.959964: center (0.8 + z^2/20) / (1 + z^2/10), half z/(1 + z^2/10) sqrt(0.016 + z^2/400)
    z = stats.norm.ppf(0.975)
    center = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert metrics.wilson_interval(8, 10) == pytest.approx([center - half, center + half], rel=1e-12)
    assert metrics.wilson_interval(0, 20)[0] == 0.0 and metrics.wilson_interval(20, 20)[1] == 1.0
    # exact coverage for n = 256 at p = 0.7 (the binomial pmf over every outcome): close to 95%
    n, p = 256, 0.7
    cover = sum(
        stats.binom.pmf(k, n, p)
        for k in range(n + 1)
        if metrics.wilson_interval(k, n)[0] <= p <= metrics.wilson_interval(k, n)[1]
    )
    assert 0.93 <= cover <= 0.97


def test_classifier_prints_one_line_per_epoch(capsys):
    images = torch.rand(24, 1, 16, 16) * 2 - 1
    labels = torch.arange(24) % 3
    lines = []
    classifier_module.train_classifier(
        (images, labels), epochs=2, batch_size=8, width=8, progress=True, device="cpu", log=lines.append
    )
    assert len(lines) == 2 and lines[0].startswith("label classifier epoch 1/2: loss ")
    assert "training accuracy" in lines[1]
    # stderr is no terminal under pytest: no tqdm bar, and the default log prints the epoch lines there
    classifier_module.train_classifier((images, labels), epochs=1, batch_size=8, width=8, progress=True, device="cpu")
    err = capsys.readouterr().err
    assert err.count("epoch 1/1") == 1 and "\r" not in err


def _fid_of_drawn_rows(x, counts_row, mu_ref=None, sigma_ref=None, ref=None):
    """A resample written out as clean-fid computes FID: the drawn rows repeated, np.mean / np.cov,
    scipy's sqrtm (metrics.frechet_distance), against fixed statistics or the same drawn reference rows."""
    idx = np.repeat(np.arange(x.shape[0]), counts_row.long().numpy())
    drawn = x[idx]
    if ref is not None:
        mu_ref, sigma_ref = ref[idx].mean(axis=0), np.cov(ref[idx], rowvar=False)
    return metrics.frechet_distance(drawn.mean(axis=0), np.cov(drawn, rowvar=False), mu_ref, sigma_ref)


@pytest.mark.parametrize("n, dim", [(12, 40), (60, 8)])
def test_resampled_fids_fixed_and_resampled_reference_match_drawn_rows(n, dim):
    """Fewer items than features (the N x N route of MATH.md 7) and more: every resample's FID equals
    the written-out one, against fixed statistics (an .npz's mu and sigma) and against resampled clean features."""
    x = _gauss(n, dim, 0, shift=0.2, scale=1.3)
    clean = 0.7 * x + _gauss(n, dim, 1, scale=0.6)
    big = _gauss(400, dim, 2)
    mu_ref, sigma_ref = big.mean(axis=0), np.cov(big, rowvar=False)
    counts = metrics.bootstrap_counts(n, 5, seed=7)
    fixed = metrics._resampled_fids(torch.as_tensor(x), (mu_ref, sigma_ref), counts)
    paired = metrics._resampled_fids(torch.as_tensor(x), torch.as_tensor(clean), counts)
    # scipy's sqrtm of a singular S1 S2 (a resample's covariance has rank < F when n < dim) is accurate
    # to about sqrt(machine eps) relative; with n > dim, to round-off.
    rel = 1e-5 if n < dim else 1e-8
    for r in range(5):
        assert fixed[r].item() == pytest.approx(_fid_of_drawn_rows(x, counts[r], mu_ref, sigma_ref), rel=rel)
        assert paired[r].item() == pytest.approx(_fid_of_drawn_rows(x, counts[r], ref=clean), rel=rel)


def test_bootstrap_against_fixed_statistics():
    """bootstrap_fid / paired_bootstrap_fid_diff with a fixed (mu, sigma) reference: the estimate is the
    FID of all items against those statistics, the interval holds it, a wrong width is one clear error."""
    a, b = _gauss(30, 50, 3, shift=0.3), _gauss(30, 50, 4, shift=0.1)
    big = _gauss(500, 50, 5)
    ref = (big.mean(axis=0), np.cov(big, rowvar=False))
    out = metrics.bootstrap_fid(a, ref, num_resamples=50)
    direct = metrics.frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), *ref)
    assert out["fid"] == pytest.approx(direct, rel=1e-7)
    assert out["ci"][0] <= out["fid"] <= out["ci"][1]
    diff = metrics.paired_bootstrap_fid_diff(a, b, ref, num_resamples=50)
    direct_b = metrics.frechet_distance(b.mean(axis=0), np.cov(b, rowvar=False), *ref)
    assert diff["diff"] == pytest.approx(direct - direct_b, rel=1e-7)
    with pytest.raises(ValueError, match="50-d"):
        metrics.bootstrap_fid(a, (ref[0][:10], ref[1][:10, :10]), num_resamples=5)
