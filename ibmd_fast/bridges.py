"""Diffusion bridges (MATH.md 2): marginals, posteriors, time grids and loss weights.

``I2SBBridge`` (MATH.md 2a; times are LongTensor step indices in ``[0, n_steps - 1]``), ``VPBridge``
(MATH.md 2b; float times in ``[t_min, t_max]``) and ``VEBridge`` (MATH.md 2c: alpha = 1, rho_t = t;
float times in ``[sigma_min, sigma_max]``; VPBridge's machinery with its own schedule) each have
``marginal(t)``, ``posterior(s, t)`` (MATH.md 3), ``q_sample`` / ``posterior_step`` (through the fused
``ops.bridge_step``), ``sample_t``, ``loss_weight`` (MATH.md 4), ``sampling_grid(nfe)``,
``times(value, batch, device)``, ``net_time(t)`` and ``config()``. Schedule arithmetic is float64;
coefficients are float64 ``[B]`` tensors on t's device (``ops.bridge_step`` casts them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ibmd_fast import ops

__all__ = ["Bridge", "I2SBBridge", "VPBridge", "VEBridge", "bridge_from_config", "space_indices"]

Coefs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def space_indices(num_steps: int, count: int) -> list[int]:
    """``count`` ascending step indices from 0 to ``num_steps - 1``: ``round(i (N-1)/(count-1))`` (MATH.md 3).

    ``round`` is Python's (half to even). The released I2SB code accumulates the stride
    instead, which lands one index away at some exact ties (e.g. N=1000, count=21); we follow
    MATH.md.
    """
    if not 2 <= count <= num_steps:
        raise ValueError(f"count must be in [2, num_steps={num_steps}], got {count}")
    return [round(i * (num_steps - 1) / (count - 1)) for i in range(count)]


def _check_finite(**values: float) -> None:
    """Bridge settings are finite numbers (NaN passes every comparison, Inf overflows the schedule)."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")


def gaussian_product(var1: torch.Tensor, var2: torch.Tensor) -> Coefs:
    """Product of ``N(x0, var1)`` and ``N(xT, var2)``: ``(coef_x0, coef_xT, var)`` (MATH.md 2a, I2SB eq. 11)."""
    denom = var1 + var2
    return var2 / denom, var1 / denom, var1 * var2 / denom


def alpha_rho_posterior(
    alpha_s: torch.Tensor, rho2_s: torch.Tensor, alpha_t: torch.Tensor, rho2_t: torch.Tensor
) -> Coefs:
    """Posterior step s < t from ``alpha`` and ``rho^2`` at both times: ``(coef_x0, coef_xt, std)`` (MATH.md 3).

    ``coef_xt = alpha_s rho_s^2 / (alpha_t rho_t^2)``, ``coef_x0 = alpha_s (1 - rho_s^2/rho_t^2)``,
    ``std = alpha_s rho_s sqrt(1 - rho_s^2/rho_t^2)``. The I2SB bridge is ``alpha = 1``,
    ``rho = std_fwd``.
    """
    ratio = rho2_s / rho2_t
    coef_xt = alpha_s * ratio / alpha_t
    coef_x0 = alpha_s * (1.0 - ratio)
    std = alpha_s * torch.sqrt((rho2_s * (1.0 - ratio)).clamp_min(0.0))
    return coef_x0, coef_xt, std


def _draw_device(rng: Optional[torch.Generator], device: Optional[torch.device]) -> torch.device:
    """Random draws happen on ``rng``'s device (torch requires it), else on ``device``."""
    if rng is not None:
        return rng.device
    return torch.device(device) if device is not None else torch.device("cpu")


