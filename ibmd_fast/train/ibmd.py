"""Inverse Bridge Matching Distillation (MATH.md 5, Algorithm 1 of arXiv 2502.01362).

    min_theta { E lambda(t) || x0_hat*(x_t, t) - x0 ||^2  -  min_phi E lambda(t) || x0_hat_phi(x_t, t) - x0 ||^2 }
    x0 = G_theta(xT, z),  t ~ U,  x_t ~ q(x_t | x0, xT)

The teacher ``x0_hat*`` is frozen. The fake bridge model ``phi`` and the generator ``G``
both start as copies of the teacher (``make_fake_model``; ``Generator`` with a zero-init
noise input, so at step 0 ``G(xT, z)`` is the teacher's one-step prediction at T).
For k = 1..K (``IBMD.fake_step`` and ``IBMD.generator_step``):

1. L times: fresh xT, z; ``x0 = G(xT, z)`` without gradient; t; ``x_t = q_sample(x0, xT, t)``;
   ``loss_phi = mean lambda(t) ||x0_hat_phi(x_t, t) - x0||^2`` (``ops.bridge_loss``); step phi.
2. Once: fresh xT, z, t; ``x0 = G(xT, z)`` WITH gradient; ``x_t = q_sample(x0, xT, t)`` (the
   fused bridge step is differentiable in x0); ``loss_theta = mean lambda(t)
   (||x0_hat*(x_t,t) - x0||^2 - ||x0_hat_phi(x_t,t) - x0||^2)`` (``ops.ibmd_loss``); step theta.
   The gradient reaches theta through x0 directly and through x_t via both networks, whose
   parameters are frozen for this step (the fake model's are toggled off, so it gets no
   gradient and DDP never sees it).

Only corrupted images are read: the training data is ``make_dataset(..., corrupted_only=True)``.
Conditional teachers see ``xT`` (teacher, fake model and generator alike). A class-conditional
teacher (``num_classes``, e.g. DBIM's ImageNet inpainting one) needs labelled data (``classes:DIR``):
each batch's ``"label"`` goes, as ``y``, to every call of the teacher, the fake model and the
generator (copies of the teacher's network: the same label embedding, the same argument). Inpainting
students predict the hole only (``Generator(mask=...)``); ``xT``'s hole is noise-filled, and
both losses are taken over the hole only (the ``mask`` of ``ops.bridge_loss`` / ``ops.ibmd_loss``,
normalised by all D elements as I2SB and DDBM do): a released inpainting teacher was never trained
on the known pixels, so its errors there would send noise into the hole through x_t.

In step 2 both frozen networks, teacher and fake model, are evaluated the same way, in
``eval()`` mode (dropout off; DDBM teachers use dropout 0.1), so the loss difference compares
the two bridge models, not two dropout draws; the fake model trains in ``train()`` mode in step 1.

Multi-step students (``nfe = k > 1``, MATH.md 5), on the grid ``t_1 < ... < t_k = T``
(``restore.student_grid``), two ways (``multistep``; ``IBMD.generate``), both running the
student's OWN chain from ``xT`` exactly as at inference (``x0~ = G(x_{t_m}, z, t_m)``, posterior
step to ``t_{m-1}``):

- ``random-stop`` (the default; the paper's DDBM students, Appendix B.2): each draw picks ``n``
  uniformly in 1..k (one per batch), runs the chain without gradient for m = k..n+1, then
  ``x0 = G(x_{t_n}, z, t_n)`` (with gradient in step 2). Every grid point trains on the states
  the sampler visits.
- ``full`` (the paper's I2SB students, Appendix B.1): ``x0`` is the chain's end ``G(x_{t_1}, z,
  t_1)``, and in step 2 the gradient flows back through all k calls and posterior steps.

A recipe (``--recipe``, ``train/recipes.py``) sets the paper's choice with its other settings.

At the end: the EMA generator is released as ``generator.safetensors`` and, with
``eval_items > 0``, compared with the teacher on held-out clean/corrupted pairs (PSNR,
SSIM, seconds per image, with the corrupted input as the first row; ``comparison.json``) and on
a whole held-out photograph (``comparison.png``, ``train/report.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from dataclasses import dataclass
from typing import Optional

import torch

from ibmd_fast import ops
from ibmd_fast.data import LAYOUTS, Degradation, canonical_name, collate, get_degradation, make_dataset
from ibmd_fast.imageio import save_grid
from ibmd_fast.models import Generator, make_fake_model
from ibmd_fast.ops import draw_seed
from ibmd_fast.paths import DEFAULT_TEACHER
from ibmd_fast.release import GENERATOR_FORMAT, ReleaseError, load_teacher, read_release, save_release
from ibmd_fast.known_pixels import fill_hole, noise_like
from ibmd_fast.models.unet import check_image_size, size_multiple
from ibmd_fast.restore import SeededNoise, default_teacher_nfe, sample_student, student_chain, student_grid
from ibmd_fast.seeds import derive_seed
from ibmd_fast.train import distributed, report
from ibmd_fast.train.batches import BatchStream, first_items, shared_dataset, to_device
from ibmd_fast.train.common import Meter, Precision, as_config, config_dict, fmt_value
from ibmd_fast.train.ema import EMA
from ibmd_fast.train.loop import TrainingTask, run_training
from ibmd_fast.train.optim import OptimizerStep, make_adamw
from ibmd_fast.train.preflight import check_device, check_settings
from ibmd_fast.train.recipes import MULTISTEP_MODES, apply_recipe, get_recipe
from ibmd_fast.train.rundir import RunLog, write_text

__all__ = ["DistillConfig", "distill", "recipe_config", "IBMD", "DistillTask"]

GRID_ITEMS = 8
# More restorations of comparison.png's photo, each with its own noise, to say how far its one draw's
# PSNR is typical (comparison-photo.json's "draws"; report.photo_comparison)
PHOTO_DRAWS = 8


@dataclass
class DistillConfig:
    """Every setting of ``distill``, with its default."""

    run_dir: str = "runs/distill"  # config.json, stats.jsonl, log.txt, samples, checkpoints, release
    teacher: str = ""  # teacher release (.safetensors); "" = ibmd_fast/assets/teacher-inpaint.safetensors
    data: str = ""  # data spec (corrupted:dir suffices); "" = the one in the teacher release
    degradation: str = ""  # "" = from the teacher release
    masks: str = ""  # mask file of inpaint-freeform* (Palette's / I2SB's .npz); "" = none
    image_size: int = 0  # 0 = from the teacher release
    nfe: int = 1  # student steps (1 = one-step generator)
    inner_steps: int = 5  # L: fake-model steps per generator step
    steps: int = 200  # K: generator steps (sized with batch_size so that the embedded default
    # distills in < 10 min on a 2-core CPU; the paper: batch 256, a few thousand)
    batch_size: int = 8  # global batch (split over ranks)
    lr: float = 2e-4  # generator learning rate (AdamW, constant); the paper's 5e-5 (--recipe)
    # moves a 200-step default too little: on 64 held-out crops the student
    # reaches 24.34 dB at 2e-4 against 24.05 at 5e-5 (teacher NFE 100: 24.95;
    # benchmarks/results/default-lr-sweep-cpu-2core.json)
    fake_lr: float = 4e-4  # fake-model learning rate: twice the generator's keeps the fake model up with
    # it; on the embedded default (256 held-out crops) FID 0.140 against 0.169 at 2e-4, teacher NFE 100
    # 0.128 (benchmarks/results/default-fake-lr-cpu-2core.json); 5e-4 for both: 23.46 dB at 100 steps
    ema_decay: float = 0.99  # EMA of the generator (with a (1+n)/(10+n) warm-up); the release is the EMA
    grad_clip: float = 1.0  # max gradient norm for both networks; 0 = off
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast on CUDA only; fp16 with GradScaler)
    channels_last: bool = False  # NHWC memory format
    compile: bool = False  # torch.compile the three networks
    fused_adam: bool = False  # torch's fused AdamW; its step is guarded on the device (no host sync)
    checkpoint_activations: bool = False  # recompute U-Net block activations in backward: memory for time
    seed: int = 0  # seeds the data order and each rank's noise (from seed, rank)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader workers per rank
    log_every: int = 10  # generator steps between stats.jsonl lines / log lines
    ckpt_every: int = 100  # generator steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 3  # newest checkpoints kept
    sample_every: int = 0  # write a PNG grid every N generator steps (0: only at the end)
    resume: str = "auto"  # "auto" (newest complete checkpoint in run_dir) | "none" | path to a checkpoint
    allow_config_change: bool = False  # resume even when --batch-size / --lr / --fake-lr / --inner-steps differ
    progress: bool = True  # tqdm (auto-quiet when stderr is not a TTY)
    eval_items: int = 16  # held-out items for the end-of-run comparison (0 = skip)
    eval_teacher_nfe: tuple = (1, 10, 100)  # teacher NFEs in that comparison
    recipe: str = ""  # the paper's settings for a task (train/recipes.py); "" = none
    multistep: str = "random-stop"  # how a k-NFE student trains: "full" chain (I2SB, B.1) | "random-stop" (DDBM, B.2)
    noise_input: bool = True  # the student takes noise z (zero-initialized extra input channels)

    def validate(self, degradation: Optional[Degradation] = None) -> Optional[Degradation]:
        """Check the settings; returns the degradation they name (None: none named), built here once for
        the trainer (a free-form mask file is read once). ``degradation``: that object, already built
        from these settings by an earlier check (``distill`` checks before and after filling settings
        from the teacher release), is not built again."""
        for name in ("nfe", "inner_steps", "batch_size", "log_every", "ckpt_every", "keep_ckpts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("steps", "sample_every", "eval_items", "workers", "image_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.fake_lr > 0):
            raise ValueError(f"--lr and --fake-lr must be positive, got {self.lr}, {self.fake_lr}")
        if self.degradation and degradation is None:
            degradation = get_degradation(self.degradation, masks=self.masks or None)
        if self.multistep not in MULTISTEP_MODES:
            raise ValueError(f"--multistep must be one of {', '.join(MULTISTEP_MODES)}, got {self.multistep!r}")
        if self.recipe:
            get_recipe(self.recipe)
        return degradation if self.degradation else None


# Settings a checkpoint must share with the run that resumes it.
_MODEL_KEYS = ("teacher_unet", "bridge", "conditional", "nfe", "image_size", "channels", "degradation")
# Training options a resumed run keeps unless --allow-config-change.
_TRAINING_KEYS = ("batch_size", "lr", "fake_lr", "inner_steps")


def _opmath(x: torch.Tensor) -> torch.Tensor:
    """Network outputs in the losses' arithmetic dtype: float32 (from autocast's half), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


