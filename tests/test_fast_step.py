"""The fast IBMD step: the optimizer guard on the device (fused AdamW), no host sync inside an
iteration, activation checkpointing, and bf16 autocast + torch.compile training like fp32.

All on CPU with one thread; the same checks run on CUDA where a GPU is present.
"""

from __future__ import annotations

import math
import os
import traceback

import pytest
import torch

from ibmd_fast.bridges import I2SBBridge
from ibmd_fast.models import Teacher, UNet, build_unet
from ibmd_fast.train import EMA, IBMD, DistillConfig, TrainingDivergedError
from ibmd_fast.train.optim import MAX_CONSECUTIVE_SKIPS, OptimizerStep, make_adamw
from ibmd_fast.train.common import Meter, Precision
from ibmd_fast.train.distributed import DistEnv

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _env(device: str) -> DistEnv:
    env = DistEnv()
    env.device = torch.device(device)
    return env


def _micro_teacher(seed: int = 0, size: int = 8) -> Teacher:
    """The smallest U-Net the blocks allow (32 channels, one level, no attention), random weights."""
    torch.manual_seed(seed)
    net = UNet(
        image_size=size,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(),
        channel_mult=(1,),
        use_scale_shift_norm=True,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialized output layer would make trivial work
    return Teacher(net, I2SBBridge(n_steps=100, beta_max=0.3))


# ----------------------------------------------------------------------------
# The guard on the device


def _guarded(device: str, fused: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device)
    opt = make_adamw(model.parameters(), 1e-2, fused=fused)
    guard = OptimizerStep(
        "test", opt, list(model.parameters()), torch.amp.GradScaler(device, enabled=False), 1.0, _env(device)
    )
    return model, opt, guard


def _state(model, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out += [st["exp_avg"].clone(), st["exp_avg_sq"].clone(), torch.as_tensor(st["step"]).clone()]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_fused_guard_skips_a_non_finite_step_exactly_on_the_device(device):
    model, opt, guard = _guarded(device)
    assert guard.on_device
    x = torch.randn(8, 4, device=device)
    loss, norm, stepped = guard(model(x).square().mean())
    assert all(isinstance(v, torch.Tensor) and v.device.type == device for v in (loss, norm, stepped))
    assert bool(stepped) and math.isfinite(float(loss)) and float(norm) > 0

    # the same step as a plain fused AdamW step: the guard adds nothing to the arithmetic
    twin, twin_opt, _ = _guarded(device)
    twin_opt.zero_grad()
    twin(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 1.0)
    twin_opt.step()
    for a, b in zip(_state(model, opt), _state(twin, twin_opt)):
        assert torch.equal(a, b)

    before = _state(model, opt)
    for bad in (float("nan"), float("inf")):
        loss, norm, stepped = guard(model(x).square().mean() * bad)
        assert not bool(stepped)
    for a, b in zip(before, _state(model, opt)):  # parameters, both moments and the step count untouched
        assert torch.equal(a, b)
    assert guard.skipped == 2 and guard.consecutive == 2
    assert guard.state_dict() == {"skipped": 2, "consecutive": 2}
    assert bool(guard(model(x).square().mean())[2]) and guard.consecutive == 0 and guard.skipped == 2

    guard.check()  # far from diverged
    for _ in range(MAX_CONSECUTIVE_SKIPS):
        guard(model(x).square().mean() * float("nan"))  # no error inside a step: the host is not asked
    with pytest.raises(TrainingDivergedError, match=f"{MAX_CONSECUTIVE_SKIPS} consecutive non-finite test"):
        guard.check()

    fresh = _guarded(device)[2]
    fresh.load_state_dict({"skipped": 5, "consecutive": 3})
    assert fresh.state_dict() == {"skipped": 5, "consecutive": 3}


def test_plain_optimizer_keeps_the_host_guard():
    model, opt, guard = _guarded("cpu", fused=False)
    assert not guard.on_device
    loss, norm, stepped = guard(model(torch.randn(8, 4)).square().mean())
    assert type(loss) is float and type(norm) is float and stepped is True


@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_on_the_device_matches_the_host_update(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device)
    host, dev = EMA(model, 0.9), EMA(model, 0.9)
    yes, no = torch.tensor(True, device=device), torch.tensor(False, device=device)
    for k in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0 + k)
        host.update(model)
        dev.update(model, when=yes)
        frozen = [p.clone() for p in dev.module.parameters()]
        dev.update(model, when=no)  # a skipped step: no update, not counted
        assert all(torch.equal(a, b) for a, b in zip(frozen, dev.module.parameters()))
        host.update(model, when=False)
    assert host.num_updates == dev.num_updates == 4
    for a, b in zip(host.module.parameters(), dev.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # lerp vs sub-mul-add: rounding only
    assert dev.state_dict()["num_updates"] == 4


def test_meter_sums_device_tensors_and_skips_non_finite_ones():
    meter = Meter()
    for v in (1.0, 3.0, float("nan")):
        meter.add(loss=torch.tensor(v), host=v)
    assert meter.means(DistEnv()) == {"loss": 2.0, "host": 2.0}


class _HostReads:
    """Records every tensor -> Python conversion (the calls that make the host wait for the GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def spy(tensor, *args, _original=original, _name=name, **kwargs):
                stack = traceback.extract_stack()[:-1]
                # the CPU noise generator's seed draws (ops.draw_seed) never touch the device
                if not any(f.name == "draw_seed" for f in stack):
                    where = next(
                        (
                            f"{os.path.basename(f.filename)}:{f.lineno}"
                            for f in reversed(stack)
                            if "ibmd_fast" in f.filename
                        ),
                        "?",
                    )
                    self.calls.append(f"{_name} at {where}")
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, spy)


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_adam_iteration_never_reads_a_tensor_on_the_host(monkeypatch, fused):
    cfg = DistillConfig(batch_size=4, inner_steps=2, lr=1e-3, fake_lr=1e-3, device="cpu", fused_adam=fused)
    ibmd = IBMD(_micro_teacher(), cfg, DistEnv(), Precision("fp32", torch.device("cpu")))
    ibmd.prepare()
    batch = {"xT": torch.rand(4, 3, 8, 8) * 2 - 1}
    ibmd.fake_step(batch)  # first calls build per-device tables: not what a steady iteration does
    ibmd.generator_step(batch)
    reads = _HostReads(monkeypatch)
    for _ in range(cfg.inner_steps):
        ibmd.fake_step(batch)
    ibmd.generator_step(batch)
    monkeypatch.undo()
    if fused:
        assert reads.calls == []
        assert ibmd.ema.num_updates == 2 and ibmd.gen_guard.skipped == 0
    else:  # the plain optimizer's host guard: the spy sees its reads (loss and norm per step)
        assert len(reads.calls) >= 2 * (cfg.inner_steps + 1), reads.calls


# ----------------------------------------------------------------------------
# Activation checkpointing


def test_activation_checkpointing_gives_the_same_gradients_in_train_and_eval_mode():
    torch.manual_seed(0)
    net = build_unet("tiny", 16, 3, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3.0, 40.0])

    def grads(train: bool):
        net.train(train)
        inp = x.clone().requires_grad_(True)
        net.zero_grad(set_to_none=True)
        net(inp, t).square().mean().backward()
        return [inp.grad] + [p.grad for p in net.parameters()]

    for train in (True, False):  # eval: the frozen teacher, differentiated through in the generator step
        plain = grads(train)
        assert net.set_activation_checkpointing(True) is net
        checkpointed = grads(train)
        net.set_activation_checkpointing(False)
        for a, b in zip(plain, checkpointed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert net.config["use_checkpoint"] is False  # a release records the architecture, not the switch


def test_activation_checkpointing_keeps_fewer_tensors_for_backward():
    torch.manual_seed(0)
    net = build_unet("tiny", 16, 3, 3).eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)

    def saved_count() -> int:
        count = [0]

        def pack(v):
            count[0] += 1
            return v

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            net(x, torch.tensor([1.0, 2.0])).sum()
        return count[0]

    plain = saved_count()
    net.set_activation_checkpointing(True)
    assert saved_count() < plain / 2


def test_distiller_option_switches_checkpointing_on_all_three_networks():
    cfg = DistillConfig(batch_size=4, inner_steps=1, device="cpu", checkpoint_activations=True)
    ibmd = IBMD(_micro_teacher(), cfg, DistEnv(), Precision("fp32", torch.device("cpu")))
    for model in (ibmd.teacher, ibmd.fake, ibmd.generator):
        blocks = [m for m in model.net.modules() if hasattr(m, "use_checkpoint") and m is not model.net]
        assert blocks and all(m.use_checkpoint for m in blocks)


# ----------------------------------------------------------------------------
# bf16 autocast + torch.compile train like fp32


class _CPUBFloat16(Precision):
    """bf16 autocast on CPU (the trainers' Precision keeps CPU runs in fp32; this test wants the arithmetic)."""

    def __init__(self):
        super().__init__("fp32", torch.device("cpu"))
        self.name, self.dtype = "bf16", torch.bfloat16

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def _loss_curve(device: str, precision: Precision, compile: bool, seed: int, steps: int) -> list[tuple]:
    # CUDA: the distiller's own compile (inductor). CPU: inductor's C++ code generation for the three U-Nets
    # took over 15 minutes on the crowded 2-core machine, so there the networks compile with the aot_eager
    # backend: Dynamo's capture and AOTAutograd's traced forward and backward (where a compiled-training bug
    # in the ops' fake or autograd registrations shows), run by eager kernels.
    inductor = compile and device != "cpu"
    cfg = DistillConfig(
        batch_size=8, inner_steps=1, lr=1e-3, fake_lr=1e-3, device=device, compile=inductor, fused_adam=True, seed=seed
    )
    env = _env(device)
    ibmd = IBMD(_micro_teacher(), cfg, env, precision)
    ibmd.prepare()
    if compile and not inductor:
        for model in (ibmd.teacher, ibmd.fake, ibmd.generator):
            model.net.compile(backend="aot_eager")
    data = torch.Generator().manual_seed(seed)
    pool = [torch.rand(8, 3, 8, 8, generator=data) * 2 - 1 for _ in range(8)]
    curve = []
    for k in range(steps):
        loss_phi = ibmd.fake_step({"xT": pool[(2 * k) % 8]})[0]
        loss_theta = ibmd.generator_step({"xT": pool[(2 * k + 1) % 8]})[0]
        curve.append(torch.stack([loss_phi, loss_theta]))
    return torch.stack(curve).double().cpu()


def _window_means(curve: torch.Tensor, window: int) -> torch.Tensor:
    return curve[: len(curve) // window * window].reshape(-1, window, curve.shape[1]).mean(1)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_compile_trains_to_the_fp32_loss_curve(device):
    """The student's training is unchanged by the fast levers: over 100 Algorithm-1 iterations
    the bf16-autocast, torch.compile'd run's loss curve (fake-model loss and generator loss, as
    means over windows of 20 iterations) stays as close to the fp32 eager curve as a second fp32
    run with another seed is: the RMS gap over windows is at most the seed-to-seed RMS gap.

    Why that bound: with the same seed both runs see the same data, t and noise, so their gap is
    bf16's rounding (2^-8 relative per op) amplified by 100 steps of training; a bug in the fast
    path (a lost cast, a wrong gradient in a compiled backward) moves the curve by more than the
    sampling noise that a new seed brings. The fake model's loss curve must also move by more
    than that tolerance, so the comparison is not one of two flat lines. On CPU the runs are 100
    iterations of the smallest U-Net each (2.6 minutes of one thread here, 4 minutes wall on the shared machine)."""
    steps, window = 100, 20
    fp32 = Precision("fp32", torch.device(device))
    low = _CPUBFloat16() if device == "cpu" else Precision("bf16", torch.device(device))
    reference = _window_means(_loss_curve(device, fp32, False, seed=0, steps=steps), window)
    other_seed = _window_means(_loss_curve(device, fp32, False, seed=1, steps=steps), window)
    fast = _window_means(_loss_curve(device, low, True, seed=0, steps=steps), window)
    assert torch.isfinite(fast).all()
    gap = (fast - reference).square().mean(0).sqrt()
    spread = (other_seed - reference).square().mean(0).sqrt()
    shown = f"RMS gap {gap.tolist()}, seed spread {spread.tolist()}, fp32 windows {reference.tolist()}"
    assert (gap <= spread).all(), f"bf16+compile strays from fp32: {shown}"
    # the fake model's loss moves over training (it rises as the generator leaves the teacher) by more than
    # the tolerance, so the check is not one of flat curves
    assert (reference[-1, 0] - reference[0, 0]).abs() > spread[0], shown


# ----------------------------------------------------------------------------
# Resumption with the device-side guard


def test_distill_with_fused_adam_resumes_bit_identically(tmp_path):
    """A run stopped at its step-2 checkpoint and resumed ends in the very state of an uninterrupted run:
    the fused optimizers' state, the device-side guard counters and the EMA's device count round-trip."""
    import numpy as np
    from PIL import Image

    from ibmd_fast.release import TEACHER_FORMAT, read_release, save_release
    from ibmd_fast.train import distill

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(images / f"{i}.png")
    teacher = _micro_teacher()
    release = str(tmp_path / "teacher.safetensors")
    save_release(
        release,
        teacher.net,
        TEACHER_FORMAT,
        {
            "unet": teacher.net.config,
            "conditional": False,
            "bridge": teacher.bridge.config(),
            "nfe": 10,
            "degradation": "sr4x-bicubic",
            "image_size": 8,
            "channels": 3,
            "data": f"corrupted:{images}",
        },
    )
    common = dict(
        teacher=release,
        batch_size=4,
        inner_steps=1,
        lr=1e-3,
        fake_lr=1e-3,
        log_every=1,
        ckpt_every=2,
        eval_items=0,
        device="cpu",
        progress=False,
        fused_adam=True,
    )
    whole = distill(run_dir=str(tmp_path / "whole"), steps=4, **common)
    distill(run_dir=str(tmp_path / "cut"), steps=2, **common)
    resumed = distill(run_dir=str(tmp_path / "cut"), steps=4, **common)
    assert whole["steps"] == resumed["steps"] == 4 and whole["skipped"] == resumed["skipped"] == 0

    def state(run):
        ckpt = torch.load(tmp_path / run / "checkpoints" / "ckpt-4.pt", weights_only=True)
        return ckpt["state"]

    def same(a, b, path=""):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), path
        elif isinstance(a, dict):
            assert set(a) == set(b), path
            for k in a:
                same(a[k], b[k], f"{path}/{k}")
        elif isinstance(a, (list, tuple)):
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        else:
            assert a == b, path

    same(state("whole"), state("cut"))
    assert state("cut")["ema"]["num_updates"] == 4
    same(read_release(whole["release"])[0], read_release(resumed["release"])[0])