class Bridge:
    """What both bridges share: the two fused sampling maps (MATH.md 2 and 3).

    Subclasses define ``marginal(t)`` and ``posterior(s, t)``; ``q_sample`` and
    ``posterior_step`` are the same elementwise map ``coef_a * a + coef_b * b + std * eps``
    and both go through ``ops.bridge_step``.
    """

    is_discrete: bool
    T: float | int

    def marginal(self, t: torch.Tensor) -> Coefs:  # pragma: no cover - abstract
        raise NotImplementedError

    def posterior(self, s: torch.Tensor, t: torch.Tensor) -> Coefs:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def times(self, value, batch: int, device: Optional[torch.device | str] = None) -> torch.Tensor:
        """A time value (a grid point, ``T``) as the ``[batch]`` tensor the bridge and the networks take.

        The one place a time changes type: int64 step indices for a discrete bridge (I2SB),
        float64 otherwise (VP, VE), as ``sample_t`` draws them.
        """
        if self.is_discrete:
            return torch.full((batch,), int(value), dtype=torch.long, device=device)
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)

    def q_sample(
        self,
        x0: torch.Tensor,
        xT: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        """``x_t = coef_x0 x0 + coef_xT xT + std eps`` (MATH.md 2; I2SB eq. 11).

        ``eps`` is ``noise`` when given, else the op's Philox noise of ``seed``. Differentiable
        in ``x0`` and ``xT`` (IBMD's generator step backpropagates through it, MATH.md 5).
        """
        coef_x0, coef_xT, std = self.marginal(t)
        return ops.bridge_step(x0, xT, *_on(x0.device, coef_x0, coef_xT, std), noise=noise, seed=seed)

    def posterior_step(
        self,
        x_t: torch.Tensor,
        x0_hat: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        """``x_s = coef_xt x_t + coef_x0 x0_hat + std eps`` for s < t (MATH.md 3; I2SB eq. 4)."""
        coef_x0, coef_xt, std = self.posterior(s, t)
        return ops.bridge_step(x_t, x0_hat, *_on(x_t.device, coef_xt, coef_x0, std), noise=noise, seed=seed)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


def _on(device: torch.device, *coefs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(c.to(device) for c in coefs)


# ----------------------------------------------------------------------------
# I2SB (MATH.md 2a)


def i2sb_betas(n_steps: int, beta_max: float) -> torch.Tensor:
    """I2SB's symmetric beta schedule in float64 (MATH.md 2a).

    ``beta = linspace(sqrt(1e-4), sqrt(beta_max / N), N)^2``, then its first half followed
    by that half reversed. For odd N the middle step appears once (the released code assumes
    an even N, where this is the same).
    """
    betas = torch.linspace(1e-4**0.5, (beta_max / n_steps) ** 0.5, n_steps, dtype=torch.float64) ** 2
    return torch.cat([betas[: (n_steps + 1) // 2], torch.flip(betas[: n_steps // 2], dims=(0,))])


class I2SBBridge(Bridge):
    """The discrete I2SB bridge (MATH.md 2a; Liu et al. 2023). Times are step indices.

    Attributes (float64 CPU tensors of shape ``[n_steps]``): ``betas``, ``std_fwd``
    (``sqrt(cumsum beta)``), ``std_bwd`` (``sqrt`` of the reverse cumsum), ``std_sb`` (the
    Schrödinger-bridge marginal std; ``marginal`` returns 0 instead for OT-ODE) and
    ``noise_levels`` (the network's time input, ``linspace(t0, T, N) * N``; I2SB's ``--t0``
    and ``--T``). ``T = n_steps - 1`` indexes the corrupted end. ``float32_levels`` computes
    the noise levels as the released I2SB and DBIM code does (a float32 linspace times N, up to
    an ulp away from the float64 values), which imported teachers need to be exact.
    """

    is_discrete = True

    def __init__(
        self,
        n_steps: int = 1000,
        beta_max: float = 0.3,
        ot_ode: bool = False,
        t0: float = 1e-4,
        T: float = 1.0,
        float32_levels: bool = False,
    ):
        if int(n_steps) < 2:
            raise ValueError(f"n_steps must be at least 2, got {n_steps}")
        _check_finite(beta_max=beta_max, t0=t0, T=T)
        if not beta_max > 0:
            raise ValueError(f"beta_max must be positive, got {beta_max}")
        self.n_steps = int(n_steps)
        self.beta_max = float(beta_max)
        self.ot_ode = bool(ot_ode)
        if not 0 <= t0 < T:
            raise ValueError(f"need 0 <= t0 < T for the noise levels, got t0={t0}, T={T}")
        self.t0, self.time_T, self.float32_levels = float(t0), float(T), bool(float32_levels)
        self.T = self.n_steps - 1

        self.betas = i2sb_betas(self.n_steps, self.beta_max)
        self.std_fwd = torch.sqrt(torch.cumsum(self.betas, dim=0))
        self.std_bwd = torch.sqrt(torch.flip(torch.cumsum(torch.flip(self.betas, dims=(0,)), dim=0), dims=(0,)))
        coef_x0, coef_xT, var = gaussian_product(self.std_fwd**2, self.std_bwd**2)
        self.std_sb = torch.sqrt(var)
        levels_dtype = torch.float32 if self.float32_levels else torch.float64
        levels = torch.linspace(self.t0, self.time_T, self.n_steps, dtype=levels_dtype) * self.n_steps
        self.noise_levels = levels.to(torch.float64)

        self._cpu = {
            "coef_x0": coef_x0,
            "coef_xT": coef_xT,
            "std_sb": self.std_sb,
            "var_fwd": self.std_fwd**2,
            "noise_levels": self.noise_levels,
        }
        if not all(bool(torch.isfinite(v).all()) for v in self._cpu.values()):
            raise ValueError(
                f"beta_max {beta_max} overflows the noise schedule of {n_steps} steps; "
                "I2SB uses 0.3 (super-resolution, JPEG) or 1.0 (inpainting)"
            )
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {torch.device("cpu"): self._cpu}

    def _table(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``table[t]`` from a per-device copy, so no host sync happens inside a training step."""
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"I2SBBridge times are integer step indices, got a {t.dtype} tensor")
        tables = self._tables.get(t.device)
        if tables is None:
            tables = self._tables[t.device] = {k: v.to(t.device) for k, v in self._cpu.items()}
        return tables[name][t.long()]

    def marginal(self, t: torch.Tensor) -> Coefs:
        """``q(x_t | x0, xT)``: ``(coef_x0, coef_xT, std)`` (MATH.md 2a; I2SB eq. 11). OT-ODE: std = 0."""
        std = self._table("std_sb", t)
        if self.ot_ode:
            std = torch.zeros_like(std)
        return self._table("coef_x0", t), self._table("coef_xT", t), std

    def posterior(self, s: torch.Tensor, t: torch.Tensor) -> Coefs:
        """Step n = t to n' = s < t: ``(coef_x0, coef_xt, std)`` (MATH.md 3, I2SB eq. 4).

        ``coef_xt = std_fwd[s]^2/std_fwd[t]^2``, ``coef_x0 = 1 - coef_xt``; no noise when
        ``s == 0`` (the I2SB sampler's last step) or for OT-ODE.
        """
        one = torch.ones((), dtype=torch.float64, device=t.device)
        coef_x0, coef_xt, std = alpha_rho_posterior(one, self._table("var_fwd", s), one, self._table("var_fwd", t))
        if self.ot_ode:
            std = torch.zeros_like(std)
        else:
            std = torch.where(torch.as_tensor(s, device=std.device) == 0, torch.zeros_like(std), std)
        return coef_x0, coef_xt, std

    def sample_t(
        self, batch: int, rng: Optional[torch.Generator] = None, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """Step indices uniform over ``[0, n_steps - 1]`` (MATH.md 4), a LongTensor ``[batch]``."""
        t = torch.randint(0, self.n_steps, (batch,), generator=rng, device=_draw_device(rng, device))
        return t.to(device) if device is not None else t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``lambda(t) = 1 / std_fwd[t]^2`` (MATH.md 2a, 4), float64 ``[B]``.

        I2SB trains an eps-like output with label ``(x_t - x0)/std_fwd[t]`` and
        ``x0_hat = x_t - std_fwd[t] * net``, so its loss ``||net - label||^2`` equals
        ``||x0_hat - x0||^2 / std_fwd[t]^2``: with this weight the x0-space loss is I2SB's loss.
        """
        return 1.0 / self._table("var_fwd", t)

    def sampling_grid(self, nfe: int) -> torch.Tensor:
        """``space_indices(n_steps, nfe + 1)`` as an ascending LongTensor from 0 to ``n_steps - 1``
        (MATH.md 3); a sampler with ``nfe`` network calls visits it in reverse."""
        if not 1 <= nfe <= self.n_steps - 1:
            raise ValueError(f"nfe must be in [1, {self.n_steps - 1}] for {self.n_steps} steps, got {nfe}")
        return torch.tensor(space_indices(self.n_steps, nfe + 1), dtype=torch.long)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input ``noise_levels[t]`` (MATH.md 2a), float32 on t's device."""
        return self._table("noise_levels", t).float()

    def config(self) -> dict:
        config = {"type": "i2sb", "n_steps": self.n_steps, "beta_max": self.beta_max, "ot_ode": self.ot_ode}
        # the network-time settings only where they differ from the defaults (older configs stay valid)
        if (self.t0, self.time_T, self.float32_levels) != (1e-4, 1.0, False):
            config.update(t0=self.t0, T=self.time_T, float32_levels=self.float32_levels)
        return config


# ----------------------------------------------------------------------------
# DDBM VP (MATH.md 2b)


class VPBridge(Bridge):
    """The DDBM VP bridge (MATH.md 2b; Zhou et al. 2024). Times are floats in ``[t_min, t_max]``.

    ``alpha_t = exp(-beta_min t/2 - beta_d t^2/4)``, ``rho_t^2 = exp(beta_min t + beta_d t^2/2) - 1``;
    every coefficient below is built from these two. ``T = t_max``.

    ``sigma_data`` and ``cov_xy`` are DDBM's preconditioning constants (``precond``).
    """

    is_discrete = False

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_d: float = 2.0,
        t_min: float = 1e-4,
        t_max: float = 1.0,
        sigma_data: float = 0.5,
        cov_xy: float = 0.0,
    ):
        self._set_precond(sigma_data, cov_xy)
        _check_finite(beta_min=beta_min, beta_d=beta_d, t_min=t_min, t_max=t_max)
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if beta_min < 0 or beta_d < 0 or beta_min + beta_d <= 0:
            raise ValueError(f"need beta_min, beta_d >= 0 and not both 0, got {beta_min}, {beta_d}")
        self.beta_min = float(beta_min)
        self.beta_d = float(beta_d)
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.T = self.t_max
        self._rho2_T = float(self.rho2(self.t_max))  # a Python float: no host-to-device copy per call
        if not (math.isfinite(self._rho2_T) and self._rho2_T > 0):
            raise ValueError(f"beta_min {beta_min}, beta_d {beta_d} give a non-finite or zero noise level at t_max")

    def _set_precond(self, sigma_data: float, cov_xy: float) -> None:
        _check_finite(sigma_data=sigma_data, cov_xy=cov_xy)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if not cov_xy**2 <= sigma_data**4:
            raise ValueError(f"need |cov_xy| <= sigma_data^2, got cov_xy={cov_xy}, sigma_data={sigma_data}")
        self.sigma_data, self.cov_xy = float(sigma_data), float(cov_xy)

    def _precond_config(self) -> dict:
        """``sigma_data`` / ``cov_xy`` only where they differ from DDBM's defaults (older configs stay valid)."""
        if (self.sigma_data, self.cov_xy) == (0.5, 0.0):
            return {}
        return {"sigma_data": self.sigma_data, "cov_xy": self.cov_xy}

    @staticmethod
    def _t(t) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.to(torch.float64)
        return torch.as_tensor(t, dtype=torch.float64)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_t = exp(-beta_min t/2 - beta_d t^2/4)`` (MATH.md 2b), float64."""
        t = self._t(t)
        return torch.exp(-0.5 * self.beta_min * t - 0.25 * self.beta_d * t**2)

    def rho2(self, t: torch.Tensor) -> torch.Tensor:
        """``rho_t^2 = exp(beta_min t + beta_d t^2/2) - 1`` (MATH.md 2b), float64 (expm1: exact near 0)."""
        t = self._t(t)
        return torch.expm1(self.beta_min * t + 0.5 * self.beta_d * t**2)

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        """``beta(t) = beta_min + beta_d t = d/dt log(1 + rho_t^2) = -2 d/dt log(alpha_t)``."""
        return self.beta_min + self.beta_d * self._t(t)

    def _ends(self, t):
        """``t``, ``alpha_t``, ``rho_t^2``, ``alphabar_t = alpha_t/alpha_T`` and ``u = rho_t^2/rho_T^2``.

        Both ratios are exactly 1 at t = t_max on every device: ``alphabar_t`` is one ``exp`` of the
        exponent difference, and ``u`` is pinned there (a CUDA ``expm1`` may differ by an ulp).
        """
        t = self._t(t)
        alpha_t, rho2_t = self.alpha(t), self.rho2(t)
        alphabar_t = torch.exp(0.5 * self.beta_min * (self.t_max - t) + 0.25 * self.beta_d * (self.t_max**2 - t**2))
        frac = torch.where(t >= self.t_max, torch.ones_like(t), (rho2_t / self._rho2_T).clamp(0.0, 1.0))
        return t, alpha_t, rho2_t, alphabar_t, frac

    def marginal(self, t: torch.Tensor) -> Coefs:
        """``q(x_t | x0, xT)``: ``(b_t, a_t, c_t)`` as ``(coef_x0, coef_xT, std)`` (MATH.md 2b).

        ``a_t = (alpha_t/alpha_T) rho_t^2/rho_T^2``, ``b_t = alpha_t (1 - rho_t^2/rho_T^2)``,
        ``c_t = alpha_t rho_t sqrt(1 - rho_t^2/rho_T^2)``.
        """
        _, alpha_t, rho2_t, alphabar_t, frac = self._ends(t)
        coef_xT = alphabar_t * frac
        coef_x0 = alpha_t * (1.0 - frac)
        std = alpha_t * torch.sqrt(rho2_t * (1.0 - frac))
        return coef_x0, coef_xT, std

    def marginal_dt(self, t: torch.Tensor) -> Coefs:
        """Time derivatives ``(db_t/dt, da_t/dt, dc_t/dt)`` of the marginal coefficients (MATH.md 2b).

        With ``beta = beta_min + beta_d t``, ``u = rho_t^2/rho_T^2``: ``alpha' = -alpha beta/2``,
        ``(rho^2)' = (1 + rho^2) beta``, ``u' = (rho^2)'/rho_T^2``;
        ``a' = (alpha/alpha_T)(u' - beta u/2)``, ``b' = -alpha (beta (1-u)/2 + u')``,
        ``c' = -beta c/2 + alpha v'/(2 sqrt v)`` with ``v = rho^2 (1-u)``, ``v' = (rho^2)' (1 - 2u)``.
        ``c'`` is infinite where ``c = 0`` (t = t_max); callers evaluate it inside the interval.
        """
        t, alpha_t, rho2_t, alphabar_t, frac = self._ends(t)
        beta = self._beta(t)
        drho2 = (1.0 + rho2_t) * beta
        dfrac = drho2 / self._rho2_T
        dcoef_xT = alphabar_t * (dfrac - 0.5 * beta * frac)
        dcoef_x0 = -alpha_t * (0.5 * beta * (1.0 - frac) + dfrac)
        v = rho2_t * (1.0 - frac)
        dstd = -0.5 * beta * alpha_t * torch.sqrt(v) + alpha_t * drho2 * (1.0 - 2.0 * frac) / (2.0 * torch.sqrt(v))
        return dcoef_x0, dcoef_xT, dstd

    def posterior(self, s: torch.Tensor, t: torch.Tensor) -> Coefs:
        """Step t to s < t: ``(coef_x0, coef_xt, std)`` from ``alpha`` and ``rho`` (MATH.md 3)."""
        s, t = self._t(s), self._t(t)
        return alpha_rho_posterior(self.alpha(s), self.rho2(s), self.alpha(t), self.rho2(t))

    def precond(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDBM preconditioning ``(c_skip, c_out, c_in, c_noise)`` (MATH.md 2b; DDBM/DBIM
        ``get_scalings_and_weightings``), with ``sigma_d = sigma_data`` at both ends and ``cov_xy``.

        ``A = a^2 sigma_d^2 + b^2 sigma_d^2 + 2 a b cov_xy + c^2``, ``c_in = A^-1/2``,
        ``c_skip = (b sigma_d^2 + a cov_xy) / A``,
        ``c_out = sqrt(a^2 (sigma_d^4 - cov_xy^2) + sigma_d^2 c^2) c_in``; the denoiser is
        ``x0_hat = c_skip x_t + c_out F(c_in x_t, c_noise)``. ``c_noise`` is ``net_time(t)``.
        """
        coef_x0, coef_xT, std = self.marginal(t)
        sd2, cov = self.sigma_data**2, self.cov_xy
        A = coef_xT**2 * sd2 + coef_x0**2 * sd2 + 2.0 * coef_xT * coef_x0 * cov + std**2
        c_in = torch.rsqrt(A)
        c_skip = (coef_x0 * sd2 + coef_xT * cov) / A
        c_out = torch.sqrt(coef_xT**2 * (sd2 * sd2 - cov**2) + sd2 * std**2) * c_in
        return c_skip, c_out, c_in, self.net_time(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``lambda(t) = 1 / c_out^2`` (MATH.md 2b, 4), float64 ``[B]``: unit weight on the raw network output."""
        return 1.0 / self.precond(t)[1] ** 2

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """DDBM's ``c_noise = 1000 * 0.25 * log(t + 1e-44)`` (MATH.md 2b), float32 on t's device."""
        return (250.0 * torch.log(self._t(t) + 1e-44)).float()

    def sample_t(
        self, batch: int, rng: Optional[torch.Generator] = None, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """Times uniform in ``[t_min, t_max]`` (MATH.md 4), float64 ``[batch]``."""
        u = torch.rand((batch,), generator=rng, dtype=torch.float64, device=_draw_device(rng, device))
        t = self.t_min + (self.t_max - self.t_min) * u
        return t.to(device) if device is not None else t

    def sampling_grid(self, nfe: int, spacing: str = "uniform", karras_rho: float = 7.0) -> torch.Tensor:
        """Ascending float64 grid of ``nfe + 1`` times from ``t_min`` to ``t_max`` (both exact).

        ``spacing="uniform"`` (default) is uniform in t, DBIM's choice for the VP bridge: unlike
        a diffusion from noise, the bridge's hard part is not concentrated near t = 0, and with
        few steps uniform spacing keeps the first (largest) steps short. ``"karras"`` is the
        ``(t_max^(1/rho) + i/n (t_min^(1/rho) - t_max^(1/rho)))^rho`` spacing DDBM's Heun
        sampler uses. Samplers call the network at the last ``nfe`` points, from t_max down, and
        return the last prediction; ``t_min`` is where they end.
        """
        if nfe < 1:
            raise ValueError(f"nfe must be at least 1, got {nfe}")
        ramp = torch.linspace(0.0, 1.0, nfe + 1, dtype=torch.float64)
        if spacing == "uniform":
            grid = self.t_min + (self.t_max - self.t_min) * ramp
        elif spacing == "karras":
            lo, hi = self.t_min ** (1.0 / karras_rho), self.t_max ** (1.0 / karras_rho)
            grid = (lo + ramp * (hi - lo)) ** karras_rho
        else:
            raise ValueError(f"spacing must be 'uniform' or 'karras', got {spacing!r}")
        grid[0], grid[-1] = self.t_min, self.t_max
        return grid

    def config(self) -> dict:
        return {
            "type": "vp",
            "beta_min": self.beta_min,
            "beta_d": self.beta_d,
            "t_min": self.t_min,
            "t_max": self.t_max,
            **self._precond_config(),
        }


# ----------------------------------------------------------------------------
# DDBM VE (MATH.md 2c: alpha = 1, rho_t = t)


class VEBridge(VPBridge):
    """DDBM's VE bridge (Zhou et al. 2024): ``alpha_t = 1``, ``rho_t = t``, t in ``[sigma_min, sigma_max]``.

    Marginal (MATH.md 2c): ``a_t = t^2/T^2``, ``b_t = 1 - t^2/T^2``,
    ``c_t = t sqrt(1 - t^2/T^2)`` with ``T = sigma_max``; posterior (MATH.md 3) with
    ``rho_s^2/rho_t^2 = s^2/t^2``. Everything built from ``alpha`` and ``rho^2`` (posterior,
    DDBM preconditioning, loss weight, ``c_noise = 250 log t``, grids, the probability-flow ODE)
    is ``VPBridge``'s; only the schedule differs. ``t_min``/``t_max`` are the sigma range.
    """

    def __init__(self, sigma_max: float = 80.0, sigma_min: float = 0.002, sigma_data: float = 0.5, cov_xy: float = 0.0):
        self._set_precond(sigma_data, cov_xy)
        _check_finite(sigma_min=sigma_min, sigma_max=sigma_max)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_max, self.sigma_min = float(sigma_max), float(sigma_min)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max
        self.T = self.t_max
        self._rho2_T = self.sigma_max**2

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_t = 1`` (float64)."""
        return torch.ones_like(self._t(t))

    def rho2(self, t: torch.Tensor) -> torch.Tensor:
        """``rho_t^2 = t^2`` (float64)."""
        return self._t(t) ** 2

    def _ends(self, t):
        """``t``, ``alpha_t = 1``, ``rho_t^2 = t^2``, ``alphabar_t = 1`` and ``u = t^2/T^2`` (exactly 1 at T)."""
        t = self._t(t)
        one = torch.ones_like(t)
        frac = torch.where(t >= self.t_max, one, (t**2 / self._rho2_T).clamp(0.0, 1.0))
        return t, one, t**2, one, frac

    def marginal_dt(self, t: torch.Tensor) -> Coefs:
        """``(db/dt, da/dt, dc/dt)``: ``a' = 2t/T^2``, ``b' = -2t/T^2``, ``c' = (1 - 2u)/sqrt(1 - u)``, u = t^2/T^2.

        ``c'`` is infinite at t = T; callers evaluate it inside the interval.
        """
        t, _, _, _, frac = self._ends(t)
        da = 2.0 * t / self._rho2_T
        return -da, da, (1.0 - 2.0 * frac) / torch.sqrt(1.0 - frac)

    def config(self) -> dict:
        return {"type": "ve", "sigma_max": self.sigma_max, "sigma_min": self.sigma_min, **self._precond_config()}


_BRIDGES = {"i2sb": I2SBBridge, "vp": VPBridge, "ve": VEBridge}


def bridge_from_config(config: dict) -> Bridge:
    """Rebuild a bridge from its ``config()`` (e.g. read from checkpoint metadata)."""
    kwargs = dict(config)
    kind = kwargs.pop("type", None)
    if kind not in _BRIDGES:
        raise ValueError(f"unknown bridge type {kind!r}; expected one of {sorted(_BRIDGES)}")
    return _BRIDGES[kind](**kwargs)
