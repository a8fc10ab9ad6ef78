"""Teacher training (MATH.md 4), IBMD distillation (MATH.md 5, Algorithm 1), checkpoints, EMA, torchrun.

Everything runs on CPU with the tiny U-Net at 16 px and batches of 4. Bit-identical resumption
is checked against uninterrupted runs made in this process with one thread; the killed runs
happen in subprocesses (tests/_train_worker.py) that also use one thread.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import ibmd_fast
from ibmd_fast import ops
from ibmd_fast.data import collate, make_dataset
from ibmd_fast.release import load_generator, load_teacher, read_release
from ibmd_fast.train import (
    EMA,
    IBMD,
    CheckpointError,
    CheckpointIO,
    CheckpointMismatchError,
    CheckpointWarning,
    DistillConfig,
    TeacherConfig,
    TrainingDivergedError,
    distill,
    train_teacher,
)
from ibmd_fast.train import ibmd as ibmd_module
from ibmd_fast.train.batches import BatchStream
from ibmd_fast.train.common import Precision
from ibmd_fast.train.distributed import DistEnv
from ibmd_fast.restore import sample_student

from conftest import run_torchrun, write_smooth_images
from conftest import teacher_kwargs as shared_teacher_kwargs

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_train_worker.py"
# Subprocesses import the very ibmd_fast this process imported (a checkout or an install), so
# both sides run the same op implementation and their bit patterns can be compared.
PACKAGE_ROOT = Path(ibmd_fast.__file__).resolve().parent.parent


def _subprocess_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


# tiny convolutions on shared cores, and the bit-identity checks compare with 1-thread workers
# (tests/_train_worker.py): one thread for the module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """10 smooth random RGB images of 20x24: random crops to 16 px, flips, 2 batches of 4 per epoch."""
    return write_smooth_images(tmp_path_factory.mktemp("images"), 10)


def teacher_kwargs(run_dir, image_dir, **overrides) -> dict:
    """conftest's teacher run, 6 steps with checkpoints every 3."""
    return shared_teacher_kwargs(run_dir, image_dir, **{"steps": 6, "ckpt_every": 3, **overrides})


def distill_kwargs(run_dir, teacher, **overrides) -> dict:
    kwargs = dict(
        run_dir=str(run_dir),
        teacher=str(teacher),
        batch_size=4,
        steps=2,
        inner_steps=2,
        lr=1e-4,
        fake_lr=1e-4,
        log_every=1,
        ckpt_every=2,
        eval_items=0,
        device="cpu",
        progress=False,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def teacher_release(tmp_path_factory, image_dir) -> str:
    run_dir = tmp_path_factory.mktemp("teacher")
    return train_teacher(**teacher_kwargs(run_dir, image_dir, steps=4, ckpt_every=4))["release"]


def _stats(run_dir) -> list[dict]:
    with open(Path(run_dir) / "stats.jsonl") as fh:
        return [json.loads(line) for line in fh]


def _ckpt(run_dir, step) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / f"ckpt-{step}.pt", weights_only=True)


