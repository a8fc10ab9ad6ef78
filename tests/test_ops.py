"""The fused ops against the pure-PyTorch reference and float64 oracles, per device and dtype.

Low-precision tolerances follow flash-attention's rule: the op's error against a
float64 reference is at most twice the error of plain PyTorch in the same dtype
(plus a tiny absolute slack for cases where plain PyTorch happens to be exact).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ibmd_fast import ops, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
compiled = pytest.mark.skipif(ops.backend() == "reference", reason="needs the compiled extension")


def _device_param(device):
    return pytest.param(device, marks=pytest.mark.cuda) if device == "cuda" else device


DEVICE_PARAMS = [_device_param(d) for d in DEVICES]


def _inputs(shape, dtype, device, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(n)]


def _coefs(batch, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, generator=g, dtype=torch.float64).to(device) + 0.1 for _ in range(3)]


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def _assert_within_2x_baseline(out, baseline, ref64, what):
    err, base = _max_err(out, ref64), _max_err(baseline, ref64)
    assert err <= 2 * base + 1e-6, f"{what}: error {err:.3g} exceeds 2x plain PyTorch's {base:.3g}"


def _bcast(c, like):
    return c.view(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------
# bridge_step


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["noise", "seed", "deterministic"])
def test_bridge_step_matches_reference(device, dtype, mode):
    a, b, noise = _inputs((4, 3, 8, 12), dtype, device, 3)
    ca, cb, sd = _coefs(4, device)
    kwargs = {"noise": noise} if mode == "noise" else {"seed": 1234} if mode == "seed" else {}
    std = 0.0 if mode == "deterministic" else sd
    out = ops.bridge_step(a, b, ca, cb, std, **kwargs)
    ref = reference.bridge_step(
        a,
        b,
        ca,
        cb,
        std if mode != "deterministic" else torch.zeros_like(sd),
        seed=kwargs.get("seed", reference.NO_NOISE_SEED),
        noise=kwargs.get("noise"),
    )
    assert out.dtype == dtype and out.shape == a.shape and out.device == a.device
    # Same arithmetic as the reference: at most one rounding of the output dtype apart.
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    # The kernels' float32 Box-Muller is within 1e-6 of the reference's float64 one.
    noise_tol = 1e-6 * sd.max().item() if mode == "seed" else 0.0
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol + noise_tol)
    # Against float64 math: no worse than plain PyTorch in this dtype.
    eps = noise if mode == "noise" else reference.philox_normal(tuple(a.shape), 1234, device=device).to(dtype)
    s = std if mode != "deterministic" else torch.zeros_like(sd)
    ref64 = _bcast(ca, a) * a.double() + _bcast(cb, a) * b.double() + _bcast(s, a) * eps.double()
    plain = _bcast(ca.to(dtype), a) * a + _bcast(cb.to(dtype), a) * b + _bcast(s.to(dtype), a) * eps
    err, base = _max_err(out, ref64), _max_err(plain, ref64)
    assert err <= 2 * base + 1e-6 + noise_tol, f"bridge_step {dtype}: error {err:.3g} vs plain PyTorch {base:.3g}"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bridge_step_gradients_match_reference(device, dtype):
    a, b, up = _inputs((3, 2, 4, 8), dtype, device, 3, seed=5)
    ca, cb, sd = _coefs(3, device, seed=6)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = ops.bridge_step(a1, b1, ca, cb, sd, seed=9)
    ga, gb = torch.autograd.grad(out, (a1, b1), up)
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ra, rb = torch.autograd.grad(reference.bridge_step(a2, b2, ca, cb, sd, seed=9), (a2, b2), up)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(ga, ra, rtol=tol, atol=tol)
    torch.testing.assert_close(gb, rb, rtol=tol, atol=tol)
    assert ga.dtype == dtype


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_bridge_step_scalar_coefficients(device):
    a, b = _inputs((2, 5), torch.float32, device, 2)
    out = ops.bridge_step(a, b, 0.25, torch.tensor(0.5), 0.0)
    torch.testing.assert_close(out, 0.25 * a + 0.5 * b)


# ---------------------------------------------------------------------------
# losses


def _loss_cases(dtype, device, seed=0):
    p, t, f = _inputs((4, 3, 8, 8), dtype, device, 3, seed=seed)
    w = _coefs(4, device, seed=seed + 1)[0]
    return p, t, f, w


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_match_reference_and_float64(device, dtype):
    p, t, f, w = _loss_cases(dtype, device)
    out = ops.bridge_loss(p, t, w)
    assert out.shape == (4,) and out.dtype == reference.opmath_dtype(dtype)
    torch.testing.assert_close(out, reference.bridge_loss(p, t, w), rtol=1e-5, atol=1e-6)
    ref64 = w * ((p.double() - t.double()) ** 2).flatten(1).mean(1)
    plain = w.to(dtype) * ((p - t) ** 2).flatten(1).mean(1)
    _assert_within_2x_baseline(out, plain, ref64, f"bridge_loss {dtype}")

    out = ops.ibmd_loss(t, f, p, w)  # teacher t, fake f, generator output p
    torch.testing.assert_close(out, reference.ibmd_loss(t, f, p, w), rtol=1e-5, atol=1e-6)
    ref64 = w * ((t.double() - p.double()) ** 2 - (f.double() - p.double()) ** 2).flatten(1).mean(1)
    plain = w.to(dtype) * ((t - p) ** 2 - (f - p) ** 2).flatten(1).mean(1)
    _assert_within_2x_baseline(out, plain, ref64, f"ibmd_loss {dtype}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_gradients_match_reference(device, dtype):
    p, t, f, w = _loss_cases(dtype, device, seed=3)
    up = torch.rand(4, dtype=reference.opmath_dtype(dtype), device=device)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

    def grads(fn, *xs):
        xs = [x.clone().requires_grad_() for x in xs]
        return torch.autograd.grad(fn(*xs), xs, up)

    for got, want in zip(
        grads(lambda a, b: ops.bridge_loss(a, b, w), p, t), grads(lambda a, b: reference.bridge_loss(a, b, w), p, t)
    ):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * 1e-2)
    for got, want in zip(
        grads(lambda a, b, c: ops.ibmd_loss(a, b, c, w), t, f, p),
        grads(lambda a, b, c: reference.ibmd_loss(a, b, c, w), t, f, p),
    ):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_loss_gradients_closed_form(device):
    """MATH.md 6: dL/dx = 2w(f - t)/D, dL/dt = 2w(t - x)/D, dL/df = -2w(f - x)/D."""
    p, t, f, w = _loss_cases(torch.float64, device, seed=4)
    x, t, f = (v.clone().requires_grad_() for v in (p, t, f))
    ops.ibmd_loss(t, f, x, w).sum().backward()
    d = x[0].numel()
    k = 2 * w.view(-1, 1, 1, 1) / d
    torch.testing.assert_close(x.grad, k * (f - t).detach())
    torch.testing.assert_close(t.grad, k * (t - x).detach())
    torch.testing.assert_close(f.grad, -k * (f - x).detach())


MASK_SHAPES = [(4, 1, 8, 8), (4, 3, 8, 8), (1, 1, 8, 8)]


def _mask(shape, device, dtype=torch.float32, seed=21):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.4).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
def test_masked_losses_match_reference_and_float64(device, dtype, mask_shape):
    """w_b * sum_i m_bi (...)_bi / D, D all elements of a sample (I2SB / DDBM inpainting)."""
    p, t, f, w = _loss_cases(dtype, device, seed=5)
    m = _mask(mask_shape, device)
    m64 = m.double().expand(p.shape)
    out = ops.bridge_loss(p, t, w, mask=m)
    torch.testing.assert_close(out, reference.bridge_loss(p, t, w, m), rtol=1e-5, atol=1e-6)
    ref64 = w * (m64 * (p.double() - t.double()) ** 2).flatten(1).sum(1) / p[0].numel()
    plain = w.to(dtype) * (m.to(dtype) * (p - t) ** 2).flatten(1).mean(1)
    _assert_within_2x_baseline(out, plain, ref64, f"masked bridge_loss {dtype}")

    out = ops.ibmd_loss(t, f, p, w, mask=m)
    torch.testing.assert_close(out, reference.ibmd_loss(t, f, p, w, m), rtol=1e-5, atol=1e-6)
    ref64 = w * (m64 * ((t.double() - p.double()) ** 2 - (f.double() - p.double()) ** 2)).flatten(1).sum(1)
    ref64 = ref64 / p[0].numel()
    plain = w.to(dtype) * (m.to(dtype) * ((t - p) ** 2 - (f - p) ** 2)).flatten(1).mean(1)
    _assert_within_2x_baseline(out, plain, ref64, f"masked ibmd_loss {dtype}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_loss_gradients_match_reference(device, dtype):
    p, t, f, w = _loss_cases(dtype, device, seed=6)
    m = _mask((4, 1, 8, 8), device, dtype=torch.bool)  # any dtype: made the inputs' dtype
    up = torch.rand(4, dtype=reference.opmath_dtype(dtype), device=device)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

    def grads(fn, *xs):
        xs = [x.clone().requires_grad_() for x in xs]
        return torch.autograd.grad(fn(*xs), xs, up)

    for got, want in zip(
        grads(lambda a, b: ops.bridge_loss(a, b, w, mask=m), p, t),
        grads(lambda a, b: reference.bridge_loss(a, b, w, m), p, t),
    ):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * 1e-2)
    for got, want in zip(
        grads(lambda a, b, c: ops.ibmd_loss(a, b, c, w, mask=m), t, f, p),
        grads(lambda a, b, c: reference.ibmd_loss(a, b, c, w, m), t, f, p),
    ):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_masked_loss_gradients_closed_form(device):
    """MATH.md 6 times the mask: nothing at all reaches the unmasked elements."""
    p, t, f, w = _loss_cases(torch.float64, device, seed=7)
    m = _mask((4, 1, 8, 8), device, torch.float64)
    x, t, f = (v.clone().requires_grad_() for v in (p, t, f))
    ops.ibmd_loss(t, f, x, w, mask=m).sum().backward()
    k = 2 * w.view(-1, 1, 1, 1) * m / x[0].numel()
    torch.testing.assert_close(x.grad, k * (f - t).detach())
    torch.testing.assert_close(t.grad, k * (t - x).detach())
    torch.testing.assert_close(f.grad, -k * (f - x).detach())
    assert torch.all(x.grad[(m == 0).expand_as(x)] == 0)
    pred = p.clone().requires_grad_()
    ops.bridge_loss(pred, t.detach(), w, mask=m).sum().backward()
    torch.testing.assert_close(pred.grad, k * (p - t.detach()))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_masked_losses_ignore_unmasked_values(device):
    """Changing the inputs where the mask is 0 changes neither the losses nor their gradients."""
    p, t, f, w = _loss_cases(torch.float32, device, seed=9)
    m = _mask((4, 1, 8, 8), device)
    garbage = 100 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(device) * (1 - m)
    for t_in in (t, t + garbage):
        tt = t_in.clone().requires_grad_()
        x = p.clone().requires_grad_()
        loss = ops.ibmd_loss(tt, f, x, w, mask=m)
        loss.sum().backward()
        if t_in is t:
            first = (loss.detach(), x.grad)
        else:
            torch.testing.assert_close(loss.detach(), first[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(x.grad, first[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_mask_that_does_not_broadcast_is_one_clear_error(device):
    p, t, f, w = _loss_cases(torch.float32, device)
    with pytest.raises(ValueError, match=r"mask of shape \[4, 2, 8, 8\] does not broadcast"):
        ops.bridge_loss(p, t, w, mask=torch.ones(4, 2, 8, 8, device=device))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        ops.ibmd_loss(t, f, p, w, mask=1.0)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_losses_are_deterministic(device):
    p, t, f, w = _loss_cases(torch.float32, device, seed=8)
    big = [v.repeat(1, 8, 16, 16) for v in (p, t, f)]  # several chunks per sample
    first = ops.ibmd_loss(*big, w)
    for _ in range(3):
        assert torch.equal(ops.ibmd_loss(*big, w), first)


# ---------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_gradcheck_float64(device):
    a, b, c = (x.requires_grad_() for x in _inputs((2, 3, 4, 4), torch.float64, device, 3, seed=11))
    ca, cb, sd = _coefs(2, device, seed=12)
    assert torch.autograd.gradcheck(lambda x, y: ops.bridge_step(x, y, ca, cb, sd, seed=4), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: ops.bridge_loss(x, y, ca), (a, b))
    assert torch.autograd.gradcheck(lambda x, y, z: ops.ibmd_loss(x, y, z, ca), (a, b, c))
    m = _mask((2, 1, 4, 4), device, torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: ops.bridge_loss(x, y, ca, mask=m), (a, b))
    assert torch.autograd.gradcheck(lambda x, y, z: ops.ibmd_loss(x, y, z, ca, mask=m), (a, b, c))
    assert torch.autograd.gradgradcheck(lambda x, y: ops.bridge_step(x, y, ca, cb, sd, seed=4), (a, b))


@compiled
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    a, b, c, noise = _inputs((2, 3, 4, 4), dtype, device, 4, seed=13)
    opm = reference.opmath_dtype(dtype)
    ca, cb, sd = (x.to(opm) for x in _coefs(2, device, seed=14))
    grad = torch.rand(2, dtype=opm, device=device)
    mask = _mask((2, 3, 4, 4), device, dtype)  # the kernels take it in the inputs' shape and dtype
    req = lambda *xs: [x.clone().requires_grad_() for x in xs]  # noqa: E731
    cases = [
        (torch.ops.ibmd.bridge_step.default, (*req(a, b), ca, cb, sd, None, 77)),
        (torch.ops.ibmd.bridge_step.default, (*req(a, b), ca, cb, sd, noise, -1)),
        (torch.ops.ibmd.bridge_step_backward.default, (a, ca, cb)),
        (torch.ops.ibmd.bridge_loss.default, (*req(a, b), ca)),
        (torch.ops.ibmd.bridge_loss_backward.default, (grad, a, b, ca)),
        (torch.ops.ibmd.ibmd_loss.default, (*req(a, b, c), ca)),
        (torch.ops.ibmd.ibmd_loss_backward.default, (grad, a, b, c, ca)),
        (torch.ops.ibmd.bridge_loss.default, (*req(a, b), ca, mask)),
        (torch.ops.ibmd.bridge_loss_backward.default, (grad, a, b, ca, mask)),
        (torch.ops.ibmd.ibmd_loss.default, (*req(a, b, c), ca, mask)),
        (torch.ops.ibmd.ibmd_loss_backward.default, (grad, a, b, c, ca, mask)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@compiled
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_torch_compile_fullgraph(device):
    a, b, x0 = _inputs((2, 3, 8, 8), torch.float32, device, 3, seed=15)
    ca, cb, sd = (c.float() for c in _coefs(2, device, seed=16))
    mask = _mask((2, 1, 8, 8), device)

    def step(a, b, x0):
        x_t = ops.bridge_step(a, b, ca, cb, sd, seed=21)
        return (
            ops.bridge_loss(x_t, x0, ca).sum()
            + ops.ibmd_loss(x_t, b, a, cb).sum()
            + ops.bridge_loss(x_t, x0, cb, mask=mask).sum()
            + ops.ibmd_loss(x_t, b, a, ca, mask=mask).sum()
        )

    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (a, b, x0)]
    eager_args = [t.clone().requires_grad_() for t in (a, b, x0)]
    out, eager = compiled_step(*args), step(*eager_args)
    torch.testing.assert_close(out, eager)
    out.backward()
    eager.backward()
    for got, want in zip(args, eager_args):
        torch.testing.assert_close(got.grad, want.grad)


# ---------------------------------------------------------------------------
# Philox noise


def test_numpy_philox_known_answers():
    """Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        got = reference.philox4x32_10_numpy(np.array([counter], dtype=np.uint32), key)[0]
        assert tuple(int(v) for v in got) == want


