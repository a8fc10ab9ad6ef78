"""The IBMD generator step against a plain-PyTorch version of its objective (MATH.md 5), in float64.

``IBMD.generator_step`` runs the fused ops (``q_sample`` through ``ops.bridge_step``, the loss
through ``ops.ibmd_loss``); here the same objective is written with plain tensor arithmetic,

    L(theta) = mean_b lambda(t_b) * mean_i [(x0_hat*(x_t)_bi - x0_bi)^2 - (x0_hat_phi(x_t)_bi - x0_bi)^2]
    x0 = G_theta(xT, z),  x_t = b_t x0 + a_t xT + c_t eps

with the teacher and the fake model as fixed functions (parameters frozen) and the gradient
flowing into theta through x0 directly and through x_t into both networks. The noise (z, t,
eps) is replayed from the step's generator. Also here: inpainting losses cover the hole only,
both frozen networks run in eval mode, and multi-step students train from their own chain
without gradient.
"""

from __future__ import annotations

import pytest
import torch

from ibmd_fast import ops
from ibmd_fast.bridges import I2SBBridge, VPBridge
from ibmd_fast.models import build_unet
from ibmd_fast.models.wrappers import Teacher
from ibmd_fast.known_pixels import noise_like
from ibmd_fast.train import IBMD, DistillConfig
from ibmd_fast.train import ibmd as ibmd_module
from ibmd_fast.train.common import Precision
from ibmd_fast.train.distributed import DistEnv

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, BATCH = 8, 2