def _assert_identical(a, b, path="") -> None:
    """Bitwise equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}"
        for k in a:
            _assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a!r} vs {b!r}"


def _same_training_state(ckpt_a: dict, ckpt_b: dict) -> None:
    for key in ("step", "state", "rng", "data_position"):
        _assert_identical(ckpt_a[key], ckpt_b[key], key)


def _spawn(mode: str, config: dict, slow: float = 0.0, summary: str = "") -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), mode, json.dumps(config), "--slow", str(slow)]
    if summary:
        cmd += ["--summary", summary]
    return subprocess.Popen(
        cmd, cwd=str(REPO), env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _kill_after(proc: subprocess.Popen, path: Path, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (checkpoints appear by atomic rename)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker ended before writing {path.name}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------
# Teacher training


def test_train_teacher_writes_its_files_and_learns(tmp_path, image_dir):
    """MATH.md 4 on four fixed 16-px images: the loss on a fixed batch goes down."""
    for i in range(4):  # exactly 16 px: no crop, so every batch holds the same four images
        Image.open(image_dir / f"{i:02d}.png").resize((16, 16)).save(tmp_path / f"{i}.png")
    (tmp_path / "run").mkdir()
    kwargs = teacher_kwargs(
        tmp_path / "run", tmp_path, steps=50, lr=2e-3, ema_decay=0.9, log_every=10, ckpt_every=20, keep_ckpts=2
    )
    kwargs["data"] = f"folder:{tmp_path}"
    summary = train_teacher(TeacherConfig(**kwargs))
    run = tmp_path / "run"

    assert summary["steps"] == 50 and math.isfinite(summary["loss"]) and summary["skipped"] == 0
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 50 and config["arch"] == "tiny"
    rows = _stats(run)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "it_per_s", "skipped", "seconds"} <= set(row)
        assert math.isfinite(row["loss"]) and row["skipped"] == 0
    assert "step      50" in (run / "log.txt").read_text()
    with Image.open(run / "samples-50.png") as png:
        assert png.format == "PNG" and png.size[0] > 16
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-40.pt", "ckpt-50.pt"]

    teacher, tconf = load_teacher(summary["release"])
    assert tconf["degradation"] == "sr4x-bicubic" and tconf["image_size"] == 16 and tconf["channels"] == 3
    assert tconf["data"] == kwargs["data"] and tconf["nfe"] == 2 and tconf["bridge"]["n_steps"] == 50
    assert tconf["conditional"] is False and tconf["unet"] == teacher.net.config

    # A fixed batch, fixed times and noise: the trained teacher beats the initial network
    # (zero output convolution: x0_hat = x_t).
    data = make_dataset(kwargs["data"], "sr4x-bicubic", size=16, split="test")
    batch = collate([data[i] for i in range(4)])
    x0, xT = batch["x0"].repeat(8, 1, 1, 1), batch["xT"].repeat(8, 1, 1, 1)
    bridge = teacher.bridge
    t = bridge.sample_t(32, rng=torch.Generator().manual_seed(1))
    x_t = bridge.q_sample(x0, xT, t, seed=5)
    with torch.no_grad():
        trained = ops.bridge_loss(teacher.predict_x0(x_t, t), x0, bridge.loss_weight(t)).mean()
    initial = ops.bridge_loss(x_t, x0, bridge.loss_weight(t)).mean()
    assert trained < 0.9 * initial, (float(trained), float(initial))


def test_teacher_sigkill_and_resume_is_bit_identical(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path / "ref", image_dir, steps=12, ckpt_every=5)
    train_teacher(**kwargs)  # the uninterrupted run

    killed = tmp_path / "killed"
    proc = _spawn("teacher", {**kwargs, "run_dir": str(killed)}, slow=0.25)
    _kill_after(proc, killed / "checkpoints" / "ckpt-5.pt")
    assert not (killed / "teacher.safetensors").exists()
    assert max(s for s, _ in CheckpointIO(killed / "checkpoints").checkpoints()) < 12

    summary = train_teacher(**{**kwargs, "run_dir": str(killed)})  # resume="auto"
    assert summary["steps"] == 12
    assert "resumed from" in (killed / "log.txt").read_text()
    # Resumed at step 5 = data position 5 of 2 batches per epoch: mid-epoch, exercised on purpose.
    _same_training_state(_ckpt(tmp_path / "ref", 12), _ckpt(killed, 12))
    ref_state, _, _ = read_release(str(tmp_path / "ref" / "teacher.safetensors"))
    new_state, _, _ = read_release(summary["release"])
    _assert_identical(ref_state, new_state)
    steps = [r["step"] for r in _stats(killed)]
    assert steps == list(range(1, 13))  # lines the killed run wrote past its checkpoint are replaced


def test_damaged_newest_checkpoint_is_skipped_and_old_ones_pruned(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=8, ckpt_every=2, keep_ckpts=2)
    train_teacher(**kwargs)
    ckpts = CheckpointIO(tmp_path / "checkpoints").checkpoints()
    assert [s for s, _ in ckpts] == [6, 8]
    original = _ckpt(tmp_path, 8)
    newest = tmp_path / "checkpoints" / "ckpt-8.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short

    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train_teacher(**{**kwargs, "resume": str(newest)})
    with pytest.warns(CheckpointWarning, match="ckpt-8.pt"):
        train_teacher(**kwargs)
    assert "resumed from" in (tmp_path / "log.txt").read_text()
    assert "skipping damaged checkpoint" in (tmp_path / "log.txt").read_text()
    _same_training_state(original, _ckpt(tmp_path, 8))  # steps 7-8 replayed exactly from ckpt-6


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2)
    train_teacher(**kwargs)
    before = {p.name: _sha(p) for p in (tmp_path / "checkpoints").iterdir()}
    release = _sha(tmp_path / "teacher.safetensors")

    with pytest.raises(TrainingDivergedError, match="20 consecutive non-finite .* lower --lr"):
        train_teacher(**{**kwargs, "steps": 60, "lr": 1e12, "allow_config_change": True})
    rows = [r for r in _stats(tmp_path) if r["step"] > 2]
    assert rows[-1]["skipped"] >= 19 and rows[-1]["loss"] is None
    assert "training diverged" in (tmp_path / "log.txt").read_text()
    after = {p.name: _sha(p) for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before  # nothing written while diverging; the good checkpoint is intact
    assert _sha(tmp_path / "teacher.safetensors") == release  # no release from a diverged run


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=1, ckpt_every=1)
    train_teacher(**kwargs)
    with pytest.raises(CheckpointMismatchError, match="(?s)conditional: checkpoint False, this run True"):
        train_teacher(**{**kwargs, "steps": 2, "conditional": True})
    with pytest.raises(CheckpointMismatchError, match="arch: checkpoint 'tiny', this run 'small'"):
        train_teacher(**{**kwargs, "steps": 2, "arch": "small"})
    # Same settings, other weights (e.g. a file copied from elsewhere): the state dict check.
    io = CheckpointIO(tmp_path / "other", keep=1, net=torch.nn.Linear(3, 4))
    payload = CheckpointIO.read(io.save(1))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys"):
        CheckpointIO(tmp_path / "other", net=torch.nn.Linear(3, 5)).load(payload)


def test_batch_stream_resumes_exactly_with_any_number_of_workers(image_dir):
    # random crops and flips, 2 batches of 4 per epoch: resumption must replay order and pixels
    data = make_dataset(f"folder:{image_dir}", "sr4x-bicubic", size=16, split="train")
    full = BatchStream(data, 4, DistEnv(), seed=3)
    state = torch.get_rng_state()
    batches = [full.next()["x0"] for _ in range(7)]
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's global random state is untouched
    assert full.epoch == 3 and full.position == 7
    assert not torch.equal(batches[0], batches[2])  # epoch 1 is another order (and other crops)
    resumed = BatchStream(data, 4, DistEnv(), seed=3, workers=2, start=3)  # mid-epoch, from worker processes
    for expected in batches[3:]:
        assert torch.equal(resumed.next()["x0"], expected)


def test_ema_is_a_lerp_with_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    beta = ema.beta()
    assert beta == pytest.approx(0.1)  # (1 + 0)/(10 + 0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, start.lerp(model.weight.detach(), 1 - beta))
    for _ in range(200):
        ema.update(model)
    assert ema.beta() == 0.9
    other = torch.nn.Linear(2, 2)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, ema.module.weight)
    restored = EMA(torch.nn.Linear(2, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 201 and torch.equal(restored.module.weight, ema.module.weight)


# ----------------------------------------------------------------------------
# Distillation


def test_distill_at_step_zero_releases_the_teachers_one_step_prediction(tmp_path, teacher_release):
    summary = distill(**distill_kwargs(tmp_path, teacher_release, steps=0))
    generator, gconf = load_generator(summary["release"])
    teacher, tconf = load_teacher(teacher_release)
    assert gconf["nfe"] == 1 and gconf["inpainting"] is False and gconf["data"] == tconf["data"]
    assert gconf["degradation"] == tconf["degradation"] and gconf["image_size"] == 16
    xT = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        one_step = teacher.predict_x0(xT, teacher.full_time(3, "cpu"))
        for seed in (0, 1):
            z = torch.randn(xT.shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(generator(xT, z), one_step, atol=1e-5, rtol=1e-5)


def test_distill_phases_update_the_right_networks(teacher_release):
    teacher, _ = load_teacher(teacher_release)
    cfg = DistillConfig(batch_size=4, inner_steps=1, lr=1e-3, fake_lr=1e-3, device="cpu")
    ibmd = IBMD(teacher, cfg, DistEnv(), Precision("fp32", torch.device("cpu")))
    ibmd.prepare()
    batch = {"xT": torch.rand(4, 3, 16, 16) * 2 - 1}

    def snap(module):
        return [p.detach().clone() for p in module.parameters()]

    def changed(before, module):
        return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))

    t0, f0, g0 = snap(ibmd.teacher), snap(ibmd.fake), snap(ibmd.generator)
    loss_phi, _, stepped = ibmd.fake_step(batch)  # Algorithm 1, step 1
    assert stepped and math.isfinite(loss_phi)
    assert changed(f0, ibmd.fake) and not changed(g0, ibmd.generator) and not changed(t0, ibmd.teacher)

    f1 = snap(ibmd.fake)
    loss_theta, grad_norm, stepped = ibmd.generator_step(batch)  # Algorithm 1, step 2
    assert stepped and math.isfinite(loss_theta) and grad_norm > 0
    assert changed(g0, ibmd.generator) and not changed(f1, ibmd.fake) and not changed(t0, ibmd.teacher)
    assert all(p.grad is None for p in ibmd.fake.parameters())  # phi got no gradient in step 2
    assert all(p.requires_grad for p in ibmd.fake.parameters())  # and is trainable again for step 1
    assert all(not p.requires_grad for p in ibmd.teacher.parameters())
    assert ibmd.ema.num_updates == 1


def test_distill_reads_corrupted_images_only(tmp_path, teacher_release, image_dir, monkeypatch):
    calls = []
    real = ibmd_module.make_dataset

    def recording(spec, *args, **kwargs):
        calls.append((spec, kwargs.get("split"), kwargs.get("corrupted_only", False)))
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(ibmd_module, "make_dataset", recording)
    summary = distill(**distill_kwargs(tmp_path, teacher_release, data=f"corrupted:{image_dir}", steps=2, eval_items=4))
    assert [c for c in calls if c[1] == "train"] == [(f"corrupted:{image_dir}", "train", True)]
    assert summary["comparison"] == []  # a corrupted folder holds no clean images to compare with
    assert "no clean held-out images" in (tmp_path / "log.txt").read_text()
    assert math.isfinite(summary["loss_theta"]) and math.isfinite(summary["loss_phi"])
    for row in _stats(tmp_path):
        assert math.isfinite(row["loss_theta"]) and math.isfinite(row["loss_phi"])
        assert row["skipped"] == 0 and row["skipped_fake"] == 0
    generator, gconf = load_generator(summary["release"])
    assert gconf["data"] == f"corrupted:{image_dir}" and gconf["nfe"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["data"] == f"corrupted:{image_dir}"
    assert (tmp_path / "samples-2.png").exists()


def test_distill_sigkill_and_resume_is_bit_identical(tmp_path, teacher_release, image_dir):
    kwargs = distill_kwargs(tmp_path / "ref", teacher_release, data=f"corrupted:{image_dir}", steps=6, ckpt_every=3)
    distill(**kwargs)

    killed = tmp_path / "killed"
    proc = _spawn("distill", {**kwargs, "run_dir": str(killed)}, slow=0.2)
    _kill_after(proc, killed / "checkpoints" / "ckpt-3.pt")
    assert not (killed / "generator.safetensors").exists()

    summary = distill(**{**kwargs, "run_dir": str(killed)})
    assert summary["steps"] == 6 and "resumed from" in (killed / "log.txt").read_text()
    # step 3 = 9 batches = mid-epoch with 2 batches per epoch
    _same_training_state(_ckpt(tmp_path / "ref", 6), _ckpt(killed, 6))
    ref_state, _, _ = read_release(str(tmp_path / "ref" / "generator.safetensors"))
    _assert_identical(ref_state, read_release(summary["release"])[0])


def test_distill_vp_conditional_inpainting_multistep_student(tmp_path, image_dir, monkeypatch):
    """The other branches: VP bridge, conditional teacher, inpainting (hole only), NFE-2 student, comparison."""
    masks = {"bridge_loss": [], "ibmd_loss": []}  # every training loss covers the hole only
    for name in masks:

        def spy(*args, _op=getattr(ops, name), _seen=masks[name], mask=None):
            _seen.append(None if mask is None else tuple(mask.shape))
            return _op(*args, mask=mask)

        monkeypatch.setattr(ops, name, spy)
    teacher = train_teacher(
        **teacher_kwargs(
            tmp_path / "teacher",
            image_dir,
            bridge="vp",
            conditional=True,
            degradation="inpaint-center",
            steps=2,
            ckpt_every=2,
        )
    )
    summary = distill(
        **distill_kwargs(
            tmp_path / "student",
            teacher["release"],
            nfe=2,
            inner_steps=1,
            steps=2,
            eval_items=4,
            eval_teacher_nfe=(1, 2),
        )
    )
    # 2 teacher steps, 2 x 1 fake-model steps; 2 generator steps; masks [B, 1, H, W]
    assert masks == {"bridge_loss": [(4, 1, 16, 16)] * 4, "ibmd_loss": [(4, 1, 16, 16)] * 2}, masks
    rows = summary["comparison"]
    assert [(r["model"], r["nfe"]) for r in rows] == [("corrupted", 0), ("teacher", 1), ("teacher", 2), ("student", 2)]
    assert rows[0]["sec_per_image"] == 0.0  # the input itself: no restoration time
    for row in rows[1:]:
        assert math.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1 and row["sec_per_image"] > 0
    assert json.loads((tmp_path / "student" / "comparison.json").read_text()) == rows
    photo = json.loads((tmp_path / "student" / "comparison-photo.json").read_text())
    assert [c["title"] for c in photo["columns"]] == ["corrupted", "teacher NFE 2", "student NFE 2", "clean"]
    assert photo["hole"] == 8  # the training crops' hole (16 px crops), not half of the whole photo
    from ibmd_fast.train.ibmd import PHOTO_DRAWS

    assert [len(photo["draws"][m]) for m in ("teacher", "student")] == [PHOTO_DRAWS] * 2  # further draws scored
    with Image.open(tmp_path / "student" / "comparison.png") as picture:  # four columns of the photo, enlarged
        assert picture.width == 6 + 4 * (photo["zoom"] * photo["width"] + 6)

    generator, gconf = load_generator(summary["release"])
    assert gconf["inpainting"] is True and gconf["nfe"] == 2 and gconf["multistep"] is True
    assert gconf["conditional"] is True and gconf["bridge"]["type"] == "vp"
    data = make_dataset(f"folder:{image_dir}", "inpaint-center", size=16, split="test")
    batch = collate([data[i] for i in range(2)])
    out = sample_student(generator, batch["xT"], 2, batch["mask"], seed=0)
    known = 1 - batch["mask"]
    assert torch.equal(out * known, batch["xT"] * known)  # the student only fills the hole


# ----------------------------------------------------------------------------
# torchrun


def test_torchrun_two_processes_teacher_and_distill(tmp_path):
    common = dict(image_size=16, batch_size=4, log_every=1, device="cpu", progress=False)
    config = {
        "teacher": dict(
            common, run_dir=str(tmp_path / "t"), data="skimage", n_steps=50, steps=3, ckpt_every=2, sample_nfe=2
        ),
        "distill": dict(
            common,
            run_dir=str(tmp_path / "d"),
            steps=2,
            inner_steps=1,
            ckpt_every=2,
            eval_items=2,
            eval_teacher_nfe=[1, 2],
        ),
    }
    summary_path = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "both",
        json.dumps(config),
        "--summary",
        str(summary_path),
    ]
    run_torchrun(cmd, REPO, _subprocess_env(), timeout=180)
    summary = json.loads(summary_path.read_text())
    assert summary["teacher"]["steps"] == 3 and summary["distill"]["steps"] == 2
    assert "2 process(es)" in (tmp_path / "t" / "log.txt").read_text()
    assert json.loads((tmp_path / "t" / "config.json").read_text())["world_size"] == 2
    load_teacher(summary["teacher"]["release"])
    load_generator(summary["distill"]["release"])
    assert len(_stats(tmp_path / "d")) == 2 and len(summary["distill"]["comparison"]) == 4
    ckpt = _ckpt(tmp_path / "t", 3)
    assert len(ckpt["rng"]) == 2  # one noise state per rank
    assert not torch.equal(ckpt["rng"][0]["trainer"], ckpt["rng"][1]["trainer"])


# ----------------------------------------------------------------------------
# CUDA: the settings of the gpu preset of benchmarks/paper_table.py (runs where a GPU is present)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_low_precision_channels_last_teacher_and_distill(tmp_path, image_dir, precision):
    """Autocast (and fp16's GradScaler), NHWC and DataLoader workers on CUDA: finite losses, fp32 releases
    whose networks restore images on the GPU, and a student that starts at the teacher's one-step
    prediction up to the precision's rounding."""
    cuda = dict(device="cuda", precision=precision, channels_last=True, workers=2)
    teacher = train_teacher(**teacher_kwargs(tmp_path / "t", image_dir, steps=4, ckpt_every=4, **cuda))
    assert teacher["steps"] == 4 and math.isfinite(teacher["loss"])
    assert f"precision {precision}" in (tmp_path / "t" / "log.txt").read_text()
    student = distill(**distill_kwargs(tmp_path / "d", teacher["release"], steps=2, **cuda))
    assert student["steps"] == 2 and math.isfinite(student["loss_theta"]) and math.isfinite(student["loss_phi"])
    assert all(math.isfinite(s["loss_theta"]) and math.isfinite(s["loss_phi"]) for s in _stats(tmp_path / "d"))

    t_model, _ = load_teacher(teacher["release"])
    g_model, _ = load_generator(student["release"])
    assert all(p.dtype == torch.float32 for p in g_model.parameters())
    t_model, g_model = t_model.cuda(), g_model.cuda()
    xT = torch.rand(4, 3, 16, 16, device="cuda") * 2 - 1
    with torch.no_grad():
        one_step = t_model.predict_x0(xT, t_model.full_time(4, "cuda"))
        out = g_model(xT, torch.randn_like(xT))
    assert out.shape == xT.shape and torch.isfinite(out).all()
    # two generator steps at lr 1e-4 move the student by little from its initialisation
    assert (out - one_step).abs().mean().item() < 0.1