@compiled
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_kernel_philox_bit_exact(device):
    g = torch.Generator().manual_seed(0)
    groups = torch.cat([torch.arange(64), torch.randint(0, 2**62, (256,), generator=g)]).to(device)
    for seed in (0, 1, 2**40 + 12345, 2**62 + 7):
        words = torch.ops.ibmd.philox(groups, seed).cpu().numpy().astype(np.uint64)
        counters = np.zeros((groups.numel(), 4), dtype=np.uint64)
        gc = groups.cpu().numpy().astype(np.uint64)
        counters[:, 0], counters[:, 1] = gc & 0xFFFFFFFF, gc >> np.uint64(32)
        want = reference.philox4x32_10_numpy(counters.astype(np.uint32), reference.seed_key(seed))
        np.testing.assert_array_equal(words.astype(np.uint32), want)
        # and the torch implementation the fallback uses
        np.testing.assert_array_equal(reference.philox_words(64, seed).numpy().astype(np.uint32), want[:64])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_philox_normals_match_python(device):
    n = 1 << 20
    z = torch.zeros(1, n, device=device)
    eps = ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=2024)
    want = reference.philox_normal((1, n), 2024, dtype=torch.float64)
    assert _max_err(eps.cpu(), want) < 1e-6


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_philox_noise_statistics(device):
    n = 10**6
    z = torch.zeros(4, n // 4, device=device)
    eps = ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=99).double().flatten()
    se = 1 / n**0.5
    assert abs(eps.mean().item()) < 5 * se
    assert abs(eps.var().item() - 1) < 5 * (2**0.5) * se
    assert abs((eps**3).mean().item()) < 5 * (15**0.5) * se  # skewness
    assert abs((eps**4).mean().item() - 3) < 5 * (96**0.5) * se  # kurtosis
    # tails: P(|eps| > 3) = 0.0026998
    tail = (eps.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * (0.0027 / n) ** 0.5
    # neighbours (same Philox call and across calls) are uncorrelated
    for lag in (1, 2, 3, 4, 5):
        assert abs((eps[:-lag] * eps[lag:]).mean().item()) < 5 * se


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_seed_semantics(device):
    z = torch.zeros(2, 3, 8, 8, device=device)
    e1 = ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=5)
    assert torch.equal(e1, ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=5))
    assert not torch.equal(e1, ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=6))
    torch.manual_seed(3)
    d1 = ops.bridge_step(z, z, 0.0, 0.0, 1.0)
    d2 = ops.bridge_step(z, z, 0.0, 0.0, 1.0)
    torch.manual_seed(3)
    assert torch.equal(d1, ops.bridge_step(z, z, 0.0, 0.0, 1.0))
    assert not torch.equal(d1, d2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4, 3, 64, 64), (3, 5, 7, 9), (2, 1000003)])
