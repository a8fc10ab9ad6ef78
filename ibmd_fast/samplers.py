"""Teacher samplers: I2SB posterior/DDPM, DBIM, DDBM Heun (the student's chain is ``restore.student_chain``).

Flat functions in the manner of EDM's ``edm_sampler``. Each takes

- ``predict_x0(x_t, t) -> x0_hat``: the denoiser; ``t`` is a ``[B]`` tensor of the bridge's
  time type (LongTensor step indices for ``I2SBBridge``, float64 for ``VPBridge``; feed the
  network ``bridge.net_time(t)``). Conditioning on ``xT`` is the caller's closure.
- the bridge, the corrupted images ``xT`` and the number of network calls ``nfe``;
- ``seed`` (an int) or ``rng`` (a ``torch.Generator``): the only noise source. A CPU
  generator seeded from it draws one 62-bit seed per noisy operation, and the noise itself is
  the Philox noise of ``ops.bridge_step``, so a seed gives the same images on CPU and CUDA.
  With neither, the seed is drawn from torch's default generator (``torch.manual_seed`` fixes it).
- ``callback(info: dict)``, called once per step with ``step``, ``t``, ``s`` (the time
  stepped to), ``x`` (the state at ``s``), ``x0_hat``, ``std`` (the fresh-noise std of the step,
  ``[B]``) and ``nfe`` (network calls so far); and ``progress`` (a tqdm bar).

Every sampler returns the LAST network prediction ``x0_hat``, not the state at the end of the
grid: the I2SB and DBIM state at the first grid point still carries ``coef_xt(0, t_1) x_{t_1}``
and (VP) ``c_{t_min}`` noise, whereas ``x0_hat`` is the model's clean estimate. The state
is in the last callback's ``x`` (the released I2SB ``sample.py`` reports that state).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ibmd_fast import ops
from ibmd_fast.bridges import Bridge, I2SBBridge, VPBridge
from ibmd_fast.known_pixels import fill_hole, impose_known

__all__ = [
    "i2sb_sample",
    "dbim_sample",
    "dbim_coefficients",
    "heun_sample",
    "heun_schedule",
    "probability_flow_coefficients",
    "make_rng",
]


PredictX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[dict], None]]


# ----------------------------------------------------------------------------
# Noise source and small helpers


def make_rng(seed: Optional[int] = None, rng: Optional[torch.Generator] = None) -> torch.Generator:
    """The samplers' noise source: ``rng`` itself, or a CPU generator seeded with ``seed``
    (drawn from torch's default generator when both are None)."""
    if seed is not None and rng is not None:
        raise ValueError("pass seed or rng, not both")
    if rng is not None:
        return rng
    rng = torch.Generator(device="cpu")
    rng.manual_seed(int(seed) if seed is not None else ops.draw_seed())
    return rng


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _steps(n: int, progress: bool, desc: str):
    return tqdm(range(n), desc=desc, disable=not progress, leave=False)


def _report(callback: Callback, **info) -> None:
    if callback is not None:
        callback(info)


# ----------------------------------------------------------------------------
# I2SB posterior (DDPM) sampler, MATH.md 3


@torch.no_grad()
def i2sb_sample(
    predict_x0: PredictX0,
    bridge: I2SBBridge,
    xT: torch.Tensor,
    nfe: int,
    mask: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    rng: Optional[torch.Generator] = None,
    callback: Callback = None,
    progress: bool = False,
    noise_fill: bool = True,
) -> torch.Tensor:
    """I2SB's posterior sampler with ``nfe`` network calls (MATH.md 3; I2SB ``ddpm_sampling``).

    Visits ``bridge.sampling_grid(nfe)`` in reverse from ``x = xT``: ``x0_hat = predict_x0(x, n)``,
    then ``posterior_step`` to the next index ``n'`` (no noise at ``n' = 0`` or for OT-ODE).
    Inpainting (``mask``, 1 inside the hole): the hole of ``xT`` is first filled with Gaussian
    noise (unless ``noise_fill=False``), and after each step the known pixels are re-imposed,
    ``x = (1 - m)(xT + std_sb[n'] eps) + m x``; the returned ``x0_hat`` takes its known pixels
    from ``xT``. Returns the last ``x0_hat`` (see the module docstring).
    """
    if not isinstance(bridge, I2SBBridge):
        raise TypeError(f"i2sb_sample needs an I2SBBridge, got {type(bridge).__name__}")
    rng = make_rng(seed, rng)
    grid = bridge.sampling_grid(nfe).tolist()
    batch, device = xT.shape[0], xT.device

    # Inpainting: the hole of xT carries no information; I2SB starts it from pure noise.
    if mask is not None:
        mask = mask.to(device=device, dtype=xT.dtype)
        if noise_fill:
            xT = fill_hole(xT, mask, ops.draw_seed(rng))

    x = xT
    for i in _steps(nfe, progress, "i2sb"):
        t = bridge.times(grid[nfe - i], batch, device)
        s = bridge.times(grid[nfe - i - 1], batch, device)
        x0_hat = predict_x0(x, t).to(x.dtype)
        # Posterior step n -> n' (MATH.md 3).
        x = bridge.posterior_step(x, x0_hat, s, t, seed=ops.draw_seed(rng))
        std = bridge.posterior(s, t)[2]
        if mask is not None:
            # Known pixels are those of the bridge marginal at n' around the known xT.
            known = ops.bridge_step(xT, xT, 1.0, 0.0, bridge.marginal(s)[2].to(device), seed=ops.draw_seed(rng))
            x = impose_known(x, known, mask)
        _report(callback, step=i, t=t, s=s, x=x, x0_hat=x0_hat, std=std, nfe=i + 1)

    if mask is not None:
        x0_hat = impose_known(x0_hat, xT, mask)
    return x0_hat


# ----------------------------------------------------------------------------
# DBIM, MATH.md 3 (Zheng et al. 2025)


def dbim_coefficients(
    bridge: Bridge, s: torch.Tensor, t: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DBIM step t -> s as ``x_s = coef_xt x_t + coef_x0 x0_hat + coef_xT xT + std eps``.

    Returns ``(coef_xt, coef_x0, coef_xT, std)``, float64 ``[B]``. Derivation: write
    ``x_t = b_t x0_hat + a_t xT + c_t eps_hat`` (this defines ``eps_hat``, the noise implied
    by ``x_t``). The posterior step (MATH.md 3) ``x_s = k_t x_t + k_0 x0_hat + sigma eps`` is then
    ``(k_t b_t + k_0) x0_hat + k_t a_t xT + [k_t c_t eps_hat + sigma eps]``, whose noise part has
    variance ``k_t^2 c_t^2 + sigma^2`` (= ``c_s^2``, the marginal's, for VP). DBIM keeps the
    mean and that variance but takes only ``eta sigma`` as fresh noise:
    ``k eps_hat + eta sigma eps`` with ``k = sqrt(k_t^2 c_t^2 + (1 - eta^2) sigma^2)``.
    Substituting ``eps_hat = (x_t - b_t x0_hat - a_t xT)/c_t`` and ``r = k / c_t``:
    ``coef_xt = r``, ``coef_x0 = k_0 + (k_t - r) b_t``, ``coef_xT = (k_t - r) a_t``,
    ``std = eta sigma``. At ``eta = 1``, ``r = k_t`` and this is the posterior step exactly;
    at ``eta = 0`` it is deterministic. Where ``c_t = 0`` (``x_t`` carries no noise: t = T on
    the VP bridge, or OT-ODE) ``eps_hat`` is undefined and the posterior step is used.
    """
    k_0, k_t, sigma = bridge.posterior(s, t)
    b_t, a_t, c_t = bridge.marginal(t)
    k = torch.sqrt(k_t**2 * c_t**2 + (1.0 - eta**2) * sigma**2)
    has_noise = c_t > 0
    r = torch.where(has_noise, k / torch.where(has_noise, c_t, torch.ones_like(c_t)), k_t)
    coef_x0 = k_0 + (k_t - r) * b_t
    coef_xT = (k_t - r) * a_t
    std = torch.where(has_noise, eta * sigma, sigma)
    return r, coef_x0, coef_xT, std


@torch.no_grad()
def dbim_sample(
    predict_x0: PredictX0,
    bridge: Bridge,
    xT: torch.Tensor,
    nfe: int,
    eta: float = 1.0,
    seed: Optional[int] = None,
    rng: Optional[torch.Generator] = None,
    callback: Callback = None,
    progress: bool = False,
) -> torch.Tensor:
    """DBIM with ``nfe`` network calls on ``bridge.sampling_grid(nfe)``, for both bridges.

    ``eta = 1`` is the posterior (DDPM-like) sampler, ``eta = 0`` deterministic, values in
    between interpolate the fresh noise (``dbim_coefficients``). The first step, from T,
    is always the posterior step: DBIM's "booting noise". At T the bridge pins ``x = xT`` (on
    the VP bridge ``c_T = 0``), so the implied noise is undefined there and the sample's only
    randomness at ``eta = 0`` comes from this step, as the initial noise of a diffusion ODE.
    Returns the last ``x0_hat``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    rng = make_rng(seed, rng)
    grid = bridge.sampling_grid(nfe).tolist()
    batch, device = xT.shape[0], xT.device

    x = xT
    for i in _steps(nfe, progress, "dbim"):
        t = bridge.times(grid[nfe - i], batch, device)
        s = bridge.times(grid[nfe - i - 1], batch, device)
        x0_hat = predict_x0(x, t).to(x.dtype)
        step_seed = ops.draw_seed(rng)
        if i == 0 or eta == 1.0:
            # Booting step, or eta = 1: the posterior step itself (MATH.md 3).
            x = bridge.posterior_step(x, x0_hat, s, t, seed=step_seed)
            std = bridge.posterior(s, t)[2]
        else:
            coef_xt, coef_x0, coef_xT, std = (c.to(device) for c in dbim_coefficients(bridge, s, t, eta))
            # Three inputs, two fused steps: deterministic part, then xT and the fresh noise.
            x = ops.bridge_step(x, x0_hat, coef_xt, coef_x0, 0.0)
            x = ops.bridge_step(x, xT, 1.0, coef_xT, std, seed=step_seed)
        _report(callback, step=i, t=t, s=s, x=x, x0_hat=x0_hat, std=std, nfe=i + 1)
    return x0_hat


# ----------------------------------------------------------------------------
# DDBM's Heun sampler (VP bridge)


def probability_flow_coefficients(bridge: VPBridge, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probability-flow ODE of the bridge: ``dx/dt = coef_x x + coef_x0 x0_hat + coef_xT xT``.

    From the marginal ``x_t = b_t x0 + a_t xT + c_t eps`` (MATH.md 2): along a path of fixed
    ``x0`` and ``eps``, ``dx/dt = b'_t x0 + a'_t xT + c'_t eps`` with
    ``eps = (x_t - b_t x0 - a_t xT)/c_t``. The marginal ODE averages this velocity over
    ``x0 | x_t``; it is affine in ``x0``, so it is the same expression at ``x0_hat = E[x0 | x_t]``:
    ``coef_x = c'/c``, ``coef_x0 = b' - b c'/c``, ``coef_xT = a' - a c'/c``. Needs ``c_t > 0``
    (t < T).
    """
    b_t, a_t, c_t = bridge.marginal(t)
    db, da, dc = bridge.marginal_dt(t)
    k = dc / c_t
    return k, db - k * b_t, da - k * a_t


def _drift(bridge: VPBridge, x: torch.Tensor, x0_hat: torch.Tensor, xT: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    coef_x, coef_x0, coef_xT = probability_flow_coefficients(bridge, t)
    return _per_sample(coef_x, x) * x + _per_sample(coef_x0, x) * x0_hat + _per_sample(coef_xT, x) * xT


def heun_schedule(nfe: int) -> tuple[int, int]:
    """``(steps, heun_steps)`` of ``heun_sample`` for a budget of ``nfe`` network calls.

    A step costs 2 calls (stochastic step + Euler ODE step), 3 with Heun's correction. The last
    step never takes the correction: its slope would be evaluated at ``t_min``, where the ODE is
    stiff (``c'/c ~ 1/(2t)``) and the explicit correction blows up; DDBM (like EDM) ends with an
    Euler step for the same reason. So ``steps = ceil((nfe + 1) / 3)`` and the first
    ``heun_steps = nfe - 2 steps`` steps (from T down) are Heun steps: DDBM's
    ``nfe = 3 steps - 1`` is the all-Heun case, and every ``nfe`` is met exactly except
    ``nfe = 3``, which runs 2 calls (one Euler step). ``nfe = 1`` is a single prediction at T.
    The calls made are ``2 steps + heun_steps`` (or 1).
    """
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    if nfe == 1:
        return 0, 0
    steps = math.ceil((nfe + 1) / 3)
    if nfe - 2 * steps < 0:  # only nfe = 3: one step fewer, no room for a correction
        steps -= 1
    return steps, min(nfe - 2 * steps, steps - 1)


@torch.no_grad()
def heun_sample(
    predict_x0: PredictX0,
    bridge: VPBridge,
    xT: torch.Tensor,
    nfe: int,
    churn: float = 0.33,
    spacing: str = "karras",
    seed: Optional[int] = None,
    rng: Optional[torch.Generator] = None,
    callback: Callback = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDBM's sampler (Zhou et al. 2024, Alg. "Heun"): per step a stochastic step, then a Heun ODE step.

    On ``bridge.sampling_grid(steps, spacing)`` (DDBM: Karras spacing, rho = 7), step
    ``t -> t_next``, with ``t_hat = t + churn (t_next - t)``:

    1. stochastic part, ``t -> t_hat``: the bridge posterior step with ``x0_hat(x, t)``. DDBM takes
       an Euler-Maruyama step of the reverse bridge SDE here; the posterior step is that SDE's
       exact transition when ``x0_hat`` is held fixed over the step (same order and cost), and it
       is finite at t = T, where the SDE drift is singular.
    2. ODE part, ``t_hat -> t_next``: Euler on the probability-flow ODE
       (``probability_flow_coefficients``) with ``x0_hat(x, t_hat)``, plus Heun's correction with
       ``x0_hat(x_euler, t_next)`` on the first ``heun_steps`` steps.

    Network calls: ``nfe``, except 2 for ``nfe = 3`` (``heun_schedule``); the callback's ``nfe``
    counts them. Returns the last ``x0_hat``.
    """
    if not isinstance(bridge, VPBridge):
        raise TypeError(f"heun_sample needs a VPBridge, got {type(bridge).__name__}")
    if not 0.0 < churn < 1.0:
        raise ValueError(f"churn must be in (0, 1) (the ODE is singular at T), got {churn}")
    rng = make_rng(seed, rng)
    batch, device = xT.shape[0], xT.device
    n_steps, n_heun = heun_schedule(nfe)
    if n_steps == 0:
        x0_hat = predict_x0(xT, bridge.times(bridge.T, batch, device)).to(xT.dtype)
        _report(
            callback,
            step=0,
            t=bridge.times(bridge.T, batch, device),
            s=None,
            x=xT,
            x0_hat=x0_hat,
            std=torch.zeros(batch, dtype=torch.float64),
            nfe=1,
        )
        return x0_hat
    grid = bridge.sampling_grid(n_steps, spacing=spacing).tolist()

    x, calls = xT, 0
    for i in _steps(n_steps, progress, "heun"):
        t_cur, t_next = grid[n_steps - i], grid[n_steps - i - 1]
        t_hat_value = t_cur + churn * (t_next - t_cur)
        t, t_hat, s = (bridge.times(v, batch, device) for v in (t_cur, t_hat_value, t_next))

        # 1. Stochastic step t -> t_hat.
        x0_hat = predict_x0(x, t).to(x.dtype)
        x = bridge.posterior_step(x, x0_hat, t_hat, t, seed=ops.draw_seed(rng))
        std = bridge.posterior(t_hat, t)[2]

        # 2. Euler ODE step t_hat -> t_next ...
        dt = t_next - t_hat_value
        x0_hat = predict_x0(x, t_hat).to(x.dtype)
        drift = _drift(bridge, x, x0_hat, xT, t_hat)
        x_euler = x + dt * drift
        calls += 2
        # ... and Heun's correction with the slope at t_next.
        if i < n_heun:
            x0_hat = predict_x0(x_euler, s).to(x.dtype)
            x = x + (0.5 * dt) * (drift + _drift(bridge, x_euler, x0_hat, xT, s))
            calls += 1
        else:
            x = x_euler
        _report(callback, step=i, t=t, s=s, x=x, x0_hat=x0_hat, std=std, nfe=calls)
    return x0_hat
