"""The fused ops: typed wrappers over ``torch.ops.ibmd.*``.

One schema (``csrc/ops.cpp``), three implementations: the C++ CPU kernels, the
CUDA kernels, and ``ibmd_fast.reference`` (pure PyTorch). Each call takes the
compiled kernel when the extension is loaded and has a kernel for the tensors'
device (a CPU-only build has none for CUDA tensors), and the reference
otherwise, with one warning per device; ``backend(device)`` says which. The
extension is not loaded when it fails to import or was built against another
torch than the one running (one warning saying what to run);
``IBMD_FAST_DISABLE_EXT=1`` forces the reference everywhere.

The ops are registered with ``register_fake`` and ``register_autograd`` (each
backward is an op of its own), so they work under autograd,
``torch.compile(fullgraph=True)`` and ``torch.export``.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch

from ibmd_fast import reference
from ibmd_fast.reference import NO_NOISE_SEED, opmath_dtype

Coef = Union[float, torch.Tensor]

__all__ = ["bridge_step", "bridge_loss", "ibmd_loss", "backend", "has_cuda_kernels", "draw_seed"]

_REBUILD = (
    "rebuild it against the torch that runs: `pip install --no-build-isolation .` "
    "(or `python setup.py build_ext --inplace` in a checkout)"
)


def _torch_release(version) -> str:
    """``"2.13.0"`` of ``"2.13.0+cu130"``: the part that fixes the C++ ABI of torch's headers."""
    return str(version).split("+")[0]


def _load_extension():
    """``(module, None)``, or ``(None, reason)`` after one warning saying what is wrong and what to run."""
    if os.environ.get("IBMD_FAST_DISABLE_EXT", "0") not in ("", "0"):
        return None, "disabled by IBMD_FAST_DISABLE_EXT"
    try:
        from ibmd_fast import _C as module  # optional: the compiled extension may be missing (then the reference)
    except ImportError as exc:  # pragma: no cover - depends on the install
        text = f"{type(exc).__name__}: {exc}"
        if "undefined symbol" in str(exc) or "symbol not found" in str(exc).lower():
            advice = (
                f"it was built against another torch than the installed {torch.__version__} (ABI mismatch); {_REBUILD}"
            )
        else:
            advice = "install with `pip install --no-build-isolation .` to build it"
        warnings.warn(
            f"ibmd_fast: the compiled extension ibmd_fast._C is not available ({text}): {advice}; "
            "using the pure-PyTorch reference ops, which are slower.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, text
    built = getattr(module, "TORCH_VERSION", None)
    if built is not None and _torch_release(built) != _torch_release(torch.__version__):
        text = f"built against torch {built}, running torch {torch.__version__}"
        warnings.warn(
            f"ibmd_fast: the compiled extension ibmd_fast._C was {text}, whose C++ ABI may differ: "
            f"{_REBUILD}; using the pure-PyTorch reference ops until then.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, text
    return module, None


_ext, _ext_error = _load_extension()
_compiled_cache: dict[tuple[str, str], bool] = {}
_warned_devices: set[str] = set()


def _has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension registered a kernel of ``ibmd::op`` for ``device_type``."""
    key = (op, device_type)
    if key not in _compiled_cache:
        try:
            dispatch_key = torch._C._dispatch_key_for_device(device_type)
            found = torch._C._dispatch_has_kernel_for_dispatch_key(f"ibmd::{op}", dispatch_key)
        except RuntimeError:
            found = False
        _compiled_cache[key] = bool(found)
    return _compiled_cache[key]


_OPS = ("bridge_step", "bridge_step_backward", "bridge_loss", "bridge_loss_backward", "ibmd_loss", "ibmd_loss_backward")


def _use_compiled(op: str, x: torch.Tensor) -> bool:
    """Compiled kernel for ``x``'s device if there is one; else the reference, with one warning per device."""
    if _ext is None:
        return False
    device_type = x.device.type
    if _has_kernel(op, device_type):
        return True
    if device_type not in _warned_devices:
        _warned_devices.add(device_type)
        warnings.warn(
            f"ibmd_fast: the compiled extension has no {device_type} kernels (built "
            f"{'with' if has_cuda_kernels() else 'without'} CUDA); using the pure-PyTorch reference "
            f"ops for {device_type} tensors, which are slower.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def backend(device: Union[str, torch.device, None] = None) -> str:
    """Which implementation the ops use.

    With ``device`` (e.g. ``"cuda"``): ``"compiled-<type>"`` when the extension has kernels for
    it, else ``"reference"``. Without: ``"compiled-cpu"``, ``"compiled-cpu+cuda"`` (built with
    the CUDA kernels) or ``"reference"`` (the extension is not loaded).
    """
    if device is not None:
        device_type = torch.device(device).type
        if _ext is not None and all(_has_kernel(op, device_type) for op in _OPS):
            return f"compiled-{device_type}"
        return "reference"
    if _ext is None:
        return "reference"
    return "compiled-cpu+cuda" if has_cuda_kernels() else "compiled-cpu"


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _ext is not None and bool(getattr(_ext, "BUILT_WITH_CUDA", 0))


def draw_seed(rng: Optional[torch.Generator] = None) -> int:
    """A 62-bit seed for the in-kernel noise, drawn from ``rng`` (default: torch's default
    generator, so ``torch.manual_seed`` fixes it)."""
    device = rng.device if rng is not None else None
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=rng, device=device).item())


def _coef(value: Coef, batch: int, like: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}] (the batch), got {list(value.shape)}")
    return reference.per_sample(value, batch, like)


