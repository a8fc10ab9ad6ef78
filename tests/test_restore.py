"""restore.py: known pixels, the one student chain (and its three callers), the teacher dispatch."""

import contextlib

import pytest
import torch

from ibmd_fast import ops, samplers
from ibmd_fast.bridges import I2SBBridge, VPBridge
from ibmd_fast.models import Generator, Teacher, build_unet
from ibmd_fast.restore import (
    GivenNoise,
    SeededNoise,
    restore,
    restore_with_teacher,
    sample_student,
    student_grid,
    student_chain,
)
from ibmd_fast.known_pixels import fill_hole, impose_known, noise_like

SHAPE = (4, 3, 8, 8)
BRIDGES = [pytest.param(I2SBBridge(), id="i2sb"), pytest.param(VPBridge(), id="vp")]

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=gen) * 2 - 1
    xT = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x0, 2), scale_factor=2.0)
    return x0, xT + 0.05 * torch.randn(SHAPE, generator=gen)


def _center_mask(size=8):
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return mask


class ToyStudent:
    """A student ``G(x_t, z, t)`` from a function, with what the chain reads (bridge, z_channels)."""

    def __init__(self, fn, bridge, z_channels=3, multistep=True):
        self.fn, self.bridge, self.z_channels, self.multistep, self.calls = fn, bridge, z_channels, multistep, []

    def __call__(self, xT, z, t=None, x_t=None):
        self.calls.append((x_t.clone(), None if z is None else z.clone(), t.clone()))
        return self.fn(x_t, z, t)


