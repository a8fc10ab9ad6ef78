"""The one training loop (ibmd_fast/train/loop.py) gives the teacher trainer what the distiller had:
fused AdamW with the device-side guard, activation checkpointing; and each trainer builds its
degradation once (a free-form mask file is read once).

On CPU with the tiny U-Net at 16 px, one thread.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import teacher_kwargs
from ibmd_fast.release import read_release
from ibmd_fast.train import TeacherConfig, TrainingDivergedError, distill, train_teacher
from ibmd_fast.train.common import Precision
from ibmd_fast.train.distributed import DistEnv
from ibmd_fast.train.rundir import RunLog
from ibmd_fast.train.teacher import TeacherTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}"
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a!r} vs {b!r}"


def test_teacher_options_reach_the_optimizer_guard_and_network(tmp_path, image_dir):
    cfg = TeacherConfig(**teacher_kwargs(tmp_path, image_dir, fused_adam=True, checkpoint_activations=True))
    env = DistEnv()
    task = TeacherTask(cfg, cfg.validate(), env, RunLog(str(tmp_path), env, quiet=True), Precision("fp32", env.device))
    assert task.optimizer.defaults.get("fused") is True and task.step_fn.on_device
    blocks = [m for m in task.teacher.net.modules() if hasattr(m, "use_checkpoint") and m is not task.teacher.net]
    assert blocks and all(m.use_checkpoint for m in blocks)
    plain = TeacherTask(
        TeacherConfig(**teacher_kwargs(tmp_path, image_dir)),
        cfg.validate(),
        env,
        RunLog(str(tmp_path), env, quiet=True),
        Precision("fp32", env.device),
    )
    assert not plain.optimizer.defaults.get("fused") and not plain.step_fn.on_device
    assert not any(m.use_checkpoint for m in plain.teacher.net.modules() if hasattr(m, "use_checkpoint"))


def test_teacher_with_fused_adam_and_checkpointing_resumes_bit_identically(tmp_path, image_dir):
    """A teacher run on the fused optimizer (guard on the device) and activation checkpointing, stopped at its
    step-2 checkpoint and resumed, ends in the very state and release of an uninterrupted run."""
    levers = dict(fused_adam=True, checkpoint_activations=True)
    whole = train_teacher(**teacher_kwargs(tmp_path / "whole", image_dir, **levers))
    train_teacher(**teacher_kwargs(tmp_path / "cut", image_dir, **{**levers, "steps": 2}))
    resumed = train_teacher(**teacher_kwargs(tmp_path / "cut", image_dir, **levers))
    assert whole["steps"] == resumed["steps"] == 4 and whole["skipped"] == resumed["skipped"] == 0
    assert whole["loss"] == resumed["loss"] and whole["loss"] is not None

    def state(run):
        return torch.load(tmp_path / run / "checkpoints" / "ckpt-4.pt", weights_only=True)["state"]

    _same(state("whole"), state("cut"))
    assert state("cut")["ema"]["num_updates"] == 4
    _same(read_release(whole["release"])[0], read_release(resumed["release"])[0])


def test_teacher_divergence_on_the_device_guard_stops_at_a_log_step(tmp_path, image_dir, monkeypatch):
    """With fused AdamW the teacher's guard counts non-finite steps on the device; the loop reads it at the
    next log step after the 20th in a row and stops there, with the error in log.txt."""
    from ibmd_fast.train import teacher as teacher_module

    real_loss = teacher_module.ops.bridge_loss
    monkeypatch.setattr(teacher_module.ops, "bridge_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=40, log_every=25, ckpt_every=100, fused_adam=True)
    with pytest.raises(TrainingDivergedError, match="25 consecutive non-finite teacher"):
        train_teacher(**kwargs)
    log = (tmp_path / "log.txt").read_text()
    assert "error at step 25: training diverged" in log
    assert not (tmp_path / "teacher.safetensors").exists()


def test_each_trainer_reads_a_freeform_mask_file_once(tmp_path, image_dir, monkeypatch):
    """The degradation is built once per run (the config check's object is the trainer's): the free-form
    mask file is read once by train_teacher and once by distill (which takes the degradation from the
    teacher release)."""
    from ibmd_fast.data import i2sb_corruptions

    masks = tmp_path / "imagenet_freeform1020_masks.npz"
    np.savez(masks, mask=(np.random.default_rng(1).random((5, 16, 16)) < 0.15).astype(np.uint8))
    reads = []
    real_init = i2sb_corruptions.FreeformMasks.__init__

    def counting(self, path, ratio):
        reads.append(str(path))
        real_init(self, path, ratio)

    monkeypatch.setattr(i2sb_corruptions.FreeformMasks, "__init__", counting)
    teacher = train_teacher(
        **teacher_kwargs(
            tmp_path / "teacher",
            image_dir,
            degradation="inpaint-freeform1020",
            masks=str(masks),
            beta_max=1.0,
            steps=1,
            ckpt_every=1,
        )
    )
    assert reads == [str(masks)]
    reads.clear()
    distill(
        run_dir=str(tmp_path / "distill"),
        teacher=teacher["release"],
        masks=str(masks),
        batch_size=4,
        steps=1,
        inner_steps=1,
        log_every=1,
        ckpt_every=1,
        eval_items=0,
        device="cpu",
        progress=False,
    )
    assert reads == [str(masks)]
