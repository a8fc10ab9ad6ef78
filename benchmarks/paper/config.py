"""Scales, tasks and the rows each task evaluates; the work counts and the time estimate of a preset."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

CHANNELS = 1  # Fashion-MNIST is grayscale


@dataclass(frozen=True)
class Preset:
    """The settings of one scale of the experiment (every stage records the ones it used)."""

    image_size: int  # side of the Fashion-MNIST images (28 px padded to 32; another size resizes)
    arch: str  # U-Net of the teachers, copied by the students (ibmd_fast.models.CONFIGS)
    bridge_steps: int  # I2SB discrete steps; an I2SB teacher runs at most bridge_steps - 1 NFE
    teacher_steps: int  # bridge-matching optimizer steps per teacher
    teacher_batch: int  # teacher batch size
    teacher_lr: float  # teacher AdamW learning rate
    teacher_ema: float  # EMA decay of the teacher release
    distill_steps: int  # K: generator steps of Algorithm 1
    inner_steps: int  # L: fake-model steps per generator step (the paper: 5)
    distill_batch: int  # distillation batch size (the paper: 256)
    distill_lr: float  # generator and fake-model learning rate (the paper: 5e-5 I2SB, 1e-5 DDBM)
    distill_ema: float  # EMA decay of the generator release (the paper: 0.99)
    paper_seeds: int  # distillation seeds of each paper student (the targets are about their mean)
    comparison_seeds: int  # distillation seeds of each comparison student
    precision: str  # fp32 | bf16 for training (low precision applies on CUDA only)
    channels_last: bool  # NHWC convolutions in training (faster on recent GPUs)
    workers: int  # DataLoader workers per training run (JPEG encoding is per item)
    log_every: int  # trainer steps between progress lines
    teacher_ckpt_every: int  # teacher steps between checkpoints (what a killed run loses at most)
    distill_ckpt_every: int  # generator steps between checkpoints
    classifier_items: int  # clean training images the FID/CA classifier learns from (0: all 60,000)
    classifier_epochs: int  # its epochs
    classifier_width: int  # its base width; features have 4 x width dimensions at 32 px
    classifier_test_images: int  # clean test images of its reported accuracy (0: the whole test split)
    eval_images: int  # the first N test images every row at NFE <= 100 restores
    top_nfe_images: int  # the stated subset (first M of them) of the I2SB teacher at NFE 999
    eval_batch: int  # images per restoration batch (the per-image time is measured at it)
    teacher_nfe: tuple  # teacher NFEs of every task (the first is the reference of the targets)
    max_teacher_nfe: int  # NFE cap for every sampler (a smoke bridge of 20 steps: 19)
    bootstrap_resamples: int  # resamples of every bootstrap interval
    save_features: bool  # write the per-image features beside the JSON (False: they stay in work/)
    grid_images: int  # rows of each task's picture grid
    note: str  # what this scale can and cannot show, printed with the table ({field} = setting)

    def describe(self) -> str:
        return self.note.format(**dataclasses.asdict(self))


PRESETS: dict[str, Preset] = {
    # 2 idle CPU cores, <= 120 min: estimated 117 min (`--dry-run` prints it per stage family: evaluation
    # 61, distillation 39, teachers 12.5, classifier 3, bootstrap intervals 2). The estimate multiplies
    # this preset's network calls per stage family (workload()) by the seconds per image-network call of
    # timed stages of the `tiny` U-Net at 32 px on these 2 cores when idle
    # (COST_PER_CALL: the cpu run of commit 7976de7).
    # This version's smoke stages were timed too, but under a load average of 11 (other engineers' jobs),
    # so they only confirm that every stage runs. Evaluation dominates: 256 images for every row at NFE
    # <= 100 (DDBM: 315 teacher calls per image over its six rows), 16 images for NFE 999; hence only
    # 100 IBMD steps per student (16 students) and 400 teacher steps. A cut run resumes stage by stage.
    "cpu": Preset(
        image_size=32,
        arch="tiny",
        bridge_steps=1000,
        teacher_steps=400,
        teacher_batch=16,
        teacher_lr=2e-4,
        teacher_ema=0.999,
        distill_steps=100,
        inner_steps=5,
        distill_batch=8,
        distill_lr=1e-4,
        distill_ema=0.99,
        paper_seeds=2,
        comparison_seeds=1,
        precision="fp32",
        channels_last=False,
        workers=0,
        log_every=50,
        teacher_ckpt_every=100,
        distill_ckpt_every=25,
        classifier_items=0,
        classifier_epochs=3,
        classifier_width=16,
        classifier_test_images=0,
        eval_images=256,
        top_nfe_images=16,
        eval_batch=64,
        teacher_nfe=(100, 10, 4, 1),
        max_teacher_nfe=999,
        bootstrap_resamples=1000,
        save_features=True,
        grid_images=8,
        note=(
            "CPU scale: `{arch}` U-Nets (0.8M parameters) trained for {teacher_steps} bridge-matching steps at "
            "batch {teacher_batch}, students distilled for {distill_steps} IBMD steps (L = {inner_steps}) at batch "
            "{distill_batch} with lr {distill_lr:g} (the paper: ADM U-Nets of hundreds of millions of parameters, "
            "thousands of steps at batch 256). Teachers this small and short-trained are far from converged, so "
            "absolute FID and PSNR are poor; what the table shows is how a student compares with its own "
            "teacher. Every row at NFE <= 100 uses the first {eval_images} test images; the I2SB teacher at NFE "
            "999 (about 8 s per image on 2 cores) the first {top_nfe_images}. FID is on the project "
            "classifier's features, not Inception's: compare rows within a task, never with the paper's FIDs."
        ),
    ),
    # One H100 / H200, aimed at <= 10 min (benchmarks/gpu_check.sh paper: one device call; a call cut
    # by its limit resumes stage by stage when run again). NOT yet timed on a GPU: --dry-run counts
    # about 25M image-network calls of the `tiny` U-Net (more than half evaluating the 10,000 test images
    # per row at batch 1000, a third distillation), so it fits if the H200 sustains ~42k image-calls/s.
    "gpu": Preset(
        image_size=32,
        arch="tiny",
        bridge_steps=1000,
        teacher_steps=1000,
        teacher_batch=128,
        teacher_lr=2e-4,
        teacher_ema=0.999,
        distill_steps=200,
        inner_steps=5,
        distill_batch=64,
        distill_lr=1e-4,
        distill_ema=0.99,
        paper_seeds=3,
        comparison_seeds=1,
        precision="bf16",
        channels_last=True,
        workers=4,
        log_every=100,
        teacher_ckpt_every=500,
        distill_ckpt_every=100,
        classifier_items=0,
        classifier_epochs=5,
        classifier_width=16,
        classifier_test_images=0,
        eval_images=10000,
        top_nfe_images=256,
        eval_batch=1000,
        teacher_nfe=(100, 10, 4, 1),
        max_teacher_nfe=999,
        bootstrap_resamples=1000,
        save_features=False,
        grid_images=8,
        note=(
            "GPU scale: `{arch}` U-Nets trained for {teacher_steps} steps at batch {teacher_batch} in "
            "{precision}, students distilled for {distill_steps} IBMD steps (L = {inner_steps}) at batch "
            "{distill_batch}: still far less compute than the paper. Rows use all {eval_images} test images "
            "(the I2SB teacher at NFE 999 the first {top_nfe_images}); FID is on the project's classifier "
            "features, so only the rows of one task compare with each other."
        ),
    ),
    # Seconds: exercises every stage and output for the test (16 px, a 20-step bridge, 8 images).
    "smoke": Preset(
        image_size=16,
        arch="tiny",
        bridge_steps=20,
        teacher_steps=3,
        teacher_batch=4,
        teacher_lr=2e-4,
        teacher_ema=0.9,
        distill_steps=2,
        inner_steps=1,
        distill_batch=2,
        distill_lr=5e-5,
        distill_ema=0.9,
        paper_seeds=2,
        comparison_seeds=1,
        precision="fp32",
        channels_last=False,
        workers=0,
        log_every=1,
        teacher_ckpt_every=2,
        distill_ckpt_every=1,
        classifier_items=64,
        classifier_epochs=1,
        classifier_width=8,
        classifier_test_images=64,
        eval_images=8,
        top_nfe_images=4,
        eval_batch=8,
        teacher_nfe=(100, 10, 4, 1),
        max_teacher_nfe=19,
        bootstrap_resamples=50,
        save_features=True,
        grid_images=4,
        note=(
            "Smoke scale: a pipeline check, not an experiment. Untrained 16 px models on {eval_images} images "
            "and every NFE capped at {max_teacher_nfe}; the numbers mean nothing."
        ),
    ),
}


@dataclass(frozen=True)
class Task:
    """One restoration task: its bridge family and the students distilled for it."""

    degradation: str  # ibmd_fast.data degradation name
    bridge: str  # "i2sb" | "vp" | "ve" (TeacherConfig.bridge)
    conditional: bool  # the network sees xT (DDBM) or not (I2SB)
    beta_max: float  # I2SB noise level: 0.3 for super-resolution and JPEG, 1.0 for inpainting
    student_nfe: tuple  # students distilled for it
    paper_nfe: int  # the one the targets are about (the paper's setting)

    @property
    def family(self) -> str:
        return "I2SB" if self.bridge == "i2sb" else "DDBM"


TASKS: dict[str, Task] = {
    # I2SB half (unconditional): 1-NFE students, 4-NFE for inpainting as in the paper
    "sr4x-pool": Task("sr4x-pool", "i2sb", False, 0.3, (1,), 1),
    # the JPEG tasks run on libjpeg (the codec of the committed results); I2SB's own torch JPEG is
    # "jpeg-10" / "jpeg-5" in ibmd_fast.data, a change of operator and so of every stage key
    "jpeg-10": Task("jpeg-10-libjpeg", "i2sb", False, 0.3, (1,), 1),
    "inpaint-center": Task("inpaint-center", "i2sb", False, 1.0, (4, 1), 4),
    # DDBM half (conditional, DDBM preconditioning): 2-NFE students (the paper's), 1-NFE beside them
    "sketch": Task("sketch", "vp", True, 0.3, (2, 1), 2),
    "jpeg-5": Task("jpeg-5-libjpeg", "vp", True, 0.3, (2, 1), 2),
    # the DDBM VE bridge (ibmd_fast.bridges.VEBridge, TeacherConfig(bridge="ve")); skipped with a note
    # while the checkout has no VE bridge
    "sketch-ve": Task("sketch", "ve", True, 0.3, (2, 1), 2),
}


@dataclass(frozen=True)
class TeacherRow:
    """One teacher evaluation: sampler, its eta (DBIM only), NFE, and on how many images."""

    sampler: str  # "i2sb" | "dbim" | "heun"
    eta: Optional[float]
    nfe: int
    images: int

    @property
    def name(self) -> str:
        eta = "" if self.eta is None else f"-eta{self.eta:g}"
        return f"teacher-{self.sampler}{eta}-nfe{self.nfe}"


def reference_nfe(preset: Preset) -> int:
    return min(int(preset.teacher_nfe[0]), preset.max_teacher_nfe)


def _cap(preset: Preset, task: Task, nfe: int) -> int:
    top = preset.max_teacher_nfe
    if task.bridge == "i2sb":
        top = min(top, preset.bridge_steps - 1)  # an I2SB bridge of N steps runs at most N - 1 calls
    return min(int(nfe), top)


def teacher_rows(preset: Preset, task: Task) -> list[TeacherRow]:
    """The teacher rows of a task. The first is the reference of the targets (the natural sampler at
    ``reference_nfe``: I2SB's posterior sampler, DBIM with eta = 0 for DDBM as DBIM reports it).
    I2SB: NFE 999 on the stated subset, then ``teacher_nfe``. DDBM: DBIM eta = 0 at ``teacher_nfe``,
    and DBIM eta = 1 and Heun at the reference NFE."""
    nfes = sorted({_cap(preset, task, n) for n in preset.teacher_nfe}, reverse=True)
    if task.bridge == "i2sb":
        rows = [TeacherRow("i2sb", None, n, preset.eval_images) for n in nfes]
        top = _cap(preset, task, 1000)
        if top not in nfes:
            rows.append(TeacherRow("i2sb", None, top, min(preset.top_nfe_images, preset.eval_images)))
        return rows
    ref = nfes[0]
    return [TeacherRow("dbim", 0.0, n, preset.eval_images) for n in nfes] + [
        TeacherRow("dbim", 1.0, ref, preset.eval_images),
        TeacherRow("heun", None, ref, preset.eval_images),
    ]


def student_seeds(preset: Preset, task: Task, nfe: int, base_seed: int) -> list[int]:
    count = preset.paper_seeds if nfe == task.paper_nfe else preset.comparison_seeds
    return [base_seed + i for i in range(count)]


# ----------------------------------------------------------------------------
# Work counts and the time estimate

# Seconds per image-network call (a forward; a forward and backward counts as 3 calls) of the `tiny`
# U-Net at 32 px on 2 idle CPU cores, from timed stages (see the cpu preset's comment): teacher
# training 157 s / (500 steps x 16 x 3); distillation 405 s / (300 x 8 x 29); evaluation 30.5 s /
# (32 images x 100 NFE), batch 32. Conditional networks (xT concatenated) cost about the same.
COST_PER_CALL = {"teachers": 6.5e-3, "distillation": 5.8e-3, "evaluation": 9.5e-3}
# The classifier: width 32 took 50 s for 8192 images x 2 epochs there (3 ms per image-epoch, reading the
# data and the 10,000-image test included); width 16 measured 3.8x cheaper per step -> about 1 ms.
CLASSIFIER_SECONDS_PER_IMAGE_EPOCH = 1.0e-3
# The same costs measured on another 2-core machine (AMD EPYC, AVX2 only; the session of Dec 2 2026,
# contiguous attention operands, idle stages of the cpu run): teacher 267.6 s / (400 x 16 x 3); a 1-NFE
# I2SB student ~350 s / (100 x 8 x 29); evaluation 290.2 s / (256 images x 100 NFE), batch 64; the
# classifier 402 s / (60,000 x 3). It is 1.2-2.6x slower per call, so the preset that fits 120 min on
# the machine above takes about 3.5 hours there (printed by --dry-run beside the reference estimate).
MACHINE_COSTS = {
    "reference": {**COST_PER_CALL, "classifier": CLASSIFIER_SECONDS_PER_IMAGE_EPOCH},
    "epyc-avx2-2core": {"teachers": 13.9e-3, "distillation": 15.1e-3, "evaluation": 11.3e-3, "classifier": 2.2e-3},
}
# One bootstrap FID over 1000 resamples of 256 images with 64-d features, the clean fits cached: 2.5 s
# measured on one thread under a load average of 11; 1 s assumed on idle cores.
INTERVAL_SECONDS = 1.0


def bootstrap_sets(preset: Preset, tasks: list[str]) -> int:
    """Resampled FID computations of a run: each row, each student's paired difference (student and
    reference), each summary entry (its seeds and the reference)."""
    total = 0
    for name in tasks:
        task = TASKS[name]
        seeds = [len(student_seeds(preset, task, k, 0)) for k in task.student_nfe]
        total += 1 + len(teacher_rows(preset, task)) + sum(seeds) + 2 * sum(seeds) + sum(s + 1 for s in seeds)
    return total


def workload(preset: Preset, tasks: list[str]) -> dict:
    """Approximate image-network calls per stage family, to size a preset."""
    # Algorithm 1: each fake step runs G (no grad) and phi forward+backward; the generator step G, the
    # teacher and phi forward+backward; a k-step student first runs on average (k - 1) / 2 of its own steps
    per_iteration = preset.inner_steps * (1 + 3) + 3 * 3
    calls = {"teachers": 0, "distillation": 0, "evaluation": 0}
    for name in tasks:
        task = TASKS[name]
        calls["teachers"] += preset.teacher_steps * preset.teacher_batch * 3
        for k in task.student_nfe:
            chain = (preset.inner_steps + 1) * (k - 1) / 2
            seeds = len(student_seeds(preset, task, k, 0))
            calls["distillation"] += int(seeds * preset.distill_steps * preset.distill_batch * (per_iteration + chain))
            calls["evaluation"] += seeds * preset.eval_images * k
        calls["evaluation"] += sum(r.images * r.nfe for r in teacher_rows(preset, task))
    return calls


def estimate_minutes(preset: Preset, tasks: list[str], machine: str = "reference") -> dict:
    """Minutes per stage family on 2 idle CPU cores for a `tiny` preset, pixels scaled, with the costs
    measured on ``machine`` (MACHINE_COSTS; "reference": the machine the presets were sized on)."""
    costs = MACHINE_COSTS[machine]
    scale = (preset.image_size / 32) ** 2
    calls = workload(preset, tasks)
    minutes = {k: calls[k] * costs[k] * scale / 60 for k in calls}
    items = preset.classifier_items or 60000
    minutes["classifier"] = items * preset.classifier_epochs * costs["classifier"] * scale / 60
    minutes["intervals"] = bootstrap_sets(preset, tasks) * INTERVAL_SECONDS * (preset.bootstrap_resamples / 1000) / 60
    minutes["total"] = sum(minutes.values())
    return {k: math.ceil(v * 10) / 10 for k, v in minutes.items()}
