"""Bridges vs closed forms written from MATH.md (sections 2, 3, 4), in float64."""

import math

import numpy as np
import pytest
import torch

from ibmd_fast.bridges import I2SBBridge, VPBridge, bridge_from_config, space_indices

BRIDGES = [
    pytest.param(lambda: I2SBBridge(), id="i2sb"),
    pytest.param(lambda: I2SBBridge(n_steps=200, beta_max=1.0), id="i2sb-inpaint"),
    pytest.param(lambda: VPBridge(), id="vp"),
]


def _times(bridge, s_list, t_list):
    dtype = torch.long if bridge.is_discrete else torch.float64
    return torch.tensor(s_list, dtype=dtype), torch.tensor(t_list, dtype=dtype)


def _pairs(bridge):
    """Pairs s < t across the range, including the ends."""
    if bridge.is_discrete:
        N = bridge.n_steps
        return _times(bridge, [0, 1, 10, N // 3, N // 2 - 1, N - 2, 5], [1, N - 1, N // 2, N - 2, N // 2, N - 1, 6])
    return _times(bridge, [1e-4, 1e-4, 0.1, 0.3, 0.5, 0.98, 0.2], [1e-3, 1.0, 0.4, 0.31, 1.0, 0.99, 0.9])


# ----------------------------------------------------------------------------
# Closed forms (numpy, from MATH.md)


def np_i2sb(N, beta_max):
    betas = np.linspace(np.sqrt(1e-4), np.sqrt(beta_max / N), N, dtype=np.float64) ** 2
    betas = np.concatenate([betas[: N // 2], np.flip(betas[: N // 2])])
    var_fwd = np.cumsum(betas)
    var_bwd = np.flip(np.cumsum(np.flip(betas)))
    return betas, var_fwd, var_bwd


def np_vp(t, beta_min=0.1, beta_d=2.0, t_max=1.0):
    alpha = lambda u: np.exp(-beta_min * u / 2 - beta_d * u**2 / 4)  # noqa: E731
    rho2 = lambda u: np.exp(beta_min * u + beta_d * u**2 / 2) - 1  # noqa: E731
    alphabar = alpha(t) / alpha(t_max)
    rhobar2 = rho2(t_max) - rho2(t)
    a = alphabar * rho2(t) / rho2(t_max)
    b = alpha(t) * rhobar2 / rho2(t_max)
    c = alpha(t) * np.sqrt(rhobar2 * rho2(t)) / np.sqrt(rho2(t_max))
    return a, b, c, alpha, rho2


def test_space_indices():
    assert space_indices(1000, 2) == [0, 999]
    assert space_indices(1000, 5) == [0, 250, 500, 749, 999]
    assert space_indices(10, 10) == list(range(10))
    for n, k in [(1000, 21), (1000, 101), (37, 5)]:
        idx = space_indices(n, k)
        assert idx == [round(i * (n - 1) / (k - 1)) for i in range(k)]
        assert idx[0] == 0 and idx[-1] == n - 1 and all(a < b for a, b in zip(idx, idx[1:]))
    with pytest.raises(ValueError):
        space_indices(10, 11)


@pytest.mark.parametrize("N,beta_max", [(1000, 0.3), (200, 1.0)])
def test_i2sb_schedule_and_marginal(N, beta_max):
    bridge = I2SBBridge(n_steps=N, beta_max=beta_max)
    betas, var_fwd, var_bwd = np_i2sb(N, beta_max)
    np.testing.assert_allclose(bridge.betas.numpy(), betas, rtol=1e-14)
    np.testing.assert_allclose(bridge.betas.numpy(), bridge.betas.flip(0).numpy(), rtol=0)  # symmetric
    np.testing.assert_allclose(bridge.std_fwd.numpy() ** 2, var_fwd, rtol=1e-13)
    np.testing.assert_allclose(bridge.std_bwd.numpy() ** 2, var_bwd, rtol=1e-13)
    for tensor in (bridge.betas, bridge.std_fwd, bridge.std_bwd, bridge.std_sb, bridge.noise_levels):
        assert tensor.dtype == torch.float64 and tensor.shape == (N,)

    t = torch.arange(N)
    coef_x0, coef_xT, std = bridge.marginal(t)
    np.testing.assert_allclose(coef_x0.numpy(), var_bwd / (var_fwd + var_bwd), rtol=1e-13)
    np.testing.assert_allclose(coef_xT.numpy(), var_fwd / (var_fwd + var_bwd), rtol=1e-13)
    np.testing.assert_allclose(std.numpy(), np.sqrt(var_fwd * var_bwd / (var_fwd + var_bwd)), rtol=1e-13)
    np.testing.assert_allclose(bridge.std_sb.numpy(), std.numpy(), rtol=0)
    np.testing.assert_allclose(bridge.noise_levels.numpy(), np.linspace(1e-4, 1, N) * N, rtol=1e-13)
    assert bridge.T == N - 1

    # Ends: t = 0 is (almost) x0, t = N-1 (almost) xT, up to beta[0] / sum(beta).
    slack = betas[0] / betas.sum() * 1.01
    c0, cT, s0 = (c.item() for c in bridge.marginal(torch.tensor(0)))
    assert abs(c0 - 1) <= slack and cT <= slack and abs(s0 - math.sqrt(betas[0])) < 1e-3 * math.sqrt(betas[0]) + 1e-4
    c0, cT, _ = (c.item() for c in bridge.marginal(torch.tensor(N - 1)))
    assert abs(cT - 1) <= slack and c0 <= slack


def test_i2sb_odd_steps_and_float_times():
    bridge = I2SBBridge(n_steps=7)
    assert bridge.betas.shape == (7,) and torch.equal(bridge.betas, bridge.betas.flip(0))
    with pytest.raises(TypeError):
        bridge.marginal(torch.tensor([0.5]))


def test_i2sb_posterior_closed_form():
    bridge = I2SBBridge()
    _, var_fwd, _ = np_i2sb(1000, 0.3)
    s, t = _pairs(bridge)
    coef_x0, coef_xt, std = bridge.posterior(s, t)
    ratio = var_fwd[s.numpy()] / var_fwd[t.numpy()]
    np.testing.assert_allclose(coef_xt.numpy(), ratio, rtol=1e-13)
    np.testing.assert_allclose(coef_x0.numpy(), 1 - ratio, rtol=1e-12)
    expect_std = np.sqrt(var_fwd[s.numpy()] * (var_fwd[t.numpy()] - var_fwd[s.numpy()]) / var_fwd[t.numpy()])
    expect_std[s.numpy() == 0] = 0.0  # I2SB's last step adds no noise
    np.testing.assert_allclose(std.numpy(), expect_std, rtol=1e-12)

    ode = I2SBBridge(ot_ode=True)
    assert torch.all(ode.posterior(s, t)[2] == 0) and torch.all(ode.marginal(t)[2] == 0)
    torch.testing.assert_close(ode.posterior(s, t)[1], coef_xt, rtol=0, atol=0)


def test_vp_closed_form():
    bridge = VPBridge()
    t_np = np.array([1e-4, 0.01, 0.25, 0.5, 0.75, 0.999, 1.0])
    a, b, c, alpha, rho2 = np_vp(t_np)
    t = torch.tensor(t_np)
    np.testing.assert_allclose(bridge.alpha(t).numpy(), alpha(t_np), rtol=1e-14)
    np.testing.assert_allclose(bridge.rho2(t).numpy(), rho2(t_np), rtol=1e-11)
    coef_x0, coef_xT, std = bridge.marginal(t)
    np.testing.assert_allclose(coef_xT.numpy(), a, rtol=1e-10)
    np.testing.assert_allclose(coef_x0.numpy(), b, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(std.numpy(), c, rtol=1e-7, atol=1e-15)  # rhobar at t_max - 1e-3 loses digits in numpy
    # MATH.md 2, general prior: a = (alpha_t/alpha_T) SNR_T/SNR_t, c^2 = sigma_t^2 (1 - SNR_T/SNR_t)
    snr = lambda u: 1 / rho2(u)  # noqa: E731  (alpha^2 / (alpha rho)^2)
    np.testing.assert_allclose(a, alpha(t_np) / alpha(1.0) * snr(1.0) / snr(t_np), rtol=1e-12)
    np.testing.assert_allclose(c**2, alpha(t_np) ** 2 * rho2(t_np) * (1 - snr(1.0) / snr(t_np)), rtol=1e-7, atol=1e-15)

    # Ends: near t_min the marginal is x0, at t_max it is xT.
    c0, cT, s0 = (x.item() for x in bridge.marginal(torch.tensor(1e-4)))
    assert abs(c0 - 1) < 1e-4 and cT < 1e-4 and s0 < 5e-3
    c0, cT, s0 = (x.item() for x in bridge.marginal(torch.tensor(1.0)))
    assert c0 == 0 and cT == 1 and s0 == 0


def test_vp_posterior_closed_form():
    bridge = VPBridge()
    s, t = _pairs(bridge)
    _, _, _, alpha, rho2 = np_vp(0.5)
    s_np, t_np = s.numpy(), t.numpy()
    coef_x0, coef_xt, std = bridge.posterior(s, t)
    np.testing.assert_allclose(coef_xt.numpy(), alpha(s_np) * rho2(s_np) / (alpha(t_np) * rho2(t_np)), rtol=1e-10)
    np.testing.assert_allclose(coef_x0.numpy(), alpha(s_np) * (1 - rho2(s_np) / rho2(t_np)), rtol=1e-10)
    np.testing.assert_allclose(
        std.numpy(), alpha(s_np) * np.sqrt(rho2(s_np)) * np.sqrt(1 - rho2(s_np) / rho2(t_np)), rtol=1e-9
    )


def test_vp_marginal_dt_matches_central_difference():
    bridge = VPBridge()
    t = torch.tensor([1e-3, 0.1, 0.37, 0.8, 0.99], dtype=torch.float64)
    h = 1e-6
    numeric = [(p - m) / (2 * h) for p, m in zip(bridge.marginal(t + h), bridge.marginal(t - h))]
    for analytic, num in zip(bridge.marginal_dt(t), numeric):
        torch.testing.assert_close(analytic, num, rtol=1e-6, atol=1e-8)


def test_vp_precond():
    bridge = VPBridge()
    t_np = np.array([1e-4, 0.3, 0.7, 1.0])
    a, b, c, _, _ = np_vp(t_np)
    sd = 0.5
    A = (a**2 + b**2) * sd**2 + c**2
    c_skip, c_out, c_in, c_noise = bridge.precond(torch.tensor(t_np))
    np.testing.assert_allclose(c_in.numpy(), A**-0.5, rtol=1e-9)
    np.testing.assert_allclose(c_skip.numpy(), b * sd**2 / A, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(c_out.numpy(), np.sqrt(a**2 * sd**4 + sd**2 * c**2) / np.sqrt(A), rtol=1e-7)
    np.testing.assert_allclose(c_noise.numpy(), 250 * np.log(t_np), rtol=1e-6)
    np.testing.assert_allclose(bridge.loss_weight(torch.tensor(t_np)).numpy(), 1 / c_out.numpy() ** 2, rtol=1e-12)
    assert c_noise.dtype == torch.float32 and torch.equal(bridge.net_time(torch.tensor(t_np)), c_noise)


# ----------------------------------------------------------------------------
# Gaussian consistency: posterior(t -> s) of a marginal sample at t is the marginal at s


def test_consistency_algebra_vp():
    bridge = VPBridge()
    s, t = _pairs(bridge)
    coef_x0, coef_xt, std = bridge.posterior(s, t)
    b_t, a_t, c_t = bridge.marginal(t)
    b_s, a_s, c_s = bridge.marginal(s)
    torch.testing.assert_close(coef_xt * a_t, a_s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(coef_xt * b_t + coef_x0, b_s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(coef_xt**2 * c_t**2 + std**2, c_s**2, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("ot_ode", [False, True])
def test_consistency_algebra_i2sb(ot_ode):
    """I2SB's marginal (a product of Gaussians, MATH.md 2a) uses S_n = std_fwd[n]^2 + std_bwd[n]^2 =
    sum(beta) + beta[n], which counts beta[n] on both sides; its posterior is the alpha = 1, rho =
    std_fwd case of MATH.md 3. The three identities hold exactly with the factor S_s / S_t, which
    is 1 up to max(beta) / sum(beta)."""
    bridge = I2SBBridge(ot_ode=ot_ode)
    s, t = _pairs(bridge)
    s, t = s[s > 0], t[s > 0]  # the sampler's last step (to 0) drops the noise by design
    S = bridge.std_fwd**2 + bridge.std_bwd**2
    factor = S[s] / S[t]
    coef_x0, coef_xt, std = bridge.posterior(s, t)
    b_t, a_t, c_t = bridge.marginal(t)
    b_s, a_s, c_s = bridge.marginal(s)
    torch.testing.assert_close(coef_xt * a_t, a_s * factor, rtol=1e-12, atol=0)
    torch.testing.assert_close(1 - (coef_xt * b_t + coef_x0), (1 - b_s) * factor, rtol=1e-12, atol=0)
    if not ot_ode:
        var_fwd_s = bridge.std_fwd[s] ** 2
        # c_s^2 = fwd_s^2 (S_s - fwd_s^2)/S_s, and the composition gives fwd_s^2 (S_t - fwd_s^2)/S_t
        composed = coef_xt**2 * c_t**2 + std**2
        torch.testing.assert_close(composed, var_fwd_s * (1 - var_fwd_s / S[t]), rtol=1e-12, atol=0)
        torch.testing.assert_close(c_s**2, var_fwd_s * (1 - var_fwd_s / S[s]), rtol=1e-12, atol=0)
        torch.testing.assert_close(composed, c_s**2, rtol=2e-3, atol=0)
    else:
        assert torch.all(coef_xt**2 * c_t**2 + std**2 == 0) and torch.all(c_s == 0)
    assert (factor - 1).abs().max() <= bridge.betas.max() / bridge.betas.sum()


@pytest.mark.parametrize("make", BRIDGES)
def test_consistency_monte_carlo(make):
    """q_sample at t with the true x0, then posterior_step to s (in-kernel Philox noise): per sample,
    the standardized result has mean 0 and variance 1 under the composed Gaussian."""
    bridge = make()
    s, t = _pairs(bridge)
    if bridge.is_discrete:
        s, t = s[s > 0], t[s > 0]
    n = 200_000
    B = len(t)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, 1, 1, 1, generator=gen, dtype=torch.float64).expand(B, 1, 400, 500) * 2 - 1
    xT = torch.rand(B, 1, 1, 1, generator=gen, dtype=torch.float64).expand(B, 1, 400, 500) * 2 - 1
    x0, xT = x0.contiguous(), xT.contiguous()
    assert x0[0].numel() == n

    x_t = bridge.q_sample(x0, xT, t, seed=123)
    x_s = bridge.posterior_step(x_t, x0, s, t, seed=456)

    coef_x0, coef_xt, std = bridge.posterior(s, t)
    b_t, a_t, c_t = bridge.marginal(t)
    mean = (coef_xt * b_t + coef_x0) * x0[:, 0, 0, 0] + coef_xt * a_t * xT[:, 0, 0, 0]
    var = coef_xt**2 * c_t**2 + std**2
    z = (x_s.reshape(B, -1) - mean[:, None]) / var.sqrt()[:, None]
    se = 1 / math.sqrt(n)
    assert z.mean(1).abs().max() < 5 * se, z.mean(1)
    assert (z.var(1) - 1).abs().max() < 5 * math.sqrt(2) * se, z.var(1)

    if not bridge.is_discrete:  # VP: the composed Gaussian IS the marginal at s (exact algebra above)
        b_s, a_s, c_s = bridge.marginal(s)
        torch.testing.assert_close(mean, b_s * x0[:, 0, 0, 0] + a_s * xT[:, 0, 0, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var, c_s**2, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------
# q_sample / posterior_step through the fused op


@pytest.mark.parametrize("make", BRIDGES)
def test_q_sample_and_posterior_step_explicit(make):
    bridge = make()
    gen = torch.Generator().manual_seed(1)
    shape = (4, 3, 8, 8)
    x0, xT, noise = (torch.randn(shape, generator=gen) for _ in range(3))
    s, t = _pairs(bridge)
    s, t = s[:4], t[:4]

    coef_x0, coef_xT, std = (c.float().view(-1, 1, 1, 1) for c in bridge.marginal(t))
    torch.testing.assert_close(bridge.q_sample(x0, xT, t, noise=noise), coef_x0 * x0 + coef_xT * xT + std * noise)
    # same seed, same noise; different seed, different noise
    assert torch.equal(bridge.q_sample(x0, xT, t, seed=5), bridge.q_sample(x0, xT, t, seed=5))
    assert not torch.equal(bridge.q_sample(x0, xT, t, seed=5), bridge.q_sample(x0, xT, t, seed=6))

    coef_x0, coef_xt, std = (c.float().view(-1, 1, 1, 1) for c in bridge.posterior(s, t))
    torch.testing.assert_close(
        bridge.posterior_step(xT, x0, s, t, noise=noise), coef_xt * xT + coef_x0 * x0 + std * noise
    )


@pytest.mark.parametrize("make", BRIDGES)
def test_q_sample_gradient(make):
    bridge = make()
    x0 = torch.randn(4, 3, 8, 8, requires_grad=True)
    xT = torch.randn(4, 3, 8, 8)
    t = bridge.sample_t(4, rng=torch.Generator().manual_seed(0))
    bridge.q_sample(x0, xT, t, seed=0).square().sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    # d/dx0 sum(x_t^2) = 2 coef_x0 x_t
    coef_x0 = bridge.marginal(t)[0].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x0.grad, 2 * coef_x0 * bridge.q_sample(x0.detach(), xT, t, seed=0))


# ----------------------------------------------------------------------------
# Training helpers, grids, config


def test_i2sb_training_helpers():
    bridge = I2SBBridge()
    t = bridge.sample_t(10_000, rng=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 990
    torch.testing.assert_close(bridge.loss_weight(t), 1 / bridge.std_fwd[t] ** 2, rtol=0, atol=0)
    # weighted x0 loss == I2SB's eps-label loss, for x0_hat = x_t - std_fwd * net
    x0, x_t, net = torch.randn(3, 5, dtype=torch.float64).unbind(0)
    n = torch.tensor(123)
    x0_hat = x_t - bridge.std_fwd[n] * net
    label = (x_t - x0) / bridge.std_fwd[n]
    torch.testing.assert_close(bridge.loss_weight(n) * (x0_hat - x0).square(), (net - label).square())
    assert bridge.net_time(torch.tensor([0, 999])).dtype == torch.float32
    torch.testing.assert_close(bridge.net_time(torch.tensor([0, 999])), torch.tensor([0.1, 1000.0]))


def test_vp_training_helpers():
    bridge = VPBridge()
    t = bridge.sample_t(10_000, rng=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.min() >= 1e-4 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.5) < 0.02
    w = bridge.loss_weight(t)
    assert torch.isfinite(w).all() and (w > 0).all()


def test_sampling_grids():
    i2sb = I2SBBridge()
    for nfe in (1, 2, 4, 20, 999):
        grid = i2sb.sampling_grid(nfe)
        assert grid.dtype == torch.long and len(grid) == nfe + 1
        assert grid[0] == 0 and grid[-1] == 999 and (grid.diff() > 0).all()
        assert grid.tolist() == space_indices(1000, nfe + 1)
    with pytest.raises(ValueError):
        i2sb.sampling_grid(1000)

    vp = VPBridge()
    for spacing in ("uniform", "karras"):
        for nfe in (1, 3, 10):
            grid = vp.sampling_grid(nfe, spacing=spacing)
            assert grid.dtype == torch.float64 and len(grid) == nfe + 1
            assert grid[0] == vp.t_min and grid[-1] == vp.t_max and (grid.diff() > 0).all()
    torch.testing.assert_close(vp.sampling_grid(4), torch.linspace(1e-4, 1, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "make",
    BRIDGES
    + [
        pytest.param(lambda: I2SBBridge(10, 0.5, True), id="ot-ode"),
        pytest.param(lambda: VPBridge(0.2, 1.5, 1e-3, 0.9), id="vp-custom"),
    ],
)
def test_config_round_trip(make):
    bridge = make()
    config = bridge.config()
    assert config["type"] in ("i2sb", "vp")
    rebuilt = bridge_from_config(config)
    assert type(rebuilt) is type(bridge) and rebuilt.config() == config
    assert config == bridge.config()  # not mutated
    t = bridge.sampling_grid(3)
    for a, b in zip(bridge.marginal(t), rebuilt.marginal(t)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        bridge_from_config({"type": "nope"})


def test_times_is_the_grid_value_as_the_bridges_time_tensor():
    """``Bridge.times``: every grid point, as the [B] tensor ``marginal`` and ``sample_t`` use."""
    i2sb, vp = I2SBBridge(n_steps=20), VPBridge()
    t = i2sb.times(i2sb.sampling_grid(4)[2], 3)  # a 0-d LongTensor value
    assert t.dtype == torch.long and t.shape == (3,) and t.tolist() == [i2sb.sampling_grid(4)[2].item()] * 3
    assert i2sb.times(i2sb.T, 2).tolist() == [19, 19]
    assert i2sb.times(i2sb.T, 1).dtype == i2sb.sample_t(1).dtype
    t = vp.times(0.25, 2, "cpu")
    assert t.dtype == torch.float64 and t.tolist() == [0.25, 0.25] and t.device.type == "cpu"
    assert vp.times(vp.T, 1).dtype == vp.sample_t(1).dtype
    # the same coefficients as the grid itself, point by point
    for bridge in (i2sb, vp):
        grid = bridge.sampling_grid(3)
        for i, value in enumerate(grid.tolist()):
            for a, b in zip(bridge.marginal(bridge.times(value, 2)), bridge.marginal(grid[i : i + 1])):
                assert torch.equal(a, b.expand(2))
