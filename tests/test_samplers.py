"""Samplers on a one-point data set: with the oracle denoiser every sampler must end at x0."""
import pytest
import torch

from ibmd_fast.bridges import I2SBBridge, VPBridge
from ibmd_fast.samplers import (
    dbim_coefficients,
    dbim_sample,
    heun_sample,
    heun_schedule,
    i2sb_sample,
    probability_flow_coefficients,
)

SHAPE = (4, 3, 8, 8)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=gen) * 2 - 1
    # A corrupted image: 2x average-pooled and upsampled, plus a little noise.
    xT = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x0, 2), scale_factor=2.0)
    xT = xT + 0.05 * torch.randn(SHAPE, generator=gen)
    return x0, xT


def _center_mask():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    return mask


class Recorder:
    """A denoiser that counts its calls and records (x, t)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        self.calls.append(tuple(a.clone() for a in args))
        return self.fn(*args)


def _oracle(x0):
    return Recorder(lambda x, t: x0.clone())


def _toy(x, t):
    """A non-oracle denoiser whose output depends on x (so noise reaches the result)."""
    return torch.tanh(x)


def _collect():
    infos = []
    return infos, infos.append


# ----------------------------------------------------------------------------
# I2SB posterior sampler


@pytest.mark.parametrize("nfe", [1, 2, 5, 10])
def test_i2sb_oracle(nfe):
    bridge = I2SBBridge()
    x0, xT = _data()
    oracle = _oracle(x0)
    infos, callback = _collect()
    out = i2sb_sample(oracle, bridge, xT, nfe, seed=0, callback=callback)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    assert len(oracle.calls) == nfe and [i["nfe"] for i in infos] == list(range(1, nfe + 1))
    # The grid is visited in reverse; the first call sees xT at T.
    visited = [int(t[0]) for _, t in oracle.calls]
    assert visited == bridge.sampling_grid(nfe).flip(0)[:-1].tolist()
    assert torch.equal(oracle.calls[0][0], xT) and oracle.calls[0][1].dtype == torch.long
    # The state at index 0 is x0 up to coef_xt(0, n_1) (x_{n_1} - x0).
    assert int(infos[-1]["s"][0]) == 0 and (infos[-1]["x"] - x0).abs().max() < 0.02
    assert torch.all(infos[-1]["std"] == 0)  # no noise on the last step


def test_i2sb_ot_ode_is_deterministic():
    bridge = I2SBBridge(ot_ode=True)
    x0, xT = _data()
    runs = []
    for seed in (0, 1):
        infos, callback = _collect()
        out = i2sb_sample(_oracle(x0), bridge, xT, 4, seed=seed, callback=callback)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
        runs.append(infos)
        assert all(torch.all(i["std"] == 0) for i in infos)
    for a, b in zip(*runs):
        assert torch.equal(a["x"], b["x"])
    assert torch.equal(i2sb_sample(_toy, bridge, xT, 4, seed=0), i2sb_sample(_toy, bridge, xT, 4, seed=1))


def test_i2sb_inpainting():
    bridge = I2SBBridge(beta_max=1.0)
    x0, xT = _data()
    mask = _center_mask()
    xT = xT * (1 - mask) + 7.0 * mask  # the hole's content is irrelevant: make it obviously wrong
    x0 = x0 * mask + xT * (1 - mask)  # the one data point agrees with xT outside the hole
    oracle = _oracle(x0)
    infos, callback = _collect()
    out = i2sb_sample(oracle, bridge, xT, 5, mask=mask, seed=3, callback=callback)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    assert len(oracle.calls) == 5

    first_x = oracle.calls[0][0]
    known = (1 - mask).bool().expand(SHAPE)
    hole = mask.bool().expand(SHAPE)
    assert torch.equal(first_x[known], xT[known])  # known pixels kept
    assert first_x[hole].abs().max() < 6 and abs(first_x[hole].std().item() - 1) < 0.25  # hole ~ N(0, 1)
    for info in infos:  # known pixels = xT + std_sb[s] * eps after every step
        std_s = bridge.std_sb[info["s"][0]].item()
        assert (info["x"] - xT)[known].abs().max() <= 6 * std_s + 1e-6


# ----------------------------------------------------------------------------
# DBIM


BRIDGES = [pytest.param(VPBridge(), id="vp"), pytest.param(I2SBBridge(), id="i2sb")]


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("nfe", [1, 3, 8])
def test_dbim_oracle(bridge, eta, nfe):
    x0, xT = _data()
    oracle = _oracle(x0)
    infos, callback = _collect()
    out = dbim_sample(oracle, bridge, xT, nfe, eta=eta, seed=0, callback=callback)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    assert len(oracle.calls) == nfe
    visited = [float(t[0]) for _, t in oracle.calls]
    assert visited == bridge.sampling_grid(nfe).flip(0)[:-1].tolist()
    if eta == 0.0:  # fresh noise only in the booting step
        assert all(torch.all(info["std"] == 0) for info in infos[1:])
    if eta == 0.0 and not bridge.is_discrete:
        # Deterministic DBIM with the exact x0 keeps the implied noise fixed (DDIM property).
        eps = []
        for info in infos[:-1]:  # the last state (t_min, c ~ 3e-3) amplifies float32 rounding
            b, a, c = (v.float().view(-1, 1, 1, 1) for v in bridge.marginal(info["s"]))
            eps.append((info["x"] - b * x0 - a * xT) / c)
        for e in eps[1:]:
            torch.testing.assert_close(e, eps[0], rtol=0, atol=1e-3)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_dbim_coefficients(bridge):
    grid = bridge.sampling_grid(6)
    s, t = grid[1:5], grid[2:6]
    k_0, k_t, sigma = bridge.posterior(s, t)
    coef_xt, coef_x0, coef_xT, std = dbim_coefficients(bridge, s, t, 1.0)
    torch.testing.assert_close(coef_xt, k_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(coef_x0, k_0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(coef_xT, torch.zeros_like(coef_xT), rtol=0, atol=1e-14)
    torch.testing.assert_close(std, sigma, rtol=0, atol=0)
    b_t, a_t, c_t = bridge.marginal(t)
    for eta in (0.0, 0.3, 0.7):
        coef_xt, coef_x0, coef_xT, std = dbim_coefficients(bridge, s, t, eta)
        # Same mean as the posterior step of a marginal sample, same total variance.
        torch.testing.assert_close(coef_xt * b_t + coef_x0, k_t * b_t + k_0, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(coef_xt * a_t + coef_xT, k_t * a_t, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(coef_xt**2 * c_t**2 + std**2, k_t**2 * c_t**2 + sigma**2, rtol=1e-12, atol=0)
        torch.testing.assert_close(std, eta * sigma, rtol=0, atol=0)
    # At t = T on the VP bridge x_t carries no noise: the posterior step is used.
    if not bridge.is_discrete:
        T = torch.tensor([1.0], dtype=torch.float64)
        s0 = torch.tensor([0.5], dtype=torch.float64)
        torch.testing.assert_close(dbim_coefficients(bridge, s0, T, 0.0)[3], bridge.posterior(s0, T)[2])


def test_dbim_eta1_equals_posterior_sampler():
    bridge = I2SBBridge()
    _, xT = _data()
    runs = []
    for sampler in (i2sb_sample, lambda *a, **k: dbim_sample(*a, eta=1.0, **k)):
        infos, callback = _collect()
        out = sampler(_toy, bridge, xT, 6, seed=11, callback=callback)
        runs.append((out, infos))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a["x"], b["x"])


# ----------------------------------------------------------------------------
# Heun


def _heun_calls(nfe):
    steps, heun = heun_schedule(nfe)
    return 1 if steps == 0 else 2 * steps + heun


def test_heun_schedule():
    assert heun_schedule(1) == (0, 0)
    assert heun_schedule(3) == (1, 0)  # the one budget that cannot be met: 2 calls
    for nfe in [2] + list(range(4, 40)):
        steps, heun = heun_schedule(nfe)
        assert 0 <= heun <= steps - 1 and 2 * steps + heun == nfe
    assert heun_schedule(3 * 5 - 1) == (5, 4)  # DDBM's count: every step Heun but the last


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 8, 11, 20])
def test_heun_oracle(nfe):
    bridge = VPBridge()
    x0, xT = _data()
    oracle = _oracle(x0)
    infos, callback = _collect()
    out = heun_sample(oracle, bridge, xT, nfe, seed=0, callback=callback)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    calls = _heun_calls(nfe)
    assert calls == (2 if nfe == 3 else nfe)
    assert len(oracle.calls) == calls and infos[-1]["nfe"] == calls
    assert float(oracle.calls[0][1][0]) == bridge.T and torch.equal(oracle.calls[0][0], xT)
    if nfe >= 2:
        assert float(infos[-1]["s"][0]) == bridge.t_min and torch.isfinite(infos[-1]["x"]).all()
    if nfe >= 8:
        # The state at t_min is x0 + c_{t_min} eps (c ~ 3e-3) once the steps are small enough.
        assert (infos[-1]["x"] - x0).abs().max() < 0.1


def test_probability_flow_keeps_the_marginal():
    """With the exact x0 the ODE moves along x_t = b_t x0 + a_t xT + c_t eps with eps fixed."""
    bridge = VPBridge()
    x0, xT = (v.double() for v in _data())
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    times = torch.linspace(0.9, 0.05, 401, dtype=torch.float64)

    def point(t):
        b, a, c = (v.view(-1, 1, 1, 1) for v in bridge.marginal(torch.full((4,), float(t), dtype=torch.float64)))
        return b * x0 + a * xT + c * eps

    def drift(x, t):
        coefs = probability_flow_coefficients(bridge, torch.full((4,), float(t), dtype=torch.float64))
        k, c0, cT = (v.view(-1, 1, 1, 1) for v in coefs)
        return k * x + c0 * x0 + cT * xT

    x = point(times[0])
    for t_cur, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_cur
        d1 = drift(x, t_cur)
        d2 = drift(x + dt * d1, t_next)
        x = x + dt * (d1 + d2) / 2
    torch.testing.assert_close(x, point(times[-1]), rtol=0, atol=1e-5)


# The student's chain is restore.student_sample: tests/test_restore.py.


# ----------------------------------------------------------------------------
# Seeds


STOCHASTIC = [
    pytest.param(lambda p, x, **k: i2sb_sample(p, I2SBBridge(), x, 5, **k), id="i2sb"),
    pytest.param(lambda p, x, **k: dbim_sample(p, VPBridge(), x, 5, eta=0.5, **k), id="dbim-vp-0.5"),
    pytest.param(lambda p, x, **k: dbim_sample(p, VPBridge(), x, 5, eta=0.0, **k), id="dbim-vp-0"),
    pytest.param(lambda p, x, **k: dbim_sample(p, I2SBBridge(), x, 5, eta=1.0, **k), id="dbim-i2sb-1"),
    pytest.param(lambda p, x, **k: heun_sample(p, VPBridge(), x, 8, **k), id="heun"),
]


@pytest.mark.parametrize("run", STOCHASTIC)
def test_seeds(run):
    _, xT = _data()
    a = run(_toy, xT, seed=7)
    assert torch.isfinite(a).all()
    assert torch.equal(a, run(_toy, xT, seed=7))
    assert not torch.equal(a, run(_toy, xT, seed=8))
    assert torch.equal(a, run(_toy, xT, generator=torch.Generator().manual_seed(7)))
    # No seed: drawn from torch's default generator.
    torch.manual_seed(1)
    b = run(_toy, xT)
    torch.manual_seed(1)
    assert torch.equal(b, run(_toy, xT))
    with pytest.raises(ValueError):
        run(_toy, xT, seed=1, generator=torch.Generator())


def test_bad_arguments():
    _, xT = _data()
    with pytest.raises(TypeError):
        i2sb_sample(_toy, VPBridge(), xT, 2)
    with pytest.raises(TypeError):
        heun_sample(_toy, I2SBBridge(), xT, 2)
    with pytest.raises(ValueError):
        dbim_sample(_toy, VPBridge(), xT, 2, eta=1.5)
    with pytest.raises(ValueError):
        heun_sample(_toy, VPBridge(), xT, 4, churn=0.0)
