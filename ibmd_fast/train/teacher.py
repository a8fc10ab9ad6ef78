"""Teacher training by bridge matching (MATH.md 4).

    min_theta  E_{(x0, xT), t, x_t} lambda(t) || x0_hat_theta(x_t, t [, xT]) - x0 ||^2

with ``t ~ bridge.sample_t``, ``x_t = bridge.q_sample(x0, xT, t)`` (the fused bridge step)
and ``lambda = bridge.loss_weight``, through the fused ``ops.bridge_loss``.

Loss scale. The weights are used as they are, not normalized: for I2SB,
``lambda(t) = 1/std_fwd[t]^2`` turns the x0-space error into exactly I2SB's eps-loss
``|| net - (x_t - x0)/std_fwd[t] ||^2`` (MATH.md 2a), and for the VP bridge
``1/c_out^2`` is a unit weight on the raw network output (MATH.md 2b). Either way the loss
and its gradient are O(1) per element at every t, so the learning rates of the released
I2SB / DDBM code (1e-4 .. 5e-5) and ours carry over. (Dividing by the mean weight over
the schedule would instead shrink the I2SB loss by ~1e2 and the effective learning rate
with it.)

Inpainting: the hole of ``xT`` is filled with Gaussian noise (``restore.fill_hole``) in
training as in sampling, and the loss is taken over the hole only, as I2SB (prediction and
label times the mask) and DDBM (``training_bridge_losses``: squared error times the mask) do:
``w_b * sum_i m_bi (x0_hat - x0)_bi^2 / D`` with D all elements (``ops.bridge_loss(mask=...)``),
so their learning rates carry over. The known pixels are copied from ``xT`` at sampling time.

Outputs in ``run_dir``: ``config.json``, ``stats.jsonl``, ``log.txt``,
``samples-<step>.png`` (columns: corrupted | teacher | clean, from the held-out split),
``checkpoints/ckpt-<step>.pt`` and, at the end, the release ``teacher.safetensors`` (EMA
weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ibmd_fast import ops
from ibmd_fast.bridges import I2SBBridge, VEBridge, VPBridge
from ibmd_fast.data import Degradation, get_degradation, make_dataset
from ibmd_fast.imageio import save_grid
from ibmd_fast.models import CONFIGS, Teacher, build_unet
from ibmd_fast.ops import draw_seed
from ibmd_fast.release import TEACHER_FORMAT, save_release
from ibmd_fast.known_pixels import fill_hole
from ibmd_fast.models.unet import check_image_size
from ibmd_fast.restore import default_teacher_nfe, sample_teacher
from ibmd_fast.seeds import derive_seed
from ibmd_fast.train import distributed
from ibmd_fast.train.batches import BatchStream, first_items, shared_dataset, to_device
from ibmd_fast.train.common import Meter, Precision, as_config, fmt_value
from ibmd_fast.train.ema import EMA
from ibmd_fast.train.loop import TrainingTask, run_training
from ibmd_fast.train.optim import OptimizerStep, make_adamw
from ibmd_fast.train.preflight import check_device, check_settings
from ibmd_fast.train.rundir import RunLog

__all__ = ["TeacherConfig", "train_teacher", "make_bridge", "TeacherTask"]

GRID_ITEMS = 8  # pictures per sample grid


@dataclass
class TeacherConfig:
    """Every setting of ``train_teacher``, with its default."""

    run_dir: str = "runs/teacher"  # config.json, stats.jsonl, log.txt, samples, checkpoints, release
    data: str = "skimage"  # data spec (make_dataset): skimage, fashion-mnist[:dir], folder:dir, paired:a,b
    degradation: str = "sr4x-bicubic"  # how xT is made from x0 (ibmd_fast.data.DEGRADATIONS)
    masks: str = ""  # mask file of inpaint-freeform* (Palette's / I2SB's .npz); "" = none
    image_size: int = 32  # training resolution
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    bridge: str = "i2sb"  # "i2sb" | "vp" | "ve" (DDBM's VE bridge, sigma in [0.002, 80])
    beta_max: float = 0.3  # I2SB: 0.3 for super-resolution and JPEG, 1.0 for inpainting
    n_steps: int = 1000  # I2SB: discrete steps of the bridge
    conditional: bool = False  # feed xT to the network (channel concat)
    arch: str = "tiny"  # U-Net configuration name (ibmd_fast.models.CONFIGS)
    batch_size: int = 16  # global batch (split over ranks)
    lr: float = 2e-4  # AdamW learning rate (constant)
    steps: int = 2000  # optimizer steps
    ema_decay: float = 0.999  # EMA of the weights (with a (1+n)/(10+n) warm-up); the release is the EMA
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast on CUDA only; fp16 with GradScaler)
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the network
    fused_adam: bool = False  # torch's fused AdamW; its step is guarded on the device (no host sync)
    checkpoint_activations: bool = False  # recompute U-Net block activations in backward: memory for time
    seed: int = 0  # seeds the weights, the data order and each rank's noise (from seed, rank)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader workers per rank
    log_every: int = 50  # steps between stats.jsonl lines / log lines
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 3  # newest checkpoints kept
    sample_every: int = 0  # write a PNG grid every N steps (0: only at the end)
    sample_nfe: int = 0  # NFE of the sample grids and of the release (0: 100, at most n_steps - 1)
    resume: str = "auto"  # "auto" (newest complete checkpoint in run_dir) | "none" | path to a checkpoint
    allow_config_change: bool = False  # resume even when --batch-size / --lr differ from the checkpoint's
    progress: bool = True  # tqdm (auto-quiet when stderr is not a TTY)

    def validate(self) -> Degradation:
        """Check the settings; returns their degradation, built here once (the trainer uses this one:
        a free-form mask file is read once)."""
        if self.bridge not in ("i2sb", "vp", "ve"):
            raise ValueError(f"--bridge must be i2sb, vp or ve, got {self.bridge}")
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        for name in ("image_size", "batch_size", "log_every", "ckpt_every", "keep_ckpts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("steps", "sample_every", "sample_nfe", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        try:
            make_bridge(self)  # a --beta-max that overflows the schedule, NaN or Inf
        except ValueError as exc:
            raise ValueError(f"--beta-max {self.beta_max}: {exc}") from None
        degradation = get_degradation(self.degradation, masks=self.masks or None)  # unknown names, missing masks
        if self.arch in CONFIGS:
            check_image_size(
                CONFIGS[self.arch]["channel_mult"],
                self.image_size,
                self.image_size,
                f"--image-size {self.image_size}",
                f"the {self.arch} U-Net",
            )
        try:
            degradation.check_size(self.image_size, self.image_size)
        except ValueError as exc:
            raise ValueError(f"--image-size {self.image_size}: {exc}") from None
        return degradation


# Settings a checkpoint must share with the run that resumes it (the rest may change, e.g. steps, lr).
_MODEL_KEYS = ("arch", "image_size", "channels", "bridge", "beta_max", "n_steps", "conditional", "degradation")
# Training options a resumed run keeps unless --allow-config-change.
_TRAINING_KEYS = ("batch_size", "lr")


def make_bridge(cfg: TeacherConfig):
    """The bridge of MATH.md 2a (I2SB), 2b (VP) or DDBM's VE that ``cfg`` names."""
    if cfg.bridge == "i2sb":
        return I2SBBridge(n_steps=cfg.n_steps, beta_max=cfg.beta_max)
    return VEBridge() if cfg.bridge == "ve" else VPBridge()