class IBMD:
    """The three networks, their optimizers and the two phases of Algorithm 1 (MATH.md 5).

    ``teacher`` is frozen here. ``fake`` (phi) and ``generator`` (G_theta) are built from it.
    ``fake_step(batch)`` is phase 1 (run it L times), ``generator_step(batch)`` phase 2; each
    returns ``(loss, grad_norm, stepped)``. ``noise`` is this rank's generator of t, z and the
    bridge noise seeds.
    """

    def __init__(
        self,
        teacher,
        cfg: DistillConfig,
        env: distributed.DistEnv,
        precision: Precision,
        inpainting: bool = False,
        class_conditional: bool = False,
    ):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.precision = precision
        self.inpainting = inpainting
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.bridge = teacher.bridge
        self.conditional = bool(teacher.conditional)
        # the batches' "label" goes to every network call (y); the teacher must take labels then
        self.class_conditional = bool(class_conditional)
        if self.class_conditional and teacher.num_classes is None:
            raise ValueError("class_conditional needs a class-conditional teacher (net.num_classes)")
        self.nfe = int(cfg.nfe)
        self.grid = student_grid(self.bridge, self.nfe).tolist()  # t_1 < ... < t_k = T

        self.fake = make_fake_model(self.teacher).to(self.device).train()
        self.generator = (
            Generator(self.teacher, z_channels=None if cfg.noise_input else 0, multistep=self.nfe > 1)
            .to(self.device)
            .train()
        )
        self.full_chain = cfg.multistep == "full"
        if cfg.channels_last:
            for m in (self.teacher, self.fake, self.generator):
                m.to(memory_format=torch.channels_last)
        for m in (self.teacher, self.fake, self.generator):
            m.net.set_activation_checkpointing(cfg.checkpoint_activations)
        self.ema = EMA(self.generator, cfg.ema_decay)
        self.gen_opt = make_adamw(self.generator.parameters(), cfg.lr, fused=cfg.fused_adam)
        self.fake_opt = make_adamw(self.fake.parameters(), cfg.fake_lr, fused=cfg.fused_adam)
        self.gen_scaler = precision.scaler()
        self.fake_scaler = precision.scaler()
        self.gen_guard = OptimizerStep(
            "generator", self.gen_opt, list(self.generator.parameters()), self.gen_scaler, cfg.grad_clip, env, "--lr"
        )
        self.fake_guard = OptimizerStep(
            "fake-model", self.fake_opt, list(self.fake.parameters()), self.fake_scaler, cfg.grad_clip, env, "--fake-lr"
        )
        self.rng = torch.Generator().manual_seed(derive_seed(cfg.seed, env.rank, 1))
        self.gen_ddp = self.generator
        self.fake_ddp = self.fake

    def prepare(self) -> None:
        """Compile and DDP-wrap (after any checkpoint is loaded into the plain modules)."""
        if self.cfg.compile:
            for m in (self.teacher, self.fake, self.generator):
                m.net.compile()
        self.gen_ddp = distributed.wrap_ddp(self.generator, self.env)
        self.fake_ddp = distributed.wrap_ddp(self.fake, self.env)

    def state_objects(self) -> dict:
        return {
            "generator": self.generator,
            "fake": self.fake,
            "ema": self.ema,
            "gen_optimizer": self.gen_opt,
            "fake_optimizer": self.fake_opt,
            "gen_scaler": self.gen_scaler,
            "fake_scaler": self.fake_scaler,
            "gen_guard": self.gen_guard,
            "fake_guard": self.fake_guard,
        }

    # -- pieces of Algorithm 1

    def corrupted(self, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """xT (hole noise-filled for inpainting), the mask and the class labels ``y`` (a class-conditional
        teacher; else None), on the device."""
        batch = to_device(batch, self.device, self.cfg.channels_last)
        xT, mask = batch["xT"], batch.get("mask")
        if self.inpainting and mask is not None:
            xT = fill_hole(xT, mask, draw_seed(self.rng))
        y = None
        if self.class_conditional:
            if "label" not in batch:
                raise ValueError('a class-conditional teacher needs a "label" in every batch')
            y = batch["label"].long()
        return xT, (mask if self.inpainting else None), y

    def generate(
        self,
        xT: torch.Tensor,
        z: torch.Tensor,
        mask: Optional[torch.Tensor],
        grad: bool,
        y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x0 from the student: ``G(xT, z)``, or for k > 1 the student's own chain (``multistep``).

        In MATH.md 5 terms, with the grid ``t_1 < ... < t_k = T`` and ``x_{t_k} = xT``: for m = k, k-1, ...,
        ``x0~ = G_theta(x_{t_m}, z, t_m)`` and ``x_{t_{m-1}}`` is the posterior step (MATH.md 3) from
        ``x_{t_m}`` with ``x0~`` in place of x0. The chain is inference's (``restore.student_chain``).

        - ``multistep = "random-stop"`` (DDBM teachers, Appendix B.2; DMD's choice): ``n ~ U{1..k}``,
          the chain stops at ``x0 = G_theta(x_{t_n}, z, t_n)``. The calls before it run WITHOUT
          gradient: ``x_{t_n}`` is a sample of the student's own inference distribution at
          ``t_n``, treated as data (stop-gradient), so ``d loss/d theta`` is taken through the last
          call only. That call (with ``grad``) goes through the DDP wrapper.
        - ``multistep = "full"`` (I2SB teachers, Appendix B.1): always n = 1, ``x0`` is the output of
          the whole k-call chain, the student's sample itself; with ``grad`` the gradient flows
          through every call and every posterior step (``ops.bridge_step`` is differentiable in
          ``x_t`` and ``x0~``). Only the last call goes through the DDP wrapper (its forward arms
          the reducer once; the earlier calls' gradients reach the same parameters before their
          hooks fire, so the all-reduce holds the whole chain's gradient).

        ``y``: the class labels of a class-conditional student, given to every call.
        """
        if self.nfe == 1 or self.full_chain:
            n = 1
        else:
            n = int(torch.randint(1, self.nfe + 1, (), generator=self.rng))
        model = self.gen_ddp if grad else self.generator
        with contextlib.nullcontext() if grad else torch.no_grad():
            return student_chain(
                self.generator,
                xT,
                z,
                self.nfe,
                mask=mask,
                noise=SeededNoise(self.rng),
                stop=n,
                last_call=model,
                autocast=self.precision.autocast,
                grid=self.grid,
                grad_chain=self.full_chain,
                y=y,
            )

    def fake_step(self, batch: dict) -> tuple[float, float, bool]:
        """Algorithm 1, step 1 (one of the L): bridge matching of phi on the generator's samples."""
        xT, mask, y = self.corrupted(batch)
        z = noise_like(xT, draw_seed(self.rng))
        x0 = self.generate(xT, z, mask, grad=False, y=y)
        t = self.bridge.sample_t(xT.shape[0], rng=self.rng).to(self.device, non_blocking=True)
        x_t = self.bridge.q_sample(x0, xT, t, seed=draw_seed(self.rng))
        with self.precision.autocast():
            x0_fake = self.fake_ddp(x_t, t, xT if self.conditional else None, y)
        loss = ops.bridge_loss(_opmath(x0_fake), x0, self.bridge.loss_weight(t), mask=mask).mean()
        return self.fake_guard(loss)

    def generator_step(self, batch: dict) -> tuple[float, float, bool]:
        """Algorithm 1, step 2: the IBMD loss, backpropagated through x_t into the generator."""
        xT, mask, y = self.corrupted(batch)
        z = noise_like(xT, draw_seed(self.rng))
        cond = xT if self.conditional else None
        self.fake.requires_grad_(False)  # phi is a fixed function in this step,
        self.fake.eval()  # evaluated as the teacher is (dropout off)
        try:
            x0 = self.generate(xT, z, mask, grad=True, y=y)
            t = self.bridge.sample_t(xT.shape[0], rng=self.rng).to(self.device, non_blocking=True)
            x_t = self.bridge.q_sample(x0, xT, t, seed=draw_seed(self.rng))  # differentiable in x0
            with self.precision.autocast():
                x0_teacher = self.teacher.predict_x0(x_t, t, cond, y=y)
                x0_fake = self.fake.predict_x0(x_t, t, cond, y=y)  # the plain module: no DDP hooks
            loss = ops.ibmd_loss(
                _opmath(x0_teacher), _opmath(x0_fake), x0, self.bridge.loss_weight(t), mask=mask
            ).mean()
            result = self.gen_guard(loss)
        finally:
            self.fake.requires_grad_(True)
            self.fake.train()
        self.ema.update(self.generator, when=result[2])  # a device tensor with fused AdamW: no sync
        return result


def _resolve(
    cfg: DistillConfig, degradation: Optional[Degradation] = None
) -> tuple[DistillConfig, dict, Optional[Degradation]]:
    """Fill the empty settings from the teacher release; returns the config, the release's and the
    degradation (``degradation``: the one ``cfg`` names, built already; None when it names none)."""
    path = cfg.teacher or DEFAULT_TEACHER
    if not os.path.exists(path):
        if not cfg.teacher:
            raise FileNotFoundError(
                f"no teacher given and the embedded default {DEFAULT_TEACHER} is not installed; "
                "train one with `ibmd-fast train-teacher` and pass its teacher.safetensors"
            )
        raise FileNotFoundError(f"teacher release not found: {path}")
    _, tconf, _ = read_release(path, expect="ibmd_fast.teacher")
    if cfg.recipe:
        _check_recipe_teacher(cfg, tconf, path)
    values = {"teacher": path}
    for name, key in (("data", "data"), ("degradation", "degradation"), ("image_size", "image_size")):
        if not getattr(cfg, name):
            if key not in tconf and key == "degradation" and data_layout(values.get("data", cfg.data), tconf):
                continue  # the layout's corrupted side is the input (DIODE's normal maps): no operator makes it
            if key not in tconf:
                raise ReleaseError(f"the teacher release {path} records no {key!r}; pass {name} explicitly")
            values[name] = tconf[key]
    layout = tconf.get("data_layout")
    data = values.get("data", cfg.data)
    if layout and not data_layout(data) and os.path.isdir(os.path.expanduser(data)):
        values["data"] = f"{layout}:{data}"  # a teacher of a DDBM layout reads its folder that way
    resolved = DistillConfig(**{**config_dict(cfg), **values})
    resolved.eval_teacher_nfe = tuple(resolved.eval_teacher_nfe)
    degradation = resolved.validate(degradation)  # a degradation filled from the release is built here
    if "channel_mult" in tconf.get("unet", {}):
        size = resolved.image_size
        check_image_size(tconf["unet"]["channel_mult"], size, size, f"--image-size {size}", "the teacher's U-Net")
    return resolved, tconf, degradation


def data_layout(spec: str, tconf: Optional[dict] = None) -> Optional[str]:
    """The DDBM layout a data spec reads (``edges2handbags:DIR``, ``diode:DIR``), else None; a bare
    folder counts as the layout of the teacher release ``tconf`` when it records one."""
    kind, sep, _ = str(spec or "").partition(":")
    if sep and kind.lower() in LAYOUTS:
        return kind.lower()
    if tconf and tconf.get("data_layout") and spec and os.path.isdir(os.path.expanduser(spec)):
        return tconf["data_layout"]
    return None


def _check_recipe_teacher(cfg: DistillConfig, tconf: dict, path: str) -> None:
    """A recipe is for one kind of teacher: its task (degradation) must be the one the release records."""
    recipe = get_recipe(cfg.recipe)
    task = cfg.degradation or tconf.get("degradation", "")
    if recipe.degradation and task and canonical_name(task) != canonical_name(recipe.degradation):
        raise ValueError(
            f"--recipe {recipe.name} is for {recipe.family.upper()} {recipe.degradation} teachers; "
            f"{path} records degradation {task!r} (pass --degradation to override)"
        )


def recipe_config(name: str, **overrides) -> DistillConfig:
    """A `DistillConfig` for recipe ``name`` with ``overrides`` (keyword arguments) on top."""
    return apply_recipe(DistillConfig(**{**overrides, "recipe": name}), keep=overrides)


def distill(cfg: Optional[DistillConfig] = None, **overrides) -> dict:
    """Distill a teacher release into a generator (MATH.md 5, Algorithm 1).

    ``cfg`` fields may also be given as keywords. With ``recipe`` among them (or in a dict ``cfg``),
    the recipe fills the fields not given (``train/recipes.py``); a ``DistillConfig`` instance is
    taken as it is (``recipe_config`` builds one). Returns ``{"run_dir", "release", "steps",
    "loss_theta", "loss_phi", "skipped", "skipped_fake", "seconds", "comparison"}``, where
    ``comparison`` is a list of ``{"model", "nfe", "psnr", "ssim", "sec_per_image"}``, the corrupted
    input ("corrupted", NFE 0) first (empty when skipped). Under torchrun every rank calls it; rank 0 writes the files.
    """
    if not isinstance(cfg, DistillConfig):  # None or a dict: its keys and the keywords are the explicit settings
        given = set(cfg or {}) | set(overrides)
        cfg = apply_recipe(as_config(DistillConfig, cfg, overrides), keep=given - {"recipe"})
    else:  # a DistillConfig is taken as resolved (the command line applied its recipe)
        cfg = as_config(DistillConfig, cfg, overrides)
    named = cfg.validate()  # before the teacher release is read
    check_device(cfg.device)
    cfg, tconf, degradation = _resolve(cfg, named)
    check_settings(steps=cfg.steps, data=cfg.data, image_size=cfg.image_size)
    return run_training(cfg, lambda env, log, precision: DistillTask(cfg, tconf, degradation, env, log, precision))


class DistillTask(TrainingTask):
    """Algorithm 1 (MATH.md 5) as a task of ``loop.run_training``: an ``IBMD`` whose training step is
    L fake-model steps and one generator step; the release is the EMA generator, then the comparison."""

    kind = "distill"
    model_keys = _MODEL_KEYS
    training_keys = _TRAINING_KEYS
    last_keys = ("loss_theta", "loss_phi")

    def __init__(
        self,
        cfg: DistillConfig,
        tconf: dict,
        degradation: Optional[Degradation],
        env: distributed.DistEnv,
        log: RunLog,
        precision: Precision,
    ):
        self.cfg, self.env, self.log = cfg, env, log
        teacher, _ = load_teacher(cfg.teacher, device=env.device)
        self.channels = channels = int(tconf.get("channels", teacher.image_channels))
        # A DDBM layout (edges2handbags, diode) carries its own corruption; a degradation is optional there.
        if degradation is not None:
            degradation.check_size(cfg.image_size, cfg.image_size)
        self.degradation = degradation
        inpainting = degradation is not None and degradation.is_inpainting
        if env.is_main:
            log(
                f"distill: teacher {cfg.teacher} ({teacher.bridge_type}, "
                f"{'conditional' if teacher.conditional else 'unconditional'}"
                f"{'' if teacher.num_classes is None else f', class-conditional ({teacher.num_classes} classes)'}), "
                f"{degradation.name if degradation else 'the corruption of the data'}, "
                f"data {cfg.data!r}, {cfg.image_size}px, NFE {cfg.nfe}, L={cfg.inner_steps}, K={cfg.steps}, "
                f"{env.world_size} process(es) on {env.device}, precision {precision.name}"
            )

        # Corrupted images only (MATH.md 5): distillation never reads x0.
        self.dataset = shared_dataset(
            lambda listing: make_dataset(
                cfg.data,
                degradation,
                size=cfg.image_size,
                channels=channels,
                split="train",
                corrupted_only=True,
                seed=cfg.seed,
                listing=listing,
            ),
            env,
            cfg.run_dir,
        )
        class_conditional = _check_labels(cfg, teacher, _data_labels(self.dataset), log if env.is_main else None)
        self.grid_batch = first_items(self.dataset, GRID_ITEMS) if env.is_main else None

        self.ibmd = ibmd = IBMD(teacher, cfg, env, precision, inpainting, class_conditional)
        self.rng = ibmd.rng
        self.guards = {"skipped": ibmd.gen_guard, "skipped_fake": ibmd.fake_guard}
        self.learning_rates = [(ibmd.gen_opt, cfg.lr), (ibmd.fake_opt, cfg.fake_lr)]
        self.model_config = {
            "teacher_unet": teacher.net.config,
            "bridge": teacher.bridge.config(),
            "conditional": teacher.conditional,
            "nfe": cfg.nfe,
            "image_size": cfg.image_size,
            "channels": channels,
            "degradation": degradation and degradation.name,
        }
        self.config_extra = {"teacher_config": tconf}
        self.release = os.path.join(cfg.run_dir, "generator.safetensors")

    def state_objects(self) -> dict:
        return self.ibmd.state_objects()

    def finished_extra(self) -> dict:
        return {"comparison": _read_comparison(self.cfg.run_dir)}

    def prepare(self) -> None:
        self.ibmd.prepare()

    def step(self, stream: BatchStream, meter: Meter) -> None:
        # Algorithm 1, step 1: L fake-model steps on fresh generator samples.
        for _ in range(self.cfg.inner_steps):
            loss_phi, fake_norm, _ = self.ibmd.fake_step(stream.next())
            meter.add(loss_phi=loss_phi, fake_grad_norm=fake_norm)
        # Algorithm 1, step 2: one generator step.
        loss_theta, grad_norm, _ = self.ibmd.generator_step(stream.next())
        meter.add(loss_theta=loss_theta, grad_norm=grad_norm)

    def stats(self, means: dict) -> dict:
        return {
            "loss_theta": means.get("loss_theta"),
            "loss_phi": means.get("loss_phi"),
            "grad_norm": means.get("grad_norm"),
            "fake_grad_norm": means.get("fake_grad_norm"),
            "lr": self.ibmd.gen_opt.param_groups[0]["lr"],
            "fake_lr": self.ibmd.fake_opt.param_groups[0]["lr"],
        }

    def log_line(self, row: dict) -> str:
        return (
            f"step {row['step']:6d}  loss_theta {fmt_value(row['loss_theta'])}  "
            f"loss_phi {fmt_value(row['loss_phi'])}  grad {fmt_value(row['grad_norm'])}  "
            f"{row['it_per_s']:.2f} it/s  skipped {row['skipped']}/{row['skipped_fake']}"
        )

    def write_samples(self, step: int) -> None:
        _write_samples(self.cfg, self.ibmd, self.grid_batch, step)

    def finish(self, step: int, last: dict) -> dict:
        cfg, ibmd, degradation = self.cfg, self.ibmd, self.degradation
        comparison: list[dict] = []
        if self.env.is_main:
            self.write_samples(step)
            student = ibmd.ema.module
            save_release(
                self.release,
                student.net,
                GENERATOR_FORMAT,
                {
                    **student.config(),
                    "nfe": cfg.nfe,
                    "degradation": degradation and degradation.name,
                    "image_size": cfg.image_size,
                    "channels": self.channels,
                    "data": cfg.data,
                    "inpainting": ibmd.inpainting,
                },
                extra={"step": step, "teacher": os.path.abspath(cfg.teacher), **last},
            )
            self.log(f"generator release: {self.release}")
            if cfg.eval_items > 0:
                comparison = _evaluate(cfg, ibmd, self.channels, degradation, self.log)
        return {"comparison": self.env.broadcast(comparison)}


def _data_labels(dataset) -> Optional[list]:
    """The class label of every training item (a labelled source: ``classes:``, Fashion-MNIST), or None."""
    labels = getattr(getattr(dataset, "source", dataset), "labels", None)
    return None if labels is None else [int(y) for y in labels]


def _check_labels(cfg: DistillConfig, teacher, labels: Optional[list], log) -> bool:
    """Whether the distiller passes class labels: yes for a class-conditional teacher, whose data must
    label every image within its classes (one line otherwise). An unconditional teacher ignores the
    labels of labelled data (the same ``classes:`` folder serves the CA metric), said once in ``log``."""
    num_classes = teacher.num_classes
    if num_classes is None:
        if labels is not None and log is not None:
            log(
                f"note: the data {cfg.data!r} has class labels; the teacher is not class-conditional, so they "
                "are not used"
            )
        return False
    if labels is None:
        raise ValueError(
            f"the teacher {cfg.teacher} is class-conditional ({num_classes} classes) but the data "
            f"{cfg.data!r} has no class labels: give class folders (classes:DIR) or a labels file "
            "(classes:DIR,labels.csv)"
        )
    bad = [y for y in labels if not 0 <= int(y) < num_classes]
    if bad:
        raise ValueError(
            f"the data {cfg.data!r} has class label {bad[0]}, out of range for the teacher "
            f"{cfg.teacher} ({num_classes} classes: labels 0..{num_classes - 1})"
        )
    return True


def _read_comparison(run_dir: str) -> list[dict]:
    """The comparison a finished run wrote (empty when it wrote none)."""
    try:
        with open(os.path.join(run_dir, "comparison.json"), encoding="utf-8") as fh:
            rows = json.load(fh)
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def _crop_hole(degradation, image_size: int) -> Optional[int]:
    """The side of the hole ``degradation`` cuts in a training crop (None: no inpainting)."""
    if not getattr(degradation, "is_inpainting", False):
        return None
    return int(degradation.hole_mask(image_size, image_size)[0].amax(dim=1).sum())


def _write_samples(cfg: DistillConfig, ibmd: IBMD, batch: Optional[dict], step: int) -> None:
    """Columns: corrupted | student (EMA). Distillation has no clean images to show."""
    if batch is None:
        return
    xT = batch["xT"].to(ibmd.device)
    mask = batch.get("mask") if ibmd.inpainting else None
    mask = None if mask is None else mask.to(ibmd.device)
    y = batch["label"].to(ibmd.device) if ibmd.class_conditional else None
    out = sample_student(ibmd.ema.module, xT, cfg.nfe, mask, seed=cfg.seed, autocast=ibmd.precision.autocast, y=y)
    save_grid(
        [xT, out], os.path.join(cfg.run_dir, f"samples-{step}.png"), titles=["corrupted", f"student NFE {cfg.nfe}"]
    )


def _evaluate(cfg: DistillConfig, ibmd: IBMD, channels: int, degradation, log) -> list[dict]:
    """Teacher at each NFE vs the student on held-out pairs (the test split, never used in training)."""
    try:
        test = make_dataset(cfg.data, degradation, size=cfg.image_size, channels=channels, split="test", seed=cfg.seed)
    except (ValueError, FileNotFoundError) as exc:
        log(f"note: no clean held-out images for the comparison ({exc}); skipped")
        return []
    n = min(cfg.eval_items, len(test))
    per_batch = max(1, min(cfg.batch_size, n))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        items = [test[i] for i in range(n)]
    batches = [collate(items[i : i + per_batch]) for i in range(0, n, per_batch)]
    if not ibmd.inpainting:
        batches = [{k: v for k, v in b.items() if k != "mask"} for b in batches]
    log(f"comparison on {n} held-out item(s):")
    rows, _ = report.compare(
        ibmd.teacher,
        ibmd.ema.module,
        cfg.nfe,
        batches,
        cfg.eval_teacher_nfe,
        ibmd.device,
        seed=cfg.seed,
        autocast=ibmd.precision.autocast,
        log=log,
    )
    rows = [report.corrupted_row(batches)] + rows
    write_text(os.path.join(cfg.run_dir, "comparison.json"), json.dumps(rows, indent=2) + "\n")
    if data_layout(cfg.data):
        log("comparison.png skipped: the held-out photograph is not of the data's kind (a DDBM paired layout)")
        return rows
    if ibmd.class_conditional:
        log("comparison.png skipped: the held-out photograph has no class label for the class-conditional teacher")
        return rows
    teacher_nfe = max((r["nfe"] for r in rows if r["model"] == "teacher"), default=default_teacher_nfe(ibmd.bridge))
    photo = report.photo_comparison(
        os.path.join(cfg.run_dir, "comparison.png"),
        ibmd.teacher,
        ibmd.ema.module,
        cfg.nfe,
        teacher_nfe,
        degradation,
        channels,
        size_multiple(ibmd.teacher.net.config["channel_mult"]),
        ibmd.device,
        seed=cfg.seed,
        autocast=ibmd.precision.autocast,
        # the hole of the crops the teacher learned, not half the whole photo (larger than any it saw),
        # restored from the training-size window around it (report.photo_comparison says why)
        hole=_crop_hole(degradation, cfg.image_size),
        window=cfg.image_size,
        draws=PHOTO_DRAWS,
    )
    write_text(os.path.join(cfg.run_dir, "comparison-photo.json"), json.dumps(photo, indent=2) + "\n")
    log(
        f"comparison.png: the held-out photo {photo['photo']} ({photo['width']}x{photo['height']}), "
        + ", ".join(f"{c['title']} {c['psnr']:.2f} dB" for c in photo["columns"] if c["psnr"] is not None)
    )
    if photo.get("draws"):
        spread = ", ".join(
            f"{name} {statistics.fmean(v):.2f} +- {statistics.pstdev(v):.2f} dB" for name, v in photo["draws"].items()
        )
        log(f"  the same photo over {PHOTO_DRAWS} more draws (mean +- sd; one draw scatters): {spread}")
    return rows