def _tiny(bridge, seed=0, size=16):
    """A tiny teacher and a generator from it, every weight perturbed (z reaches the output)."""
    torch.manual_seed(seed)
    net = build_unet("tiny", size, 3, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = Teacher(net, bridge).eval()
    generator = Generator(teacher, multistep=True).eval()
    with torch.no_grad():
        for p in generator.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return teacher, generator


# ----------------------------------------------------------------------------
# Known pixels


def test_impose_known_is_exact_for_a_binary_mask_and_differentiable_in_the_hole():
    _, known = _data(1)
    x = torch.randn(SHAPE, requires_grad=True)
    mask = _center_mask()
    out = impose_known(x, known, mask)
    hole = mask.bool().expand(SHAPE)
    assert torch.equal(out[~hole], known[~hole]) and torch.equal(out[hole], x[hole])
    out.sum().backward()
    assert torch.equal(x.grad, mask.expand(SHAPE))  # gradient in the hole only
    soft = torch.full((1, 1, 8, 8), 0.25)
    torch.testing.assert_close(impose_known(x, known, soft), 0.25 * x + 0.75 * known)


def test_fill_hole_is_noise_in_the_hole_only():
    _, xT = _data()
    mask = _center_mask()
    filled = fill_hole(xT, mask, seed=3)
    hole = mask.bool().expand(SHAPE)
    assert torch.equal(filled[~hole], xT[~hole])
    assert torch.equal(filled[hole], noise_like(xT, 3)[hole])
    assert abs(float(filled[hole].std()) - 1.0) < 0.3


# ----------------------------------------------------------------------------
# The student chain


@pytest.mark.parametrize("bridge", BRIDGES)
def test_student_one_step(bridge):
    x0, xT = _data()
    student = ToyStudent(lambda x, z, t: x0.clone(), bridge)
    z = torch.randn(SHAPE)
    out = student_chain(student, xT, z, 1)
    assert torch.equal(out, x0)
    ((x, z_seen, t),) = student.calls
    assert torch.equal(x, xT) and torch.equal(z_seen, z) and torch.all(t == bridge.T)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_student_multi_step_visits_the_student_grid(bridge):
    x0, xT = _data()
    student = ToyStudent(lambda x, z, t: x0.clone(), bridge)
    infos = []
    out = student_chain(
        student, xT, torch.randn(SHAPE), 4, noise=SeededNoise(torch.Generator().manual_seed(0)), callback=infos.append
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    assert len(student.calls) == 4 and [i["nfe"] for i in infos] == [1, 2, 3, 4]
    grid = student_grid(bridge, 4)
    assert len(grid) == 4 and grid[-1] == bridge.T and grid[0] > 0
    assert [float(t[0]) for _, _, t in student.calls] == grid.flip(0).tolist()
    assert all(torch.equal(c[1], student.calls[0][1]) for c in student.calls)  # one z for all calls


@pytest.mark.parametrize("bridge", BRIDGES)
def test_student_chain_is_the_posterior_recursion_of_math_5(bridge):
    """Against a transcription: x = xT; x0~ = G(x, z, t_n); x <- posterior step to t_{n-1} (MATH.md 3:
    I2SB eq. 4 with sigma = std_fwd; VP: alpha, rho), given noises; the last x0~ is returned."""
    _, xT = _data()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]

    def g(x, z_, t):
        return torch.tanh(0.7 * x + 0.3 * z_) * (1.0 + 0.001 * t.double().view(-1, 1, 1, 1).float())

    x, times = xT.double(), student_grid(bridge, 3).tolist()[::-1]
    for i, t in enumerate(times):
        x0 = g(x.float(), z, torch.full((4,), t, dtype=torch.float64)).double()
        if i == len(times) - 1:
            break
        s = times[i + 1]
        if isinstance(bridge, I2SBBridge):
            var_s, var_t = bridge.std_fwd[int(s)] ** 2, bridge.std_fwd[int(t)] ** 2
            mean = (var_s / var_t) * x + (1 - var_s / var_t) * x0
            std = (var_s * (var_t - var_s) / var_t).sqrt()
        else:
            a_s, a_t = bridge.alpha(torch.tensor(s)), bridge.alpha(torch.tensor(t))
            r_s, r_t = bridge.rho2(torch.tensor(s)), bridge.rho2(torch.tensor(t))
            mean = a_s * r_s / (a_t * r_t) * x + a_s * (1 - r_s / r_t) * x0
            std = a_s * (r_s * (1 - r_s / r_t)).sqrt()
        x = mean + std * noises[i].double()
    expected = x0.float()
    out = student_chain(ToyStudent(g, bridge), xT, z, 3, noise=GivenNoise(noises))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_student_inpainting_and_seeds():
    bridge = I2SBBridge(beta_max=1.0)
    x0, xT = _data()
    mask = _center_mask()
    known = (1 - mask).bool().expand(SHAPE)
    student = ToyStudent(lambda x, z, t: x0 + 0.1 * z, bridge)
    for nfe in (1, 3):
        out = sample_student(student, xT, nfe, mask=mask, seed=0)
        assert torch.equal(out[known], xT[known])  # known pixels copied from xT, exactly
        assert torch.equal(out, sample_student(student, xT, nfe, mask=mask, seed=0))
        assert not torch.equal(out, sample_student(student, xT, nfe, mask=mask, seed=1))
        assert torch.equal(
            out, sample_student(student, xT, nfe, mask=mask, seed=None, rng=torch.Generator().manual_seed(0))
        )
    torch.manual_seed(1)
    a = sample_student(student, xT, 3, seed=None)
    torch.manual_seed(1)
    assert torch.equal(a, sample_student(student, xT, 3, seed=None))  # no seed: torch's default generator
    with pytest.raises(ValueError, match="one-step"):
        sample_student(ToyStudent(lambda x, z, t: x, bridge, multistep=False), xT, 2)
    with pytest.raises(ValueError, match="stop"):
        student_chain(student, xT, None, 2, stop=3)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_given_noise_equals_seeded_noise_on_the_same_draws(bridge):
    """The two noise sources are one chain: Philox seeds, or the same noises given as tensors."""
    _, xT = _data()
    student = ToyStudent(lambda x, z, t: torch.tanh(x + z), bridge)
    z = torch.randn(SHAPE)
    seeded = student_chain(student, xT, z, 3, noise=SeededNoise(torch.Generator().manual_seed(4)))
    rng = torch.Generator().manual_seed(4)
    noises = [noise_like(xT, ops.draw_seed(rng)) for _ in range(2)]
    given = student_chain(student, xT, z, 3, noise=GivenNoise(noises))
    torch.testing.assert_close(given, seeded, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_the_onnx_program_is_the_student_chain(bridge):
    """``onnx_program.StudentProgram`` (what is exported) and ``reference_sample`` both run ``student_chain``."""
    from ibmd_fast.onnx_program import StudentProgram, reference_sample

    _, generator = _tiny(bridge)
    program = StudentProgram(generator, nfe=3, inpainting=True).eval()
    gen = torch.Generator().manual_seed(2)
    xT = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    inputs = {
        "xT": xT,
        "z": torch.randn(xT.shape, generator=gen),
        "mask": _center_mask(16).expand(2, 1, 16, 16),
        "hole_noise": torch.randn(xT.shape, generator=gen),
        "noise_1": torch.randn(xT.shape, generator=gen),
        "noise_2": torch.randn(xT.shape, generator=gen),
    }
    assert program.input_names == list(inputs)
    with torch.no_grad():
        out = program(*inputs.values())
        filled = impose_known(inputs["hole_noise"], xT, inputs["mask"])
        chain = student_chain(
            generator,
            filled,
            inputs["z"],
            3,
            mask=inputs["mask"],
            noise=GivenNoise([inputs["noise_1"], inputs["noise_2"]]),
        )
    torch.testing.assert_close(out, chain, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference_sample(generator, inputs, 3), chain, rtol=0, atol=0)
    hole = inputs["mask"].bool().expand_as(out)
    assert torch.equal(out[~hole], xT[~hole])


def _old_generate(ibmd, xT, z, mask, grad):
    """The distiller's chain as it was written before it went through ``student_chain``."""
    batch = xT.shape[0]
    n = 1 if ibmd.nfe == 1 else int(torch.randint(1, ibmd.nfe + 1, (), generator=ibmd.rng))

    def call(model, x, t):
        x0 = model(xT, z, t=t, x_t=x)
        if mask is not None:
            m = mask.to(x0.dtype)
            x0 = m * x0 + (1 - m) * xT.to(x0.dtype)
        return x0.float()

    x = xT
    with torch.no_grad():
        for m in range(ibmd.nfe, n, -1):
            t = ibmd.bridge.times(ibmd.grid[m - 1], batch, ibmd.device)
            s = ibmd.bridge.times(ibmd.grid[m - 2], batch, ibmd.device)
            x = ibmd.bridge.posterior_step(x, call(ibmd.generator, x, t), s, t, seed=ops.draw_seed(ibmd.rng))
    t_n = ibmd.bridge.times(ibmd.grid[n - 1], batch, ibmd.device)
    with contextlib.nullcontext() if grad else torch.no_grad():
        return call(ibmd.gen_ddp if grad else ibmd.generator, x, t_n)


@pytest.mark.parametrize("inpainting", [False, True])
def test_the_distillers_generate_is_the_student_chain_bit_for_bit(inpainting):
    import ibmd_fast.train as train
    from ibmd_fast.train.common import Precision
    from ibmd_fast.train.distributed import DistEnv

    teacher, _ = _tiny(I2SBBridge(n_steps=50, beta_max=1.0))
    cfg = train.DistillConfig(batch_size=2, nfe=3, device="cpu")
    ibmd = train.IBMD(teacher, cfg, DistEnv(), Precision("fp32", torch.device("cpu")), inpainting=inpainting)
    with torch.no_grad():
        for p in ibmd.generator.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(3)
    xT = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(xT.shape, generator=gen)
    mask = _center_mask(16).expand(2, 1, 16, 16) if inpainting else None
    for grad in (False, True):
        seen = set()
        for draw in range(6):  # several draws of n (grid points)
            state = ibmd.rng.get_state()
            old = _old_generate(ibmd, xT, z, mask, grad)
            ibmd.rng.set_state(state)
            new = ibmd.generate(xT, z, mask, grad)
            assert torch.equal(new, old) and new.requires_grad == grad
            seen.add(float(old.detach().sum()))
        assert len(seen) > 1  # the draws of n reach different grid points


# ----------------------------------------------------------------------------
# The teacher dispatch


def test_restore_dispatches_to_the_named_sampler():
    _, xT = _data()
    vp_teacher, _ = _tiny(VPBridge(), size=8)
    i2sb_teacher, _ = _tiny(I2SBBridge(n_steps=50), size=8)

    def predict(teacher):
        return lambda x, t: teacher.predict_x0(x, t, None)

    with torch.no_grad():
        for teacher, sampler, run in [
            (i2sb_teacher, "i2sb", lambda p, b, g: samplers.i2sb_sample(p, b, xT, 3, rng=g)),
            (i2sb_teacher, "dbim", lambda p, b, g: samplers.dbim_sample(p, b, xT, 3, eta=0.5, rng=g)),
            (vp_teacher, "dbim", lambda p, b, g: samplers.dbim_sample(p, b, xT, 3, eta=0.5, rng=g)),
            (vp_teacher, "heun", lambda p, b, g: samplers.heun_sample(p, b, xT, 3, rng=g)),
        ]:
            expected = run(predict(teacher), teacher.bridge, torch.Generator().manual_seed(9))
            got = restore(teacher, xT, sampler, 3, 0.5 if sampler == "dbim" else None, seed=9)
            assert torch.equal(got, expected), sampler
        with pytest.raises(ValueError, match="--eta applies to the dbim sampler only"):
            restore(i2sb_teacher, xT, "i2sb", 3, 0.5, seed=9)  # an eta the sampler would ignore is an error
        # None: the natural sampler (I2SB: i2sb, VP: dbim) and the default NFE (20 steps: 19 calls)
        assert torch.equal(restore(vp_teacher, xT, None, 2, seed=1), restore(vp_teacher, xT, "dbim", 2, seed=1))
        short, _ = _tiny(I2SBBridge(n_steps=20), size=8)
        calls = []
        hook = short.net.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            assert torch.equal(restore(short, xT, seed=1), restore(short, xT, "i2sb", 19, seed=1))
        finally:
            hook.remove()
        assert len(calls) == 2 * 19
        # many images: batches from one noise source; one batch is restore itself, clamped
        assert torch.equal(
            restore_with_teacher(vp_teacher, xT, 2, seed=1, batch_size=4),
            restore(vp_teacher, xT, "dbim", 2, seed=1).clamp(-1, 1),
        )


@pytest.mark.parametrize(
    "sampler, bridge, message",
    [
        ("euler", "i2sb", "unknown sampler 'euler'"),
        ("i2sb", "vp", "i2sb sampler needs an I2SB teacher"),
        ("heun", "i2sb", "heun sampler needs a VP"),
    ],
)
def test_restore_refuses_what_the_bridge_cannot_run(sampler, bridge, message):
    teacher, _ = _tiny(I2SBBridge(n_steps=20) if bridge == "i2sb" else VPBridge(), size=8)
    _, xT = _data()
    with pytest.raises(ValueError, match=message):
        restore(teacher, xT, sampler, 2)
    with pytest.raises(ValueError, match=message):
        restore_with_teacher(teacher, xT, 2, sampler)


def test_restore_refuses_bad_nfe_and_eta():
    teacher, _ = _tiny(VPBridge(), size=8)
    _, xT = _data()
    with pytest.raises(ValueError, match="nfe must be at least 1"):
        restore(teacher, xT, "dbim", 0)
    with pytest.raises(ValueError, match="eta must be in"):
        restore(teacher, xT, "dbim", 2, eta=1.5)


def test_restore_inpainting_keeps_known_pixels_and_conditions_on_the_filled_image():
    teacher, _ = _tiny(I2SBBridge(n_steps=20), size=8)
    teacher.conditional = False
    _, xT = _data()
    mask = _center_mask()
    known = (mask == 0).expand(SHAPE)
    for sampler in ("i2sb", "dbim"):
        out = restore(teacher, xT, sampler, 3, mask=mask, seed=2)
        assert torch.equal(out[known], xT[known]) and not torch.equal(out[~known], xT[~known])


def test_resolve_device_says_what_is_wrong_in_one_line():
    from ibmd_fast.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda:0")
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