def test_same_noise_on_cpu_and_cuda(shape):
    z = torch.zeros(shape)
    cpu = ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=31337)
    gpu = ops.bridge_step(z.cuda(), z.cuda(), 0.0, 0.0, 1.0, seed=31337).cpu()
    assert _max_err(cpu, gpu) < 1e-6
    zc = z.cuda().to(memory_format=torch.channels_last) if len(shape) == 4 else z.cuda()
    assert _max_err(cpu, ops.bridge_step(zc, zc, 0.0, 0.0, 1.0, seed=31337).cpu()) < 1e-6


# ---------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("width", [8, 6])  # channels_last fast path needs W % 4 == 0
def test_channels_last_and_strided_inputs(device, width):
    a, b, noise, t, f = _inputs((3, 5, 4, width), torch.float32, device, 5, seed=17)
    ca, cb, sd = (c.float() for c in _coefs(3, device, seed=18))
    want = ops.bridge_step(a, b, ca, cb, sd, seed=42)
    variants = {
        "channels_last": lambda x: x.to(memory_format=torch.channels_last),
        "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": lambda x: torch.cat([x, x], dim=3)[..., :width],  # a strided view
    }
    for name, make in variants.items():
        xa, xb = make(a), make(b)
        got = ops.bridge_step(xa, xb, ca, cb, sd, seed=42)
        assert torch.equal(got, want), name  # the noise follows the logical index, not memory
        if name == "channels_last":
            assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(
            ops.bridge_step(xa, xb, ca, cb, sd, noise=make(noise)), ops.bridge_step(a, b, ca, cb, sd, noise=noise)
        )
        torch.testing.assert_close(ops.bridge_loss(xa, make(t), ca), ops.bridge_loss(a, t, ca))
        torch.testing.assert_close(ops.ibmd_loss(make(t), make(f), xa, ca), ops.ibmd_loss(t, f, a, ca))
        xa_, xt_ = xa.clone().requires_grad_(), make(t).requires_grad_()
        ops.bridge_loss(xa_, xt_, ca).sum().backward()
        a_, t_ = a.clone().requires_grad_(), t.clone().requires_grad_()
        ops.bridge_loss(a_, t_, ca).sum().backward()
        torch.testing.assert_close(xa_.grad, a_.grad)
        torch.testing.assert_close(xt_.grad, t_.grad)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_odd_sizes_and_offsets(device):
    """D not a multiple of 4 (Philox groups straddle samples) and a misaligned storage offset."""
    base = _inputs((3 * 7 * 5 + 1,), torch.float32, device, 1, seed=19)[0]
    a = base[1:].view(3, 7, 5)  # misaligned for vector loads
    b = _inputs((3, 7, 5), torch.float32, device, 1, seed=20)[0]
    ca, cb, sd = (c.float() for c in _coefs(3, device, seed=21))
    got = ops.bridge_step(a, b, ca, cb, sd, seed=8)
    torch.testing.assert_close(got, reference.bridge_step(a, b, ca, cb, sd, seed=8))
    torch.testing.assert_close(ops.bridge_loss(a, b, ca), reference.bridge_loss(a, b, ca))