def _mask(mask: Optional[torch.Tensor], like: torch.Tensor, materialize: bool) -> Optional[torch.Tensor]:
    """The loss mask, checked to broadcast to the images; for the kernels, made a tensor of their
    shape, dtype and memory layout (they read it like an input). Never differentiated."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    try:
        expanded = mask.detach().to(device=like.device, dtype=like.dtype).expand_as(like)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {list(mask.shape)} does not broadcast to the images' shape "
            f"{list(like.shape)} (e.g. [B, 1, H, W] for [B, C, H, W])"
        ) from None
    if not materialize:
        return expanded
    return torch.empty_like(like).copy_(expanded)


def _batch(x: torch.Tensor, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
    return x.shape[0]


# ----------------------------------------------------------------------------
# Public wrappers


def bridge_step(
    a: torch.Tensor,
    b: torch.Tensor,
    coef_a: Coef,
    coef_b: Coef,
    std: Coef,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``coef_a * a + coef_b * b + std * eps`` (MATH.md 2 and 3), one fused pass.

    Coefficients are Python scalars or tensors of shape ``[B]``. ``eps`` is ``noise``
    when given; otherwise the kernel makes it from Philox4x32-10 keyed by ``seed`` (drawn
    from torch's default generator when None), so one seed gives one noise on CPU and
    CUDA. Differentiable in ``a`` and ``b``.
    """
    batch = _batch(a, "a")
    ca = _coef(coef_a, batch, a, "coef_a")
    cb = _coef(coef_b, batch, a, "coef_b")
    if noise is None and not isinstance(std, torch.Tensor) and float(std) == 0.0:
        seed = NO_NOISE_SEED  # deterministic step: no noise to make
    elif noise is None and seed is None:
        seed = draw_seed()
    elif noise is not None:
        seed = NO_NOISE_SEED
    elif not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    s = _coef(std, batch, a, "std")
    if not _use_compiled("bridge_step", a):
        return reference.bridge_step(a, b, ca, cb, s, noise=noise, seed=int(seed))
    return torch.ops.ibmd.bridge_step.default(a, b, ca, cb, s, noise, int(seed))


def bridge_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: Coef, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-sample bridge-matching loss ``w_b * sum_i m_bi (pred - target)_bi^2 / D`` (MATH.md 4, 6), ``[B]``.

    ``mask`` (broadcastable to ``pred``, e.g. ``[B, 1, H, W]``; None: all ones) restricts the loss to
    the elements it covers (the inpainting hole); D is all elements of a sample either way, as in
    I2SB and DDBM, so a recipe's learning rate carries over. Accumulates in float32 (float64 for
    float64 inputs) and returns that dtype. Differentiable in ``pred`` and ``target``.
    """
    w = _coef(weight, _batch(pred, "pred"), pred, "weight")
    if not _use_compiled("bridge_loss", pred):
        return reference.bridge_loss(pred, target, w, _mask(mask, pred, materialize=False))
    return torch.ops.ibmd.bridge_loss.default(pred, target, w, _mask(mask, pred, materialize=True))


def ibmd_loss(
    teacher_pred: torch.Tensor,
    fake_pred: torch.Tensor,
    x0: torch.Tensor,
    weight: Coef,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample IBMD generator loss ``w_b * sum_i m_bi [(t - x)^2 - (f - x)^2]_bi / D`` (MATH.md 5, 6).

    ``t`` the teacher's prediction, ``f`` the fake model's, ``x`` the generator's output; ``mask``
    as in ``bridge_loss``. Differentiable in all three.
    """
    w = _coef(weight, _batch(x0, "x0"), x0, "weight")
    if not _use_compiled("ibmd_loss", x0):
        return reference.ibmd_loss(teacher_pred, fake_pred, x0, w, _mask(mask, x0, materialize=False))
    return torch.ops.ibmd.ibmd_loss.default(teacher_pred, fake_pred, x0, w, _mask(mask, x0, materialize=True))


# ----------------------------------------------------------------------------
# Registration of fake (meta) kernels and autograd for the compiled ops


