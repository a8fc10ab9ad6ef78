"""Samplers on a one-point data set (with the oracle denoiser every sampler must end at x0), and their
trajectories against transcriptions of the released I2SB, DBIM and DDBM samplers."""

import math

import numpy as np
import pytest
import torch

from ibmd_fast import ops, reference
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


# The student's chain is restore.student_chain: tests/test_restore.py.


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
    assert torch.equal(a, run(_toy, xT, rng=torch.Generator().manual_seed(7)))
    # No seed: drawn from torch's default generator.
    torch.manual_seed(1)
    b = run(_toy, xT)
    torch.manual_seed(1)
    assert torch.equal(b, run(_toy, xT))
    with pytest.raises(ValueError):
        run(_toy, xT, seed=1, rng=torch.Generator())


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


# ----------------------------------------------------------------------------
# Trajectories against our own transcriptions of the released samplers
#
# The oracle tests above pass whatever the step maths does (every sampler returns its last
# x0_hat, which the oracle fixes). Here a denoiser that is not an oracle drives both our sampler
# and a transcription, written in this file from the reference code's formulas, with the SAME
# injected noise; every intermediate state must agree. The noise is replayed: a sampler seeded
# with ``seed`` draws one 62-bit seed per noisy operation from a CPU generator
# (``ops.draw_seed``) and the op's noise of that seed is ``reference.philox_normal`` (float32
# normals, matched by the kernels to 1e-6, hence the tolerances below).

TRAJ_SHAPE = (2, 3, 8, 8)
TRAJ_ATOL = 2e-5


def _traj_data(seed=11):
    x0, xT = _data(seed)
    return xT[:2].double()


def _denoiser(scale):
    """A fixed non-oracle x0 predictor: nonlinear in x, mixing neighbours, depending on t."""

    def predict(x, t):
        tt = (t.double() / scale).view(-1, 1, 1, 1)
        return torch.tanh(0.8 * x + 0.3 * x.roll(1, dims=-1)) * (1.0 - 0.5 * tt) + 0.1 * tt

    return predict


class _Replay:
    """The noise our samplers inject, in the order they draw it."""

    def __init__(self, seed, shape):
        self.gen, self.shape = torch.Generator().manual_seed(seed), shape

    def __call__(self):
        return reference.philox_normal(self.shape, ops.draw_seed(self.gen), dtype=torch.float32).double()


def _states(infos):
    return [i["x"] for i in infos], [i["x0_hat"] for i in infos]


def _assert_trajectories(ours, theirs, what):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} states vs {len(theirs)}"
    for k, (a, b) in enumerate(zip(ours, theirs)):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= TRAJ_ATOL, f"{what}: state {k} differs by {err:.3g}"


# -- I2SB (NVlabs/I2SB i2sb/diffusion.py ddpm_sampling + p_posterior, runner.py sample)