def train_teacher(cfg: Optional[TeacherConfig] = None, **overrides) -> dict:
    """Train a bridge teacher (MATH.md 4). ``cfg`` fields may also be given as keywords.

    Returns ``{"run_dir", "release", "steps", "loss", "skipped", "seconds"}``. Under torchrun,
    every rank calls it; rank 0 writes the files.
    """
    cfg = as_config(TeacherConfig, cfg, overrides)
    degradation = cfg.validate()
    check_device(cfg.device)
    check_settings(steps=cfg.steps, data=cfg.data, image_size=cfg.image_size)
    return run_training(cfg, lambda env, log, precision: TeacherTask(cfg, degradation, env, log, precision))


class TeacherTask(TrainingTask):
    """Bridge matching (MATH.md 4) as a task of ``loop.run_training``: the teacher, its EMA, AdamW and
    the guard; one optimizer step per training step; the release is the EMA teacher."""

    kind = "teacher"
    model_keys = _MODEL_KEYS
    training_keys = _TRAINING_KEYS
    last_keys = ("loss",)

    def __init__(
        self, cfg: TeacherConfig, degradation: Degradation, env: distributed.DistEnv, log: RunLog, precision: Precision
    ):
        self.cfg, self.env, self.log, self.precision = cfg, env, log, precision
        self.device = device = env.device
        if env.is_main:
            log(
                f"train-teacher: {cfg.bridge} bridge, {cfg.degradation}, data {cfg.data!r}, {cfg.image_size}px, "
                f"arch {cfg.arch}, {env.world_size} process(es) on {device}, precision {precision.name}"
            )

        # Data: (x0, xT[, mask]) pairs; the held-out split only feeds the sample grids.
        self.degradation = degradation
        self.dataset = shared_dataset(
            lambda listing: make_dataset(
                cfg.data,
                degradation,
                size=cfg.image_size,
                channels=cfg.channels,
                split="train",
                seed=cfg.seed,
                listing=listing,
            ),
            env,
            cfg.run_dir,
        )
        self.inpainting = degradation.is_inpainting

        # Model: the same initial weights on every rank.
        self.bridge = make_bridge(cfg)
        torch.manual_seed(cfg.seed)
        in_channels = cfg.channels * (2 if cfg.conditional else 1)
        net = build_unet(cfg.arch, cfg.image_size, in_channels, cfg.channels)
        self.teacher = Teacher(net, self.bridge, conditional=cfg.conditional).to(device).train()
        if cfg.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.teacher.net.set_activation_checkpointing(cfg.checkpoint_activations)
        self.ema = EMA(self.teacher, cfg.ema_decay)
        self.optimizer = make_adamw(self.teacher.parameters(), cfg.lr, fused=cfg.fused_adam)
        self.scaler = precision.scaler()
        self.step_fn = OptimizerStep(
            "teacher", self.optimizer, list(self.teacher.parameters()), self.scaler, cfg.grad_clip, env
        )
        self.guards = {"skipped": self.step_fn}
        self.learning_rates = [(self.optimizer, cfg.lr)]
        self.sample_nfe = cfg.sample_nfe or default_teacher_nfe(self.bridge)
        self.grid_batch = _grid_batch(cfg, degradation) if env.is_main else None
        self.release = os.path.join(cfg.run_dir, "teacher.safetensors")
        self.model = self.teacher

        # Noise: this rank's generator (t, bridge noise seeds, hole fill); the loop seeds the global
        # generators (dropout, if any) after this, so a resumed run restores both exactly.
        self.rng = torch.Generator().manual_seed(derive_seed(cfg.seed, env.rank, 1))

    def state_objects(self) -> dict:
        return {
            "teacher": self.teacher,
            "ema": self.ema,
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "guard": self.step_fn,
        }

    def prepare(self) -> None:
        if self.cfg.compile:
            self.teacher.net.compile()
        self.model = distributed.wrap_ddp(self.teacher, self.env)

    def step(self, stream: BatchStream, meter: Meter) -> None:
        cfg, bridge = self.cfg, self.bridge
        batch = to_device(stream.next(), self.device, cfg.channels_last)
        x0, xT, mask = batch["x0"], batch["xT"], batch.get("mask")
        if self.inpainting:
            xT = fill_hole(xT, mask, draw_seed(self.rng))
        # Bridge matching (MATH.md 4): t, x_t ~ q(x_t | x0, xT), weighted x0 regression.
        t = bridge.sample_t(x0.shape[0], rng=self.rng).to(self.device)
        x_t = bridge.q_sample(x0, xT, t, seed=draw_seed(self.rng))
        with self.precision.autocast():
            x0_hat = self.model(x_t, t, xT if cfg.conditional else None)
        loss = ops.bridge_loss(
            x0_hat.float(), x0.float(), bridge.loss_weight(t), mask=mask if self.inpainting else None
        ).mean()
        loss_value, grad_norm, stepped = self.step_fn(loss)
        self.ema.update(self.teacher, when=stepped)  # a device tensor with fused AdamW: no sync
        meter.add(loss=loss_value, grad_norm=grad_norm)

    def stats(self, means: dict) -> dict:
        return {
            "loss": means.get("loss"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": means.get("grad_norm"),
        }

    def log_line(self, row: dict) -> str:
        return (
            f"step {row['step']:7d}  loss {fmt_value(row['loss'])}  grad {fmt_value(row['grad_norm'])}  "
            f"{row['it_per_s']:.2f} it/s  skipped {row['skipped']}"
        )

    def write_samples(self, step: int) -> None:
        _write_samples(self.cfg, self.ema.module, self.grid_batch, step, self.sample_nfe, self.precision, self.device)

    def finish(self, step: int, last: dict) -> dict:
        if self.env.is_main:
            cfg = self.cfg
            self.write_samples(step)
            save_release(
                self.release,
                self.ema.module.net,
                TEACHER_FORMAT,
                {
                    "unet": self.ema.module.net.config,
                    "conditional": cfg.conditional,
                    "bridge": self.bridge.config(),
                    "nfe": self.sample_nfe,
                    "degradation": self.degradation.name,
                    "image_size": cfg.image_size,
                    "channels": cfg.channels,
                    "data": cfg.data,
                },
                extra={"step": step, **last},
            )
            self.log(f"teacher release: {self.release}")
        return {}


def _grid_batch(cfg: TeacherConfig, degradation: Degradation) -> Optional[dict]:
    """Fixed pictures for the sample grids: the first items of the held-out split."""
    try:
        data = make_dataset(
            cfg.data, degradation, size=cfg.image_size, channels=cfg.channels, split="test", seed=cfg.seed
        )
    except (ValueError, FileNotFoundError):
        return None
    return first_items(data, GRID_ITEMS)


def _write_samples(cfg, teacher, batch, step, nfe, precision, device) -> None:
    if batch is None:
        return
    xT = batch["xT"].to(device)
    mask = batch.get("mask")
    mask = None if mask is None else mask.to(device)
    out = sample_teacher(teacher, xT, nfe, mask, seed=cfg.seed, autocast=precision.autocast)
    save_grid(
        [xT, out, batch["x0"]],
        os.path.join(cfg.run_dir, f"samples-{step}.png"),
        titles=["corrupted", f"teacher NFE {nfe}", "clean"],
    )