def _register() -> None:
    def _same(x, y, what):
        torch._check(x.shape == y.shape, lambda: f"{what}: shapes differ, {list(x.shape)} vs {list(y.shape)}")
        torch._check(x.dtype == y.dtype, lambda: f"{what}: dtypes differ, {x.dtype} vs {y.dtype}")

    def _coef_ok(c, x, name):
        torch._check(c.dim() == 1 and c.shape[0] == x.shape[0], lambda: f"{name} must have shape [B]")

    @torch.library.register_fake("ibmd::bridge_step")
    def _(a, b, coef_a, coef_b, std, noise, seed):
        _same(a, b, "bridge_step(a, b)")
        if noise is not None:
            _same(a, noise, "bridge_step(a, noise)")
        for c, n in ((coef_a, "coef_a"), (coef_b, "coef_b"), (std, "std")):
            _coef_ok(c, a, n)
        return torch.empty_like(a)

    @torch.library.register_fake("ibmd::bridge_step_backward")
    def _(grad, coef_a, coef_b):
        return torch.empty_like(grad), torch.empty_like(grad)

    @torch.library.register_fake("ibmd::bridge_loss")
    def _(pred, target, weight, mask=None):
        _same(pred, target, "bridge_loss(pred, target)")
        if mask is not None:
            _same(pred, mask, "bridge_loss(pred, mask)")
        _coef_ok(weight, pred, "weight")
        return pred.new_empty((pred.shape[0],), dtype=opmath_dtype(pred.dtype))

    @torch.library.register_fake("ibmd::bridge_loss_backward")
    def _(grad, pred, target, weight, mask=None):
        return torch.empty_like(pred), torch.empty_like(target)

    @torch.library.register_fake("ibmd::ibmd_loss")
    def _(teacher_pred, fake_pred, x0, weight, mask=None):
        _same(teacher_pred, x0, "ibmd_loss(teacher_pred, x0)")
        _same(fake_pred, x0, "ibmd_loss(fake_pred, x0)")
        if mask is not None:
            _same(mask, x0, "ibmd_loss(mask, x0)")
        _coef_ok(weight, x0, "weight")
        return x0.new_empty((x0.shape[0],), dtype=opmath_dtype(x0.dtype))

    @torch.library.register_fake("ibmd::ibmd_loss_backward")
    def _(grad, teacher_pred, fake_pred, x0, weight, mask=None):
        return torch.empty_like(teacher_pred), torch.empty_like(fake_pred), torch.empty_like(x0)

    # -- autograd: each backward calls the backward op
    def _step_setup(ctx, inputs, output):
        _, _, coef_a, coef_b, _, _, _ = inputs
        ctx.save_for_backward(coef_a, coef_b)

    def _step_backward(ctx, grad):
        coef_a, coef_b = ctx.saved_tensors
        grad_a, grad_b = torch.ops.ibmd.bridge_step_backward.default(grad, coef_a, coef_b)
        return grad_a, grad_b, None, None, None, None, None

    torch.library.register_autograd("ibmd::bridge_step", _step_backward, setup_context=_step_setup)

    # The backward is linear in grad: (coef_a g, coef_b g). Its own backward is
    # coef_a gg_a + coef_b gg_b, a noiseless bridge step (double backward).
    def _step_backward_setup(ctx, inputs, output):
        grad, coef_a, coef_b = inputs
        ctx.save_for_backward(grad, coef_a, coef_b)

    def _step_double_backward(ctx, gg_a, gg_b):
        grad, coef_a, coef_b = ctx.saved_tensors
        gg_a = torch.zeros_like(grad) if gg_a is None else gg_a
        gg_b = torch.zeros_like(grad) if gg_b is None else gg_b
        gg = torch.ops.ibmd.bridge_step.default(
            gg_a, gg_b, coef_a, coef_b, torch.zeros_like(coef_a), None, NO_NOISE_SEED
        )
        return gg, None, None

    torch.library.register_autograd(
        "ibmd::bridge_step_backward", _step_double_backward, setup_context=_step_backward_setup
    )

    def _bridge_loss_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _bridge_loss_backward(ctx, grad):
        pred, target, weight, mask = ctx.saved_tensors
        g_pred, g_target = torch.ops.ibmd.bridge_loss_backward.default(grad, pred, target, weight, mask)
        return g_pred, g_target, None, None

    torch.library.register_autograd("ibmd::bridge_loss", _bridge_loss_backward, setup_context=_bridge_loss_setup)

    def _ibmd_loss_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _ibmd_loss_backward(ctx, grad):
        teacher_pred, fake_pred, x0, weight, mask = ctx.saved_tensors
        grads = torch.ops.ibmd.ibmd_loss_backward.default(grad, teacher_pred, fake_pred, x0, weight, mask)
        return (*grads, None, None)

    torch.library.register_autograd("ibmd::ibmd_loss", _ibmd_loss_backward, setup_context=_ibmd_loss_setup)


if _ext is not None:
    _register()  # (register_fake also gives the ops their Meta kernels)
    # Filled now, so that torch.compile traces dictionary reads, not dispatcher queries.
    for _op in _OPS:
        for _device_type in ("cpu", "cuda", "meta"):
            _has_kernel(_op, _device_type)