# ---------------------------------------------------------------------------
# bad input


@compiled
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_bad_inputs_name_the_tensor(device):
    a, b = _inputs((2, 3, 4, 4), torch.float32, device, 2)
    ca, cb, sd = (c.float() for c in _coefs(2, device))
    cases = [
        (lambda: ops.bridge_step(a, b[:, :2], ca, cb, sd, seed=1), r"b must have the shape of a"),
        (lambda: ops.bridge_step(a, b.double(), ca, cb, sd, seed=1), r"b has dtype Double but a has Float"),
        (lambda: ops.bridge_step(a, b, ca, cb, sd, noise=b[:1]), r"noise must have the shape of a"),
        (lambda: ops.bridge_step(a.int(), b.int(), ca, cb, sd, seed=1), r"a must be float64, float32"),
        (lambda: ops.bridge_step(a, b, ca[:1], cb, sd, seed=1), r"coef_a must be a scalar or have shape \[2\]"),
        (lambda: torch.ops.ibmd.bridge_step(a, b, ca, cb[:1], sd, None, 1), r"coef_b must have shape \[2\]"),
        (lambda: torch.ops.ibmd.bridge_step(a, b, ca, cb, sd.double(), None, 1), r"std must be Float"),
        (lambda: torch.ops.ibmd.bridge_step(a, b, ca, cb, sd, None, -5), r"seed must be in"),
        (lambda: ops.bridge_step(a, b, ca, cb, sd, seed=-3), r"seed must be in"),
        (lambda: ops.bridge_loss(a, b[..., :2], ca), r"target must have the shape of pred"),
        (lambda: ops.bridge_loss(a, b, torch.ones(3)), r"weight must be a scalar or have shape \[2\]"),
        (lambda: ops.ibmd_loss(a, b[:1], a, ca), r"fake_pred must have the shape of x0"),
        (lambda: ops.ibmd_loss(a.half(), b, a, ca), r"teacher_pred has dtype Half but x0 has Float"),
        (lambda: ops.bridge_loss(torch.tensor(1.0), torch.tensor(1.0), 1.0), r"batch dimension"),
    ]
    if device == "cuda":
        cases.append((lambda: ops.bridge_step(a, b.cpu(), ca, cb, sd, seed=1), r"b is on cpu but a is on cuda"))
    for fn, pattern in cases:
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            fn()