def _i2sb_tables(n, beta_max):
    """I2SB's make_beta_schedule(linear_end=beta_max/n) made symmetric, std_fwd, std_sb."""
    betas = np.linspace(1e-4**0.5, (beta_max / n) ** 0.5, n, dtype=np.float64) ** 2
    betas = np.concatenate([betas[: n // 2], np.flip(betas[: n // 2])])
    std_fwd = np.sqrt(np.cumsum(betas))
    std_bwd = np.sqrt(np.flip(np.cumsum(np.flip(betas))))
    var_sb = std_fwd**2 * std_bwd**2 / (std_fwd**2 + std_bwd**2)  # compute_gaussian_product_coef
    return std_fwd, np.sqrt(var_sb)


def _i2sb_space_indices(num_steps, count):
    frac_stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return taken


def _i2sb_ddpm_sampling(pred_x0_fn, x1, nfe, n, beta_max, noise, mask=None):
    """I2SB's runner.sample + Diffusion.ddpm_sampling, with ``noise()`` for each randn_like."""
    std_fwd, std_sb = _i2sb_tables(n, beta_max)
    steps = _i2sb_space_indices(n, nfe + 1)[::-1]
    if mask is not None:
        x1 = (1.0 - mask) * x1 + mask * noise()
    xt, xs, preds = x1, [], []
    for prev_step, step in zip(steps[1:], steps[:-1]):
        pred_x0 = pred_x0_fn(xt, torch.full((x1.shape[0],), step, dtype=torch.long))
        # p_posterior(prev_step, step, xt, pred_x0)
        std_n, std_prev = std_fwd[step], std_fwd[prev_step]
        std_delta2 = std_n**2 - std_prev**2
        denom = std_prev**2 + std_delta2
        mu_x0, mu_xn, var = std_delta2 / denom, std_prev**2 / denom, std_prev**2 * std_delta2 / denom
        eps = noise()  # our sampler draws a seed on every step
        xt = mu_x0 * pred_x0 + mu_xn * xt
        if prev_step > 0:
            xt = xt + math.sqrt(var) * eps
        if mask is not None:
            xt_true = x1 + std_sb[prev_step] * noise()
            xt = (1.0 - mask) * xt_true + mask * xt
        xs.append(xt)
        preds.append(pred_x0)
    return xs, preds


@pytest.mark.parametrize("nfe", [1, 3, 10])
@pytest.mark.parametrize("inpaint", [False, True], ids=["sr", "inpaint"])
def test_i2sb_trajectory_matches_transcription(nfe, inpaint):
    n, beta_max = 1000, (1.0 if inpaint else 0.3)
    xT, mask = _traj_data(), (_center_mask().double() if inpaint else None)
    predict = _denoiser(n)
    infos, callback = _collect()
    i2sb_sample(predict, I2SBBridge(n_steps=n, beta_max=beta_max), xT, nfe, mask=mask, seed=5, callback=callback)
    xs, preds = _i2sb_ddpm_sampling(predict, xT, nfe, n, beta_max, _Replay(5, TRAJ_SHAPE), mask=mask)
    ours_x, ours_pred = _states(infos)
    _assert_trajectories(ours_x, xs, "i2sb states")
    _assert_trajectories(ours_pred, preds, "i2sb predictions")


# -- DBIM (thu-ml/DiffusionBridge ddbm/karras_diffusion.py sample_dbim, VPNoiseSchedule)


class _DBIMVP:
    """VPNoiseSchedule of DBIM/DDBM: alpha, rho, get_abc, get_f_g2 (T = 1)."""

    def __init__(self, beta_d=2.0, beta_min=0.1):
        self.beta_d, self.beta_min = beta_d, beta_min
        self.alpha_T, self.rho_T = self.alpha(1.0), self.rho(1.0)

    def alpha(self, t):
        return math.exp(-0.5 * self.beta_min * t - 0.25 * self.beta_d * t**2)

    def rho(self, t):
        return math.sqrt(math.exp(self.beta_min * t + 0.5 * self.beta_d * t**2) - 1)

    def alpha_rho(self, t):
        alpha_t, rho_t = self.alpha(t), self.rho(t)
        return alpha_t, alpha_t / self.alpha_T, rho_t, math.sqrt(self.rho_T**2 - rho_t**2)

    def abc(self, t):
        alpha_t, alpha_bar_t, rho_t, rho_bar_t = self.alpha_rho(t)
        return (
            alpha_bar_t * rho_t**2 / self.rho_T**2,
            alpha_t * rho_bar_t**2 / self.rho_T**2,
            alpha_t * rho_bar_t * rho_t / self.rho_T,
        )

    def f_g2(self, t):
        return -0.5 * self.beta_min - 0.5 * self.beta_d * t, self.beta_min + self.beta_d * t


def _dbim_sample(denoiser, x, ts, t_max, eta, noise):
    """sample_dbim: ``ts`` descending (the times stepped to), booting step from ``t_max``."""
    sched, x_T, ones = _DBIMVP(), x, torch.ones(x.shape[0], dtype=torch.float64)
    path, pred_x0 = [], []
    x0_hat = denoiser(x, t_max * ones)
    a, b, c = sched.abc(ts[0])
    x = a * x_T + b * x0_hat + c * noise()  # bridge_sample(x0_hat, x_T, ts[0])
    path.append(x)
    pred_x0.append(x0_hat)
    for i in range(len(ts) - 1):
        s, t = ts[i], ts[i + 1]
        x0_hat = denoiser(x, s * ones)
        a_s, b_s, c_s = sched.abc(s)
        a_t, b_t, c_t = sched.abc(t)
        _, _, rho_s, _ = sched.alpha_rho(s)
        alpha_t, _, rho_t, _ = sched.alpha_rho(t)
        omega_st = eta * (alpha_t * rho_t) * math.sqrt(1 - rho_t**2 / rho_s**2)
        tmp_var = math.sqrt(c_t**2 - omega_st**2) / c_s
        eps = noise()
        x = (
            (b_t - tmp_var * b_s) * x0_hat
            + (a_t - tmp_var * a_s) * x_T
            + tmp_var * x
            + (1 if i != len(ts) - 2 else 0) * omega_st * eps
        )
        path.append(x)
        pred_x0.append(x0_hat)
    return path, pred_x0


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("nfe", [2, 4, 7])
def test_dbim_trajectory_matches_transcription(eta, nfe):
    bridge = VPBridge()
    xT, predict = _traj_data(), _denoiser(1.0)
    grid = bridge.sampling_grid(nfe).tolist()
    infos, callback = _collect()
    dbim_sample(predict, bridge, xT, nfe, eta=eta, seed=9, callback=callback)
    path, preds = _dbim_sample(predict, xT, grid[:-1][::-1], grid[-1], eta, _Replay(9, TRAJ_SHAPE))
    ours_x, ours_pred = _states(infos)
    _assert_trajectories(ours_pred, preds, "dbim predictions")
    # DBIM's last step adds no noise; ours adds the (tiny, c_{t_min}-sized) posterior noise to the
    # final state, which no output reads (the samplers return the last x0_hat). Every other state
    # and, at eta = 0, the last one too must agree.
    last = len(path) if eta == 0.0 else len(path) - 1
    _assert_trajectories(ours_x[:last], path[:last], "dbim states")


# -- DDBM's Heun sampler (alexzhou907/DDBM ddbm/karras_diffusion.py sample_heun, get_d, ddbm_simulate)


def _ddbm_get_d(denoiser, sched, x, x_T, t):
    """get_d(stochastic=False): the probability-flow drift of the bridge."""
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    f_t, g2_t = sched.f_g2(t)
    alpha_t, alpha_bar_t, _, rho_bar_t = sched.alpha_rho(t)
    a_t, b_t, c_t = sched.abc(t)
    denoised = denoiser(x, t * ones)
    grad_logq = -(x - (a_t * x_T + b_t * denoised)) / c_t**2
    grad_logpxTlxt = -(x - alpha_bar_t * x_T) / (alpha_t**2 * rho_bar_t**2)
    return f_t * x - g2_t * (0.5 * grad_logq - grad_logpxTlxt), denoised


def _exact_bridge_step(denoiser, sched, x, t_cur, t_next, eps):
    """The stochastic sub-step as our sampler takes it: the bridge posterior from t_cur to t_next
    with x0_hat(x, t_cur) (MATH.md 3), where DDBM takes an Euler-Maruyama step of the same SDE
    (see test_heun_stochastic_step_is_first_order_em)."""
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    x0_hat = denoiser(x, t_cur * ones)
    alpha_s, _, rho_s, _ = sched.alpha_rho(t_next)
    alpha_t, _, rho_t, _ = sched.alpha_rho(t_cur)
    coef_xt = alpha_s * rho_s**2 / (alpha_t * rho_t**2)
    coef_x0 = alpha_s * (1 - rho_s**2 / rho_t**2)
    std = alpha_s * rho_s * math.sqrt(1 - rho_s**2 / rho_t**2)
    return coef_xt * x + coef_x0 * x0_hat + std * eps


def _ddbm_sample_heun(denoiser, x, ts, churn, heun_steps, noise):
    """sample_heun on the descending grid ``ts`` (a Heun correction on the first ``heun_steps``)."""
    sched, x_T, path = _DBIMVP(), x, []
    for i in range(len(ts) - 1):
        t_hat = (ts[i + 1] - ts[i]) * churn + ts[i]
        x = _exact_bridge_step(denoiser, sched, x, ts[i], t_hat, noise())
        # ddbm_simulate(x, t_hat, ts[i+1], stochastic=False, second_order=...)
        dt = ts[i + 1] - t_hat
        d, _ = _ddbm_get_d(denoiser, sched, x, x_T, t_hat)
        x_new = x + d * dt
        if i < heun_steps:
            d_2, _ = _ddbm_get_d(denoiser, sched, x_new, x_T, ts[i + 1])
            x_new = x + (d + d_2) / 2 * dt
        x = x_new
        path.append(x)
    return path


@pytest.mark.parametrize("nfe", [2, 5, 8])
def test_heun_trajectory_matches_transcription(nfe):
    bridge = VPBridge()
    xT, predict = _traj_data(), _denoiser(1.0)
    steps, heun_steps = heun_schedule(nfe)
    grid = bridge.sampling_grid(steps, spacing="karras").tolist()[::-1]
    infos, callback = _collect()
    heun_sample(predict, bridge, xT, nfe, churn=0.33, seed=13, callback=callback)
    path = _ddbm_sample_heun(predict, xT, grid, 0.33, heun_steps, _Replay(13, TRAJ_SHAPE))
    _assert_trajectories(_states(infos)[0], path, "heun states")


def test_heun_stochastic_step_is_first_order_em():
    """Our stochastic sub-step (the exact posterior) and DDBM's Euler-Maruyama step of the reverse
    bridge SDE (ddbm_simulate(stochastic=True)) share mean and variance to first order in dt."""
    sched, predict = _DBIMVP(), _denoiser(1.0)
    xT = _traj_data()
    x = 0.7 * xT + 0.3 * torch.tanh(xT.roll(2, dims=-2))
    t_cur, errs = 0.6, []
    for dt in (1e-2, 1e-3):
        t_next = t_cur - dt
        zero = torch.zeros_like(x)
        mean_post = _exact_bridge_step(predict, sched, x, t_cur, t_next, zero)
        # EM: x + d_sde * (t_next - t_cur), d_sde = f x - g2 (grad_logq - grad_logpxTlxt)
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        f_t, g2_t = sched.f_g2(t_cur)
        alpha_t, alpha_bar_t, _, rho_bar_t = sched.alpha_rho(t_cur)
        a_t, b_t, c_t = sched.abc(t_cur)
        grad_logq = -(x - (a_t * xT + b_t * predict(x, t_cur * ones))) / c_t**2
        grad_logp = -(x - alpha_bar_t * xT) / (alpha_t**2 * rho_bar_t**2)
        mean_em = x + (f_t * x - g2_t * (grad_logq - grad_logp)) * (t_next - t_cur)
        alpha_s, _, rho_s, _ = sched.alpha_rho(t_next)
        _, _, rho_t, _ = sched.alpha_rho(t_cur)
        var_post = (alpha_s * rho_s) ** 2 * (1 - rho_s**2 / rho_t**2)
        errs.append(((mean_post - mean_em).abs().max().item(), abs(var_post - g2_t * dt)))
    # Ten times smaller steps: errors about a hundred times smaller (second order per step).
    (big_mean, big_var), (small_mean, small_var) = errs
    assert small_mean < big_mean / 30 and small_var < big_var / 30, errs