def _perturb(module, scale, seed):
    """Move every parameter off its initial value: ADM zero-initialises the output convolution
    (the network would ignore x_t) and the fake model starts as an exact copy of the teacher (the
    IBMD loss and its gradient would vanish)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _ibmd(bridge, *, nfe=1, dropout=0.0, inpainting=False, seed=0):
    torch.manual_seed(seed)
    teacher = Teacher(build_unet("tiny", SIZE, 3, 3, dropout=dropout), bridge, conditional=False).double()
    _perturb(teacher, 0.05, seed + 1)
    cfg = DistillConfig(batch_size=BATCH, nfe=nfe, grad_clip=0.0, device="cpu", seed=seed)
    ibmd = IBMD(teacher, cfg, DistEnv(), Precision("fp32", torch.device("cpu")), inpainting=inpainting)
    _perturb(ibmd.fake, 0.05, seed + 2)
    _perturb(ibmd.generator, 0.02, seed + 3)  # the zero-init z input too
    return ibmd


def _batch(seed=0, mask=None):
    gen = torch.Generator().manual_seed(seed)
    batch = {"xT": (torch.rand(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2 - 1)}
    if mask is not None:
        batch["mask"] = mask
    return batch


def _hole():
    mask = torch.zeros(BATCH, 1, SIZE, SIZE, dtype=torch.float64)
    mask[..., 2:6, 3:7] = 1.0
    return mask


def _step_grads(ibmd, batch):
    """generator_step's gradients of the generator's parameters (the optimizer step is left out)."""
    got = {}

    def guard(loss):
        params = list(ibmd.generator.parameters())
        got["grads"] = torch.autograd.grad(loss, params, allow_unused=True)
        got["loss"] = loss.detach()
        return float(loss.detach()), 0.0, False

    ibmd.gen_guard = guard
    ibmd.generator_step(batch)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got["grads"], ibmd.generator.parameters())]


def _rel_err(a, b):
    a, b = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    return ((a - b).norm() / b.norm()).item()


def _plain_objective_grads(ibmd, batch, state):
    """MATH.md 5's generator objective in plain PyTorch, with the step's noise replayed."""
    ibmd.rng.set_state(state)
    bridge, xT = ibmd.bridge, batch["xT"]
    z = noise_like(xT, ibmd_module.draw_seed(ibmd.rng))
    t_T = bridge.times(ibmd.grid[-1], BATCH, xT.device)
    x0 = ibmd.generator(xT, z, t=t_T, x_t=xT)
    t = bridge.sample_t(BATCH, rng=ibmd.rng)
    eps = noise_like(xT, ibmd_module.draw_seed(ibmd.rng))
    b_t, a_t, c_t = (c.view(-1, 1, 1, 1) for c in bridge.marginal(t))
    x_t = b_t * x0 + a_t * xT + c_t * eps
    ibmd.teacher.eval().requires_grad_(False)
    ibmd.fake.eval().requires_grad_(False)
    try:
        teacher_pred, fake_pred = ibmd.teacher.predict_x0(x_t, t), ibmd.fake.predict_x0(x_t, t)
    finally:
        ibmd.fake.train().requires_grad_(True)
    per_sample = ((teacher_pred - x0) ** 2 - (fake_pred - x0) ** 2).flatten(1).mean(1)
    loss = (bridge.loss_weight(t) * per_sample).mean()
    return torch.autograd.grad(loss, list(ibmd.generator.parameters()), allow_unused=True)


@pytest.mark.parametrize(
    "bridge", [pytest.param(I2SBBridge(n_steps=100), id="i2sb"), pytest.param(VPBridge(), id="vp")]
)
def test_generator_step_gradient_is_the_objectives(bridge, monkeypatch):
    ibmd, batch = _ibmd(bridge), _batch()
    state = ibmd.rng.get_state()
    ours = _step_grads(ibmd, batch)
    want = [
        torch.zeros_like(p) if g is None else g
        for g, p in zip(_plain_objective_grads(ibmd, batch, state), ibmd.generator.parameters())
    ]
    assert _rel_err(ours, want) <= 1e-6
    assert torch.cat([g.flatten() for g in want]).norm() > 0

    # The check can fail: a q_sample that cut the gradient path through x_t (x0 detached) is far off.
    q_sample = bridge.q_sample
    monkeypatch.setattr(bridge, "q_sample", lambda x0, xT, t, **k: q_sample(x0.detach(), xT, t, **k))
    ibmd.rng.set_state(state)
    assert _rel_err(_step_grads(ibmd, batch), want) > 1e-2


def test_inpainting_gradient_ignores_the_teachers_known_pixels(monkeypatch):
    """A teacher whose outputs on the known pixels are garbage (and depend on x_t, so they have
    gradients) gives the generator the same gradient as a clean one: the losses cover the hole."""
    mask = _hole()
    ibmd, batch = _ibmd(I2SBBridge(n_steps=100, beta_max=1.0), inpainting=True), _batch(1, mask)
    state = ibmd.rng.get_state()
    clean = _step_grads(ibmd, batch)

    predict = ibmd.teacher.predict_x0

    def garbage(x_t, t, xT=None, y=None):
        return predict(x_t, t, xT, y=y) + (1 - mask) * 30.0 * torch.tanh(3.0 * x_t + 1.0)

    monkeypatch.setattr(ibmd.teacher, "predict_x0", garbage)
    ibmd.rng.set_state(state)
    assert _rel_err(_step_grads(ibmd, batch), clean) <= 1e-10

    # Without the mask in the loss the garbage does reach the generator.
    ibmd_loss = ops.ibmd_loss
    monkeypatch.setattr(ops, "ibmd_loss", lambda *a, mask=None: ibmd_loss(*a))
    ibmd.rng.set_state(state)
    assert _rel_err(_step_grads(ibmd, batch), clean) > 1e-2


def test_masked_fake_and_teacher_losses_cover_the_hole_only(monkeypatch):
    """fake_step (and the teacher trainer, same op) pass the hole mask to ops.bridge_loss."""
    mask = _hole()
    ibmd, batch = _ibmd(I2SBBridge(n_steps=100, beta_max=1.0), inpainting=True), _batch(2, mask)
    seen = []
    bridge_loss = ops.bridge_loss

    def spy(pred, target, weight, mask=None):
        seen.append(mask)
        return bridge_loss(pred, target, weight, mask=mask)

    monkeypatch.setattr(ops, "bridge_loss", spy)
    ibmd.fake_step(batch)
    assert len(seen) == 1 and seen[0] is not None and torch.equal(seen[0].to(mask.dtype), mask)


def test_frozen_networks_are_evaluated_alike_with_dropout():
    """With dropout > 0 the fake model runs in eval mode in the generator step, as the teacher does:
    the step's gradient does not depend on torch's global RNG (dropout draws), and the fake model
    trains in train mode again afterwards."""
    ibmd, batch = _ibmd(VPBridge(), dropout=0.3), _batch(5)
    modes = []
    fake_predict = ibmd.fake.predict_x0

    def spy(*args, **kwargs):
        modes.append((ibmd.fake.training, ibmd.teacher.training))
        return fake_predict(*args, **kwargs)

    ibmd.fake.predict_x0 = spy
    ibmd.generator.eval()  # the student's own dropout is not what is tested here
    state = ibmd.rng.get_state()
    torch.manual_seed(1)
    first = _step_grads(ibmd, batch)
    ibmd.rng.set_state(state)
    torch.manual_seed(2)
    assert _rel_err(_step_grads(ibmd, batch), first) <= 1e-12
    assert modes == [(False, False), (False, False)]
    assert ibmd.fake.training
    ibmd.fake_step(batch)  # phase 1 trains phi in train mode
    assert modes[-1] == (True, False)


def test_multistep_student_trains_from_its_own_chain_without_gradient():
    """generate() for k = 3: the chain x_{t_3} = xT -> x_{t_2} -> ... -> x_{t_n} of the student's own
    predictions and posterior steps, then x0 = G(x_{t_n}, z, t_n); the gradient flows through that
    last call only (x_{t_n} is treated as data)."""
    ibmd = _ibmd(VPBridge(), nfe=3)
    xT = _batch(3)["xT"]
    z = torch.randn(xT.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for seed in range(100):  # a draw with n = 1: two chain steps before the graded call
        ibmd.rng.manual_seed(seed)
        if int(torch.randint(1, 4, (), generator=ibmd.rng)) == 1:
            break
    ibmd.rng.manual_seed(seed)
    state = ibmd.rng.get_state()
    params = list(ibmd.generator.parameters())
    x0 = ibmd.generate(xT, z, None, grad=True)
    ours = torch.autograd.grad(x0.square().sum(), params, allow_unused=True)

    def chain(with_grad):
        ibmd.rng.set_state(state)
        n = int(torch.randint(1, 4, (), generator=ibmd.rng))
        assert n == 1
        full = lambda v: ibmd.bridge.times(v, BATCH, xT.device)  # noqa: E731
        x = xT
        with torch.set_grad_enabled(with_grad):
            for m in (3, 2):
                t, s = full(ibmd.grid[m - 1]), full(ibmd.grid[m - 2])
                x = ibmd.bridge.posterior_step(
                    x, ibmd.generator(xT, z, t=t, x_t=x), s, t, seed=ibmd_module.draw_seed(ibmd.rng)
                )
        out = ibmd.generator(xT, z, t=full(ibmd.grid[0]), x_t=x)
        return out, torch.autograd.grad(out.square().sum(), params, allow_unused=True)

    out, want = chain(with_grad=False)
    torch.testing.assert_close(x0, out, rtol=0, atol=0)
    fill = lambda gs: [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]  # noqa: E731
    assert _rel_err(fill(ours), fill(want)) <= 1e-12
    # Backpropagating through the chain would be another gradient: the test can tell them apart.
    _, through_chain = chain(with_grad=True)
    assert _rel_err(fill(through_chain), fill(want)) > 1e-3