# ---------------------------------------------------------------------------
# backends


def _run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_reference_backend_forced_and_consistent():
    """IBMD_FAST_DISABLE_EXT=1 forces the reference, whose noise equals the kernels' for a seed."""
    code = (
        "import torch, ibmd_fast.ops as o\n"
        "print(o.backend())\n"
        "z = torch.zeros(2, 3, 5, 7)\n"
        "torch.save(o.bridge_step(z, z, 0.0, 0.0, 1.0, seed=77), 'ref_noise.pt')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        env={**os.environ, "IBMD_FAST_DISABLE_EXT": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"
    ref = torch.load("ref_noise.pt", weights_only=True)
    os.remove("ref_noise.pt")
    z = torch.zeros(2, 3, 5, 7)
    assert _max_err(ops.bridge_step(z, z, 0.0, 0.0, 1.0, seed=77), ref) < 1e-6


@compiled
def test_backend_reports_compiled():
    assert ops.backend().startswith("compiled-cpu")
    assert ops.has_cuda_kernels() == ops.backend().endswith("+cuda")
    assert ops.backend("cpu") == "compiled-cpu" and ops.backend(torch.device("cpu")) == "compiled-cpu"
    assert ops.backend("cuda") == ("compiled-cuda" if ops.has_cuda_kernels() else "reference")
    assert ops.backend("meta") == "compiled-meta"  # register_fake gives every op a Meta kernel


# A device without kernels: tensors on "privateuseone" whose data lives in CPU tensors, and a
# dispatch mode that makes the factory functions asked for that device build them. An ibmd op
# called on them raises what the dispatcher raises for a backend without a kernel (the crash of a
# CPU-only build on CUDA tensors).
STUB_DEVICE = r"""
import types, warnings, torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

torch._register_device_module("privateuseone", types.ModuleType("stub_backend"))
STUB = torch.device("privateuseone", 0)


def _to_cpu(x):
    if isinstance(x, Stub):
        return x.inner
    if isinstance(x, torch.device) and x.type == "privateuseone":
        return torch.device("cpu")
    return x


def _run(func, args, kwargs):
    if func.namespace == "ibmd":  # what the dispatcher does for a backend without a kernel
        raise NotImplementedError(f"Could not run '{func}' with arguments from the 'PrivateUse1' backend")
    out = func(*pytree.tree_map(_to_cpu, args), **pytree.tree_map(_to_cpu, kwargs))
    return pytree.tree_map(lambda x: Stub(x) if type(x) is torch.Tensor else x, out)


class Stub(torch.Tensor):
    '''A tensor on 'privateuseone' whose data lives in a CPU tensor.'''

    @staticmethod
    def __new__(cls, inner):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                device=STUB)
        r.inner = inner
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class StubDevice(TorchDispatchMode):
    '''Factory functions asked for 'privateuseone' make Stub tensors.'''

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})
"""


@compiled
def test_device_without_kernels_takes_the_reference_with_one_warning():
    code = STUB_DEVICE + (
        "import ibmd_fast.ops as o\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a, b, c = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))\n"
        "m = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()\n"
        "w = torch.rand(2, generator=g)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    with StubDevice():\n"
        "        sa, sb, sc, sm, sw = (Stub(x) for x in (a, b, c, m, w))\n"
        "        try:\n"
        "            torch.ops.ibmd.bridge_loss.default(sa, sb, sw, None)\n"
        "            raise SystemExit('the stub device has a kernel')\n"
        "        except NotImplementedError:\n"
        "            pass\n"
        "        outs = [o.bridge_step(sa, sb, 0.5, sw, 0.3, noise=sc), o.bridge_loss(sa, sb, sw, mask=sm),\n"
        "                o.ibmd_loss(sa, sb, sc, sw, mask=sm), o.ibmd_loss(sa, sb, sc, sw)]\n"
        "    print(o.backend('privateuseone'), o.backend('cpu'))\n"
        "print(sum('privateuseone' in str(x.message) for x in caught))\n"
        "want = [o.bridge_step(a, b, 0.5, w, 0.3, noise=c), o.bridge_loss(a, b, w, mask=m),\n"
        "        o.ibmd_loss(a, b, c, w, mask=m), o.ibmd_loss(a, b, c, w)]\n"
        "print(max((x.inner - y).abs().max().item() for x, y in zip(outs, want)))\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backends, warned, err = proc.stdout.split("\n")[:3]
    assert backends == "reference compiled-cpu"
    assert warned == "1"  # once for the device, not once per call
    assert float(err) < 1e-6


def test_extension_built_against_another_torch_is_one_warning_saying_what_to_run():
    code = (
        "import warnings, torch\n"
        "built = torch.__version__\n"
        "torch.__version__ = '1.0.0'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import ibmd_fast.ops as o\n"
        "print(o.backend())\n"
        "print([str(w.message) for w in caught if 'ibmd_fast' in str(w.message)])\n"
        "z = torch.zeros(2, 3)\n"
        "print(o.bridge_loss(z, z + 1, 1.0).tolist())\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backend, messages, loss = proc.stdout.split("\n")[:3]
    assert backend == "reference" and loss == "[1.0, 1.0]"
    messages = eval(messages)  # a printed list of str
    if ops.backend() == "reference":  # no extension here: the one warning says it is missing
        assert len(messages) == 1 and "not available" in messages[0]
        return
    assert len(messages) == 1
    assert "running torch 1.0.0" in messages[0]
    assert f"built against torch {torch.__version__.split('+')[0]}" in messages[0]
    assert "pip install --no-build-isolation ." in messages[0]


def _cmake_library() -> str:
    """The CMake build of the ops (CI builds it and sets IBMD_FAST_CMAKE_LIB); built here if absent."""
    path = os.environ.get("IBMD_FAST_CMAKE_LIB")
    if path:
        assert os.path.exists(path), f"IBMD_FAST_CMAKE_LIB={path} does not exist"
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = os.path.join(root, "build", "cmake")
    lib = os.path.join(build, "libibmd_ops.so")
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        prefix = torch.utils.cmake_prefix_path
        subprocess.run(
            [
                "cmake",
                "-S",
                root,
                "-B",
                build,
                f"-DCMAKE_PREFIX_PATH={prefix}",
                "-DIBMD_WITH_CUDA=OFF",
                "-DCMAKE_BUILD_TYPE=Release",
            ],
            check=True,
            capture_output=True,
        )
    # Always build: incremental, so a library left by an older checkout is rebuilt from these sources.
    subprocess.run(["cmake", "--build", build, "-j2"], check=True, capture_output=True)
    return lib


def test_cmake_library_loads_with_torch_ops():
    if not os.environ.get("IBMD_FAST_CMAKE_LIB") and shutil.which("cmake") is None:
        pytest.skip("cmake is not installed (the CMake build of the ops is not tested; .ci/run installs it)")
    lib = _cmake_library()
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({lib!r})\n"
        "import ibmd_fast.reference as r\n"
        "a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)\n"
        "c = torch.rand(2)\n"
        "out = torch.ops.ibmd.bridge_step(a, b, c, c, c, None, 5)\n"
        "err = (out - r.bridge_step(a, b, c, c, c, seed=5)).abs().max().item()\n"
        "loss = torch.ops.ibmd.ibmd_loss(a, b, a, c)\n"
        "err2 = (loss - r.ibmd_loss(a, b, a, c)).abs().max().item()\n"
        "m = (torch.rand(2, 3, 4, 4) > 0.5).float()\n"
        "loss = torch.ops.ibmd.ibmd_loss(a, b, a, c, m)\n"
        "err3 = (loss - r.ibmd_loss(a, b, a, c, m)).abs().max().item()\n"
        "print(err, err2, err3)\n"
        "sys.exit(0 if max(err, err2, err3) < 1e-5 else 1)\n"
    )
    proc = _run_python(code, IBMD_FAST_DISABLE_EXT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@compiled
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_streams():
    """The kernels launch on the current stream, so a captured graph replays the same results."""
    a, b, x0 = _inputs((4, 3, 32, 32), torch.float32, "cuda", 3, seed=23)
    ca, cb, sd = (c.float() for c in _coefs(4, "cuda", seed=24))
    a.requires_grad_()

    def step():
        x_t = ops.bridge_step(a, b, ca, cb, sd, seed=99)
        loss = ops.bridge_loss(x_t, x0, ca).sum()
        return (x_t, loss, *torch.autograd.grad(loss, a))

    # Detached, so that no autograd graph made on the default (legacy) stream outlives this line: since
    # torch 2.11 a leaf's AccumulateGrad node remembers the stream it was made on, and a backward
    # captured on another stream then syncs with the legacy stream, which capture forbids
    # (cudaErrorStreamCaptureImplicit, seen on an H200 with want = step() kept attached).
    want = [t.detach() for t in step()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # captured on the stream the warm-up ran on
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@compiled
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_large_and_half_precision_paths():
    """Vectorized and scalar CUDA paths (aligned / odd sizes) agree with the CPU kernels."""
    for shape in [(2, 3, 64, 64), (3, 3, 17, 19), (2, 1 << 20)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            a, b, t, f = _inputs(shape, dtype, "cpu", 4, seed=25)
            w = _coefs(shape[0], "cpu", seed=26)[0].float()
            tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
            cpu = ops.bridge_step(a, b, w, w, w, seed=3)
            gpu = ops.bridge_step(a.cuda(), b.cuda(), w.cuda(), w.cuda(), w.cuda(), seed=3).cpu()
            torch.testing.assert_close(gpu.float(), cpu.float(), **tol)
            torch.testing.assert_close(
                ops.ibmd_loss(t.cuda(), f.cuda(), a.cuda(), w.cuda()).cpu(),
                ops.ibmd_loss(t, f, a, w),
                rtol=1e-4,
                atol=1e-5,
            )
