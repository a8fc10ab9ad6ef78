"""The paper's experiment at our scale: IBMD (arXiv 2502.01362) on Fashion-MNIST, end to end.

For each task (``sr4x-pool``, ``jpeg-10``, ``inpaint-center``; 32x32 grayscale, padded from 28):

1. train an I2SB-bridge teacher by bridge matching (``train_teacher``; beta_max 0.3 for
   super-resolution and JPEG, 1.0 for inpainting, as I2SB trains them; MATH.md 4);
2. distill a 1-NFE student with IBMD (``distill``, Algorithm 1; MATH.md 5), and for inpainting a
   4-NFE student too, as the paper does;
3. evaluate on the first ``eval_images`` test images (MATH.md 7): FID on the features of a
   classifier trained here on the clean training split (its clean test accuracy is reported),
   CA (that classifier's accuracy on the restored images), PSNR, SSIM and seconds per image, for
   the teacher at NFE 1000, 100, 10, 4, 1 (an I2SB bridge of N steps runs at most N - 1 network
   calls, so NFE 1000 on the 1000-step bridge is reported as 999) and each student at its NFE.

Evaluation reuses ``ibmd_fast.evaluate`` (``evaluate``, ``get_classifier``, ``restore_with_*``,
``save_grid``, ``format_table``). Every stage runs in its own directory under
``--work-dir/<scale>/`` and records its settings in ``stage.json``; a stage whose record matches
and whose outputs exist is skipped, and an interrupted training stage resumes from its newest
checkpoint, so a killed run continues where it stopped.

    python benchmarks/paper_table.py --scale cpu        # about 51 min on 2 CPU cores (PRESETS)
    python benchmarks/paper_table.py --scale gpu        # aimed at 8 min on one H100 / H200 (not yet timed)
    python benchmarks/paper_table.py --scale smoke      # seconds: the test's check of the pipeline
    python benchmarks/paper_table.py --scale cpu --dry-run            # settings and approximate work
    python benchmarks/paper_table.py --scale cpu --eval-images 32     # fewer evaluation images

Writes to ``--out-dir`` (default benchmarks/results): ``paper_table-<scale>-<machine>.json`` and
``.md`` (a table per task: model, NFE, FID, CA, PSNR, SSIM, s/img, speedup vs teacher-100), a
picture grid per task ``paper_table-<scale>-<machine>-<task>.png`` (corrupted | teacher-100 |
students | clean) and ``paper_table-<scale>-<machine>-fid-vs-time.png`` (FID against seconds per
image, log x, every NFE). Needs the Debian package ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import torch  # noqa: E402

from _common import RESULTS, environment, machine_name, resolve_device, write_json  # noqa: E402
from ibmd_fast.data import FASHION_MNIST_DIR, FashionMNIST  # noqa: E402
from ibmd_fast.evaluate import (  # noqa: E402
    evaluate,
    format_table,
    get_classifier,
    load_eval_data,
    load_model,
    restore_with_generator,
    restore_with_teacher,
    save_grid,
)
from ibmd_fast.metrics import classifier_accuracy  # noqa: E402
from ibmd_fast.train import DistillConfig, TeacherConfig, distill, train_teacher  # noqa: E402


# ----------------------------------------------------------------------------
# Scales


@dataclass(frozen=True)
class Preset:
    """The settings of one scale of the experiment (every stage records the ones it used)."""

    image_size: int              # side of the Fashion-MNIST images (28 px padded to 32; another size resizes)
    arch: str                    # U-Net of the teachers, copied by the students (ibmd_fast.models.CONFIGS)
    bridge_steps: int            # I2SB discrete steps; a teacher runs at most bridge_steps - 1 NFE
    teacher_steps: int           # bridge-matching optimizer steps per teacher
    teacher_batch: int           # teacher batch size
    teacher_lr: float            # teacher AdamW learning rate
    teacher_ema: float           # EMA decay of the teacher release
    distill_steps: int           # K: generator steps of Algorithm 1
    inner_steps: int             # L: fake-model steps per generator step (the paper: 5)
    distill_batch: int           # distillation batch size (the paper: 256)
    distill_lr: float            # generator and fake-model learning rate (the paper: 5e-5 for I2SB)
    distill_ema: float           # EMA decay of the generator release (the paper: 0.99)
    precision: str               # fp32 | bf16 for training (low precision applies on CUDA only)
    channels_last: bool          # NHWC convolutions in training (faster on recent GPUs)
    workers: int                 # DataLoader workers per training run (JPEG encoding is per item)
    log_every: int               # trainer steps between progress lines
    teacher_ckpt_every: int      # teacher steps between checkpoints (what a killed run loses at most)
    distill_ckpt_every: int      # generator steps between checkpoints
    classifier_items: int        # clean training images the FID/CA classifier learns from
    classifier_epochs: int       # its epochs
    classifier_test_images: int  # clean test images of its reported accuracy (0: the whole test split)
    eval_images: int             # the first N test images every model restores for the table
    eval_batch: int              # images per restoration batch (the per-image time is measured at it)
    teacher_nfe: tuple           # teacher NFEs of the table; each is capped at bridge_steps - 1
    grid_images: int             # rows of each task's picture grid
    note: str                    # what this scale can and cannot show, printed with the table ({field} = setting)

    def describe(self) -> str:
        return self.note.format(**dataclasses.asdict(self))


PRESETS: dict[str, Preset] = {
    # 2 CPU cores, < 60 min: 51 min measured stage by stage (the JSON's "stages"). A third of it
    # is the teacher at NFE 999 on the evaluation images (1114 network calls per image over the five
    # teacher NFEs, about 8 ms each for the tiny U-Net at 32 px), hence 32 images; half is distillation.
    # 300 generator steps are what the sr4x-pool student needs here to reach the teacher at NFE 100
    # (FID on the 32 images: 1.23 after 80 steps, 0.69 after 200, 0.48 after 300; teacher-100 0.57).
    "cpu": Preset(
        image_size=32, arch="tiny", bridge_steps=1000,
        teacher_steps=500, teacher_batch=16, teacher_lr=2e-4, teacher_ema=0.999,
        distill_steps=300, inner_steps=5, distill_batch=8, distill_lr=1e-4, distill_ema=0.99,
        precision="fp32", channels_last=False, workers=0, log_every=50,
        teacher_ckpt_every=100, distill_ckpt_every=25,
        classifier_items=8192, classifier_epochs=2, classifier_test_images=0,
        eval_images=32, eval_batch=32, teacher_nfe=(1000, 100, 10, 4, 1), grid_images=8,
        note=("CPU scale: `{arch}` U-Nets (0.8M parameters) trained for {teacher_steps} bridge-matching steps at "
              "batch {teacher_batch}, students distilled for {distill_steps} IBMD steps (L = {inner_steps}) at batch "
              "{distill_batch} with lr {distill_lr:g} (the paper: ADM U-Nets of hundreds of millions of parameters, "
              "thousands of steps at batch 256, lr 5e-5). Teachers this small and short-trained are far from "
              "converged, so absolute FID and PSNR are poor; what the table can show is how a student compares "
              "with its own teacher. All rows use the first {eval_images} test images, because the teacher at "
              "NFE 999 costs about 8 s per image on 2 CPU cores (the whole test set would take a day): FID of "
              "{eval_images} images on 128-dimensional features is biased upwards and noisy (one image is 3 "
              "points of CA); compare rows within a task, never with the paper's Inception FIDs."),
    ),
    # One H100 / H200, aimed at 8 min: not yet timed on a GPU. From the work counts (--dry-run: about
    # 5.8M image-network calls of the `small` U-Net, 3.4 GFLOP each at 32 px, so 20 PFLOP with the
    # backward passes) it needs ~40 TFLOP/s sustained over the mixed bf16 training and fp32 evaluation.
    "gpu": Preset(
        image_size=32, arch="small", bridge_steps=1000,
        teacher_steps=1500, teacher_batch=128, teacher_lr=2e-4, teacher_ema=0.999,
        distill_steps=300, inner_steps=5, distill_batch=64, distill_lr=1e-4, distill_ema=0.99,
        precision="bf16", channels_last=True, workers=4, log_every=100,
        teacher_ckpt_every=500, distill_ckpt_every=100,
        classifier_items=60000, classifier_epochs=5, classifier_test_images=0,
        eval_images=512, eval_batch=256, teacher_nfe=(1000, 100, 10, 4, 1), grid_images=8,
        note=("GPU scale: `{arch}` U-Nets (11M parameters) trained for {teacher_steps} steps at batch "
              "{teacher_batch} in {precision}, students distilled for {distill_steps} IBMD steps (L = "
              "{inner_steps}) at batch {distill_batch} with lr {distill_lr:g}: still far less compute than the "
              "paper (thousands of steps at batch 256 from converged ADM teachers). Rows use the first "
              "{eval_images} test images; FID is on the project's classifier features (128-d), not Inception's, "
              "so only the rows of one task compare with each other."),
    ),
    # Seconds: exercises every stage and output for the test (16 px, a 20-step bridge, 8 images).
    "smoke": Preset(
        image_size=16, arch="tiny", bridge_steps=20,
        teacher_steps=3, teacher_batch=4, teacher_lr=2e-4, teacher_ema=0.9,
        distill_steps=2, inner_steps=1, distill_batch=2, distill_lr=5e-5, distill_ema=0.9,
        precision="fp32", channels_last=False, workers=0, log_every=1,
        teacher_ckpt_every=2, distill_ckpt_every=1,
        classifier_items=64, classifier_epochs=1, classifier_test_images=64,
        eval_images=8, eval_batch=8, teacher_nfe=(1000, 100, 10, 4, 1), grid_images=4,
        note=("Smoke scale: a pipeline check, not an experiment. Untrained 16 px models on {eval_images} images "
              "and a 20-step bridge (so every teacher NFE above 19 is capped at 19); the numbers mean nothing."),
    ),
}


@dataclass(frozen=True)
class Task:
    """One restoration task of the paper's I2SB experiments."""

    degradation: str             # ibmd_fast.data degradation name
    beta_max: float              # I2SB noise level: 0.3 for super-resolution and JPEG, 1.0 for inpainting
    student_nfe: tuple           # students distilled for it: 1-NFE, and 4-NFE for inpainting as in the paper


TASKS: dict[str, Task] = {
    "sr4x-pool": Task("sr4x-pool", 0.3, (1,)),
    "jpeg-10": Task("jpeg-10", 0.3, (1,)),
    "inpaint-center": Task("inpaint-center", 1.0, (1, 4)),
}
CHANNELS = 1      # Fashion-MNIST is grayscale
REFERENCE_NFE = 100  # the speedup column is relative to the teacher at this NFE (capped like the others)


# ----------------------------------------------------------------------------
# Stages: run once, skip when done, resume when interrupted


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so recorded and current keys compare."""
    return json.loads(json.dumps(value))


class Stages:
    """Runs each stage at most once per set of settings.

    A stage's directory holds ``stage.json``: its settings (``key``), whether it finished, its
    seconds and its result. A finished stage with the same key whose outputs exist is skipped; an
    unfinished one with the same key resumes (``resume="auto"``: the trainers continue from their
    newest checkpoint); one recorded with other settings starts over (``resume="none"``).
    """

    def __init__(self):
        self.log: list[dict] = []

    def run(self, label: str, directory: str, key: dict, outputs: list[str],
            fn: Callable[[str], dict]) -> dict:
        marker = os.path.join(directory, "stage.json")
        key = _plain(key)
        old = _read_json(marker)
        if old and old.get("key") == key and old.get("done") and all(os.path.exists(p) for p in outputs):
            print(f"[{label}] done in an earlier run ({old['seconds']:.1f} s): skipped", flush=True)
            self.log.append({"stage": label, "seconds": old["seconds"], "skipped": True})
            return old["result"]
        resume = "auto"
        if old and old.get("key") != key:
            print(f"[{label}] {directory} holds a run with other settings: starting over", flush=True)
            resume = "none"
        elif old:
            print(f"[{label}] resuming an unfinished run", flush=True)
        else:
            print(f"[{label}] starting", flush=True)
        os.makedirs(directory, exist_ok=True)
        write_json(marker, {"key": key, "done": False})
        start = time.perf_counter()
        result = _plain(fn(resume))
        # trainers report their seconds over all resumed pieces; other stages are timed here
        seconds = float(result.get("seconds", time.perf_counter() - start))
        write_json(marker, {"key": key, "done": True, "seconds": seconds, "result": result})
        print(f"[{label}] done in {seconds:.1f} s", flush=True)
        self.log.append({"stage": label, "seconds": seconds, "skipped": False})
        return result


# ----------------------------------------------------------------------------
# The experiment


def capped_nfe(preset: Preset) -> list[int]:
    """The teacher NFEs that run: each capped at bridge_steps - 1, deduplicated, descending."""
    top = preset.bridge_steps - 1
    return sorted({min(int(n), top) for n in preset.teacher_nfe}, reverse=True)


def workload(preset: Preset, tasks: list[str]) -> dict:
    """Approximate U-Net calls on one image per stage family (a forward and backward counts as 3), to size
    a preset: the CPU costs about 10 ms per call for `tiny` at 32 px on 2 cores."""
    teacher_nfe = sum(capped_nfe(preset))
    # Algorithm 1: each fake step runs G (no grad) and phi forward+backward; the generator step G, the
    # teacher and phi forward+backward; a k-step student first runs on average (k - 1) / 2 of its own steps
    per_iteration = preset.inner_steps * (1 + 3) + 3 * 3
    calls = {"teachers": 0, "distillation": 0, "evaluation": 0}
    for name in tasks:
        task = TASKS[name]
        calls["teachers"] += preset.teacher_steps * preset.teacher_batch * 3
        for k in task.student_nfe:
            chain = (preset.inner_steps + 1) * (k - 1) / 2
            calls["distillation"] += int(preset.distill_steps * preset.distill_batch * (per_iteration + chain))
        calls["evaluation"] += preset.eval_images * (teacher_nfe + sum(task.student_nfe))
        grid_nfe = min(REFERENCE_NFE, preset.bridge_steps - 1) + sum(task.student_nfe)
        calls["evaluation"] += preset.grid_images * grid_nfe
    return calls


def data_spec(data_dir: str) -> str:
    return "fashion-mnist" if os.path.abspath(data_dir) == os.path.abspath(FASHION_MNIST_DIR) \
        else f"fashion-mnist:{data_dir}"


def check_data(data_dir: str) -> Optional[str]:
    """None when both splits of Fashion-MNIST load from ``data_dir``, else why not."""
    try:
        for split in ("train", "test"):
            FashionMNIST(root=data_dir, split=split)
    except (FileNotFoundError, ValueError) as exc:
        return str(exc)
    return None


def teacher_key(preset: Preset, task: Task, data: str, seed: int) -> dict:
    fields = ("image_size", "arch", "bridge_steps", "teacher_steps", "teacher_batch", "teacher_lr", "teacher_ema",
              "precision", "channels_last")
    return {"stage": "teacher", "task": dataclasses.asdict(task), "data": data, "seed": seed,
            **{f: getattr(preset, f) for f in fields}}


def distill_key(preset: Preset, teacher: dict, nfe: int) -> dict:
    fields = ("distill_steps", "inner_steps", "distill_batch", "distill_lr", "distill_ema", "precision",
              "channels_last")
    return {"stage": "distill", "teacher": teacher, "nfe": nfe, **{f: getattr(preset, f) for f in fields}}


def train_task_teacher(stages: Stages, preset: Preset, task: Task, data: str, work: str, device: str,
                       seed: int) -> tuple[str, dict]:
    directory = os.path.join(work, task.degradation, "teacher")
    release = os.path.join(directory, "teacher.safetensors")
    key = teacher_key(preset, task, data, seed)

    def run(resume: str) -> dict:
        out = train_teacher(TeacherConfig(
            run_dir=directory, data=data, degradation=task.degradation, image_size=preset.image_size,
            channels=CHANNELS, bridge="i2sb", beta_max=task.beta_max, n_steps=preset.bridge_steps,
            conditional=False, arch=preset.arch, batch_size=preset.teacher_batch, lr=preset.teacher_lr,
            steps=preset.teacher_steps, ema_decay=preset.teacher_ema, precision=preset.precision,
            channels_last=preset.channels_last, seed=seed, device=device, workers=preset.workers,
            log_every=preset.log_every, ckpt_every=preset.teacher_ckpt_every, keep_ckpts=2, resume=resume))
        return {"release": out["release"], "steps": out["steps"], "loss": out["loss"], "seconds": out["seconds"]}

    stages.run(f"{task.degradation}: teacher", directory, key, [release], run)
    return release, key


def distill_task_student(stages: Stages, preset: Preset, task: Task, teacher: str, tkey: dict, nfe: int,
                         work: str, device: str, seed: int) -> tuple[str, dict]:
    directory = os.path.join(work, task.degradation, f"student-nfe{nfe}")
    release = os.path.join(directory, "generator.safetensors")
    key = distill_key(preset, tkey, nfe)

    def run(resume: str) -> dict:
        out = distill(DistillConfig(
            run_dir=directory, teacher=teacher, nfe=nfe, inner_steps=preset.inner_steps,
            steps=preset.distill_steps, batch_size=preset.distill_batch, lr=preset.distill_lr,
            fake_lr=preset.distill_lr, ema_decay=preset.distill_ema, precision=preset.precision,
            channels_last=preset.channels_last, seed=seed, device=device, workers=preset.workers,
            log_every=preset.log_every, ckpt_every=preset.distill_ckpt_every, keep_ckpts=2, resume=resume,
            eval_items=0))
        return {"release": out["release"], "steps": out["steps"], "loss_theta": out["loss_theta"],
                "loss_phi": out["loss_phi"], "seconds": out["seconds"]}

    stages.run(f"{task.degradation}: distill {nfe}-NFE student", directory, key, [release], run)
    return release, key


def classifier_stage(stages: Stages, preset: Preset, data: str, data_dir: str, work: str, device: str,
                     seed: int) -> dict:
    """The FID/CA classifier, trained on the clean training split, and its clean test accuracy."""
    directory = os.path.join(work, "classifier")
    path = os.path.join(directory, "classifier.safetensors")
    key = {"stage": "classifier", "data": data, "image_size": preset.image_size, "seed": seed,
           "items": preset.classifier_items, "epochs": preset.classifier_epochs,
           "test_images": preset.classifier_test_images}

    def run(resume: str) -> dict:
        clf = get_classifier(None, directory, data, preset.image_size, CHANNELS, task="labels",
                             epochs=preset.classifier_epochs, max_items=preset.classifier_items, seed=seed,
                             device=device, log=print)
        test = FashionMNIST(root=data_dir, split="test", size=preset.image_size, channels=CHANNELS)
        n = len(test) if preset.classifier_test_images <= 0 else min(preset.classifier_test_images, len(test))
        images = torch.stack([test[i][0] for i in range(n)])
        labels = torch.as_tensor([test[i][1] for i in range(n)])
        accuracy = classifier_accuracy(clf, images, labels)
        print(f"  classifier: {accuracy:.2f}% top-1 on {n} clean test images", flush=True)
        return {"path": path, "clean_test_accuracy": accuracy, "clean_test_images": n,
                "train_items": preset.classifier_items, "epochs": preset.classifier_epochs,
                "feature_dim": int(clf.feature_dim)}

    return stages.run("classifier", directory, key, [path], run)


def evaluate_task(stages: Stages, preset: Preset, task: Task, data: str, work: str, device: str, seed: int,
                  teacher: str, tkey: dict, students: dict[int, tuple[str, dict]], clf: dict) -> list[dict]:
    """Table rows: corrupted, the teacher at each NFE, each student; one stage per model and NFE, so a
    killed run keeps the NFEs already measured (the teacher at NFE 999 is the long one)."""
    common = dict(data=data, degradation=task.degradation, image_size=preset.image_size,
                  classifier=clf["path"], num_images=preset.eval_images, batch_size=preset.eval_batch,
                  seed=seed, device=device, grid_rows=preset.grid_images, log=print)
    eval_key = {"images": preset.eval_images, "batch": preset.eval_batch, "seed": seed, "classifier": clf}
    rows: list[dict] = []
    for nfe in capped_nfe(preset):
        directory = os.path.join(work, task.degradation, "eval", f"teacher-nfe{nfe}")

        def run(resume: str, nfe=nfe, directory=directory) -> dict:
            payload = evaluate(teacher=teacher, student=None, teacher_nfe=(nfe,), run_dir=directory, **common)
            return {"rows": payload["results"]}

        result = stages.run(f"{task.degradation}: evaluate teacher NFE {nfe}", directory,
                            {"stage": "eval", "model": tkey, "nfe": nfe, **eval_key},
                            [os.path.join(directory, "eval.json")], run)
        if not rows:
            rows += [r for r in result["rows"] if r["model"] == "corrupted"]
        rows += [r for r in result["rows"] if r["model"] == "teacher"]
        print(format_table(rows[-1:]), flush=True)
    for nfe, (release, skey) in students.items():
        directory = os.path.join(work, task.degradation, "eval", f"student-nfe{nfe}")

        def run(resume: str, release=release, directory=directory) -> dict:
            payload = evaluate(teacher=None, student=release, run_dir=directory, **common)
            return {"rows": payload["results"]}

        result = stages.run(f"{task.degradation}: evaluate {nfe}-NFE student", directory,
                            {"stage": "eval", "model": skey, **eval_key},
                            [os.path.join(directory, "eval.json")], run)
        rows += [r for r in result["rows"] if r["model"] == "student"]
        print(format_table(rows[-1:]), flush=True)
    return add_comparisons(rows)


def reference_row(rows: list[dict]) -> Optional[dict]:
    """The teacher row the speedups are relative to: NFE 100, or the NFE it was capped to."""
    teachers = [r for r in rows if r["model"] == "teacher"]
    if not teachers:
        return None
    return min(teachers, key=lambda r: (abs(r["nfe"] - REFERENCE_NFE), -r["nfe"]))


def add_comparisons(rows: list[dict]) -> list[dict]:
    """Each row's speedup over the reference teacher, and each student's ``targets`` (see targets())."""
    ref = reference_row(rows)
    for row in rows:
        fast = row["model"] != "corrupted" and ref is not None and row["sec_per_image"]
        row["speedup_vs_teacher_100"] = ref["sec_per_image"] / row["sec_per_image"] if fast else None
    for row in rows:
        if row["model"] == "student":
            row["targets"] = targets(row, ref)
    return rows


def grid_stage(stages: Stages, preset: Preset, task: Task, data: str, work: str, device: str, seed: int,
               teacher: str, tkey: dict, students: dict[int, tuple[str, dict]]) -> dict:
    """corrupted | teacher-100 | each student | clean, on the first ``grid_images`` test images."""
    directory = os.path.join(work, task.degradation, "grid")
    path = os.path.join(directory, "grid.png")
    ref_nfe = min(REFERENCE_NFE, preset.bridge_steps - 1)
    key = {"stage": "grid", "teacher": tkey, "students": [k for _, k in students.values()], "nfe": ref_nfe,
           "images": preset.grid_images, "seed": seed}

    def run(resume: str) -> dict:
        batch = load_eval_data(data, task.degradation, preset.image_size, CHANNELS, preset.grid_images, seed)
        xT, mask = batch["xT"], batch.get("mask")
        columns = [xT, restore_with_teacher(load_model(teacher, device, "teacher").model, xT, ref_nfe,
                                            mask=mask, seed=seed, batch_size=preset.eval_batch)]
        for nfe, (release, _) in students.items():
            columns.append(restore_with_generator(load_model(release, device, "generator").model, xT, nfe,
                                                  mask=mask, seed=seed, batch_size=preset.eval_batch))
        columns.append(batch["x0"])
        save_grid(columns, path)
        return {"path": path, "columns": ["corrupted", f"teacher-{ref_nfe}"]
                + [f"student-{n}" for n in students] + ["clean"]}

    return stages.run(f"{task.degradation}: picture grid", directory, key, [path], run)


def run_task(stages: Stages, preset: Preset, task: Task, data: str, work: str, device: str, seed: int,
             clf: dict) -> dict:
    teacher, tkey = train_task_teacher(stages, preset, task, data, work, device, seed)
    students = {nfe: distill_task_student(stages, preset, task, teacher, tkey, nfe, work, device, seed)
                for nfe in task.student_nfe}
    rows = evaluate_task(stages, preset, task, data, work, device, seed, teacher, tkey, students, clf)
    grid = grid_stage(stages, preset, task, data, work, device, seed, teacher, tkey, students)
    return {"degradation": task.degradation, "beta_max": task.beta_max, "student_nfe": list(task.student_nfe),
            "teacher": teacher, "students": {str(n): r for n, (r, _) in students.items()},
            "rows": rows, "grid": grid, "reading": reading(rows)}


# The quality target per student, against the teacher at REFERENCE_NFE (the paper's claim at
# full scale): FID no higher, classifier accuracy within CA_POINTS points, time per image MIN_SPEEDUP x lower.
CA_POINTS = 1.0
MIN_SPEEDUP = 50.0


def targets(student: dict, ref: Optional[dict]) -> Optional[dict]:
    """The target checks of one student row against the reference teacher row (None without one)."""
    if ref is None or student.get("fid") is None or ref.get("fid") is None:
        return None
    speed = student.get("speedup_vs_teacher_100")
    checks = {"fid_at_most_teacher": student["fid"] <= ref["fid"],
              "ca_within_points": (student.get("ca") is not None and ref.get("ca") is not None
                                   and student["ca"] >= ref["ca"] - CA_POINTS),
              "speedup_at_least": speed is not None and speed >= MIN_SPEEDUP}
    return {"reference_nfe": ref["nfe"], "ca_points": CA_POINTS, "min_speedup": MIN_SPEEDUP, **checks,
            "met": all(checks.values())}


def _ca(row: dict) -> str:
    return "-" if row.get("ca") is None else f"{row['ca']:.1f}%"


def reading(rows: list[dict]) -> list[str]:
    """What the numbers say, one line per student, derived from the rows (add_comparisons' fields) only."""
    teachers = sorted((r for r in rows if r["model"] == "teacher"), key=lambda r: r["nfe"])
    ref = reference_row(rows)
    if not teachers or ref is None:
        return []
    top, one = teachers[-1], teachers[0]
    lines = []
    for s in (r for r in rows if r["model"] == "student"):
        check = s.get("targets")
        if check is None:
            continue
        misses = [what for what, ok in (
            (f"FID {s['fid']:.3g} > {ref['fid']:.3g}", check["fid_at_most_teacher"]),
            (f"CA {_ca(s)} more than {CA_POINTS:g} point below {_ca(ref)}", check["ca_within_points"]),
            (f"speedup {s.get('speedup_vs_teacher_100') or 0:.0f}x < {MIN_SPEEDUP:.0f}x", check["speedup_at_least"]),
        ) if not ok]
        verdict = ("meets the target" if check["met"] else "misses the target: " + "; ".join(misses))
        text = (f"student NFE {s['nfe']}: FID {s['fid']:.3g}, CA {_ca(s)} vs teacher NFE {ref['nfe']} "
                f"FID {ref['fid']:.3g}, CA {_ca(ref)}, {s.get('speedup_vs_teacher_100') or 0:.1f}x faster per "
                f"image: it {verdict} (FID <= teacher-{ref['nfe']}, CA within {CA_POINTS:g} point, "
                f">= {MIN_SPEEDUP:.0f}x faster).")
        others = [t for t in (top, one) if t is not ref and t.get("fid") is not None]
        if others:
            text += " Other teacher NFEs: " + ", ".join(
                f"NFE {t['nfe']} FID {t['fid']:.3g}" + (f" ({t['sec_per_image'] / s['sec_per_image']:.0f}x the "
                                                         f"student's time)" if t["nfe"] > ref["nfe"] and
                                                        s.get("sec_per_image") else "")
                for t in others) + "."
        lines.append(text)
    return lines


# ----------------------------------------------------------------------------
# Reports


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def markdown(report: dict) -> str:
    preset, env, clf = report["preset"], report["environment"], report["classifier"]
    lines = [
        f"# IBMD on Fashion-MNIST, scale `{report['scale']}` ({env['machine']})",
        "",
        f"{preset['note']}",
        "",
        f"- device {env['device']} ({env['device_name']}), {env['torch_threads']} torch threads, torch "
        f"{env['torch']}, ops backend {env['ops_backend']}, 1-min load average at the end "
        f"{_cell(env['load_average_1min'], '{:.2f}')} (other work on the machine inflates the times)",
        f"- data: Fashion-MNIST {preset['image_size']}x{preset['image_size']} grayscale; I2SB bridge of "
        f"{preset['bridge_steps']} steps, `{preset['arch']}` U-Net, unconditional as in I2SB",
        f"- teachers: {preset['teacher_steps']} steps at batch {preset['teacher_batch']}, lr {preset['teacher_lr']}; "
        f"students: K = {preset['distill_steps']} generator steps, L = {preset['inner_steps']}, batch "
        f"{preset['distill_batch']}, lr {preset['distill_lr']}, EMA {preset['distill_ema']}; precision "
        f"{preset['precision']}",
        f"- metrics on the first {preset['eval_images']} test images (restored in batches of "
        f"{preset['eval_batch']}): FID on the {clf['feature_dim']}-d features of the project's classifier "
        f"(trained on {clf['train_items']} clean training images, {clf['epochs']} epochs; "
        f"{clf['clean_test_accuracy']:.2f}% top-1 on {clf['clean_test_images']} clean test images), CA = its "
        "accuracy on the restored images, PSNR/SSIM against the clean images, wall-clock seconds per image",
        f"- teacher NFEs asked for: {', '.join(map(str, preset['teacher_nfe']))}; run: "
        f"{', '.join(map(str, report['teacher_nfe_run']))} (an I2SB bridge of N steps makes at most N - 1 "
        "network calls, so NFE 1000 on the 1000-step bridge is 999); speedups are relative to the teacher at "
        f"NFE {report['reference_nfe']}",
        "",
    ]
    checked = [(name, s) for name, task in report["tasks"].items() for s in task["rows"]
               if s["model"] == "student" and s.get("targets")]
    if checked:
        mark = {True: "yes", False: "**no**"}
        ref_nfe = report["reference_nfe"]
        lines += [f"Targets (the paper's claim, checked per student against the teacher at NFE {ref_nfe}): FID no "
                  f"higher, CA within {CA_POINTS:g} point, time per image at least {MIN_SPEEDUP:.0f}x lower.", "",
                  f"| task | student NFE | FID <= teacher-{ref_nfe} | CA within {CA_POINTS:g} pt | "
                  f">= {MIN_SPEEDUP:.0f}x faster | all met |", "|---|---:|---|---|---|---|"]
        lines += [f"| {name} | {s['nfe']} | {mark[s['targets']['fid_at_most_teacher']]} | "
                  f"{mark[s['targets']['ca_within_points']]} | {mark[s['targets']['speedup_at_least']]} | "
                  f"{mark[s['targets']['met']]} |" for name, s in checked]
        if any(len(TASKS[name].student_nfe) > 1 for name in report["tasks"] if name in TASKS):
            lines.append("\nWhere a task has several students, the many-step one is the paper's setting "
                         "(inpainting: 4 NFE); the 1-NFE one is there for comparison.")
        lines.append(f"\nA k-NFE student costs about k network calls against the teacher's {ref_nfe}, so it is at "
                     f"most about {ref_nfe}/k times faster: the {MIN_SPEEDUP:.0f}x target is within reach of "
                     f"students of up to {int(ref_nfe // MIN_SPEEDUP)} NFE.")
        lines.append("")
    for name, task in report["tasks"].items():
        lines += [f"## {name}", "",
                  "| model | NFE | FID | CA % | PSNR dB | SSIM | s/img | speedup vs teacher-100 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in task["rows"]:
            model = "corrupted input" if r["model"] == "corrupted" else r["model"]
            nfe = "-" if r["model"] == "corrupted" else str(r["nfe"])
            sec = "-" if r["model"] == "corrupted" else _cell(r["sec_per_image"], "{:.4g}")
            lines.append(f"| {model} | {nfe} | {_cell(r.get('fid'), '{:.3f}')} | {_cell(r.get('ca'), '{:.1f}')} | "
                         f"{_cell(r.get('psnr'), '{:.2f}')} | {_cell(r.get('ssim'), '{:.4f}')} | {sec} | "
                         f"{_cell(r.get('speedup_vs_teacher_100'), '{:.1f}x')} |")
        lines.append("")
        lines += [f"- {line}" for line in task["reading"]]
        lines += [f"- grid: `{os.path.basename(task['grid_png'])}` (columns: "
                  f"{' | '.join(task['grid_columns'])})", ""]
    lines += [f"FID against seconds per image: `{os.path.basename(report['plot'])}` (drawn with "
              f"{report['plot_backend']}).", "",
              f"Stages ({report['total_stage_seconds']:.0f} s of compute in all, {report['wall_seconds']:.0f} s "
              "in this invocation):", ""]
    lines += [f"- {s['stage']}: {s['seconds']:.1f} s{' (earlier run)' if s['skipped'] else ''}"
              for s in report["stages"]]
    return "\n".join(lines) + "\n"


def labelled_grid(src: str, dst: str, columns: list[str], image_size: int, pad: int = 2) -> None:
    """``src`` (``evaluate.save_grid``'s layout: one column per model) enlarged to about 128 px per image
    (nearest neighbour, pixels stay sharp) under a header naming the columns."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, 128 // image_size)
    with Image.open(src) as grid:
        grid = grid.convert("RGB")
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    header = 22
    out = Image.new("RGB", (grid.width, grid.height + header), "white")
    out.paste(grid, (0, header))
    draw = ImageDraw.Draw(out)
    for j, name in enumerate(columns):
        center = scale * (pad + j * (image_size + pad) + image_size / 2)
        draw.text((center - draw.textlength(name, font=font) / 2, 4), name, fill="black", font=font)
    out.save(dst, format="PNG")


def printable(rows: list[dict]) -> list[dict]:
    """Rows for ``format_table``: the speedup as ``12.3x``, the target checks as one word."""
    out = []
    for row in rows:
        row = dict(row)
        speed = row.pop("speedup_vs_teacher_100", None)
        row["vs teacher-100"] = f"{speed:.1f}x" if speed else "-"
        check = row.pop("targets", None)
        row["targets"] = "-" if check is None else ("met" if check["met"] else "missed")
        out.append(row)
    return out


def plot_fid_vs_time(tasks: dict[str, list[dict]], path: str, title: str) -> str:
    """FID against seconds per image (log x) for every teacher NFE and student, one panel per task.

    matplotlib when it is installed, else the same picture drawn with PIL. Returns which drew it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        _plot_pil(tasks, path, title)
        return "PIL"
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tasks.items()):
        teachers = sorted((r for r in rows if r["model"] == "teacher" and r.get("fid") is not None),
                          key=lambda r: r["sec_per_image"])
        students = [r for r in rows if r["model"] == "student" and r.get("fid") is not None]
        ax.plot([r["sec_per_image"] for r in teachers], [r["fid"] for r in teachers], "o-", color="tab:blue",
                label="teacher")
        ax.plot([r["sec_per_image"] for r in students], [r["fid"] for r in students], "D", color="tab:red",
                label="IBMD student", linestyle="none")
        for r in teachers + students:
            ax.annotate(f"{'T' if r['model'] == 'teacher' else 'S'}{r['nfe']}", (r["sec_per_image"], r["fid"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        corrupted = next((r for r in rows if r["model"] == "corrupted" and r.get("fid") is not None), None)
        if corrupted:
            ax.axhline(corrupted["fid"], color="gray", linestyle="--", linewidth=1, label="corrupted input")
        ax.set_xscale("log")
        timed = [r["sec_per_image"] for r in teachers + students if r["sec_per_image"]]
        if timed:
            lo, hi = _log_range(timed)
            ax.set_xlim(10 ** lo, 10 ** hi)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        fids = [r["fid"] for r in teachers + students] + ([corrupted["fid"]] if corrupted else [])
        ax.set_ylim(0, 1.1 * max(fids) if fids and max(fids) > 0 else None)
        ax.set_xlabel("seconds per image (log scale)")
        ax.set_ylabel("FID")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "matplotlib"


def _log_range(seconds: list[float]) -> tuple[float, float]:
    """log10 limits of the time axis: the points with room for their labels, at least one decade wide."""
    logs = [math.log10(x) for x in seconds]
    lo, hi = min(logs) - 0.2, max(logs) + 0.3
    if hi - lo < 1.0:
        mid = (hi + lo) / 2
        lo, hi = mid - 0.5, mid + 0.5
    return lo, hi


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _plot_pil(tasks: dict[str, list[dict]], path: str, title: str) -> None:
    """The matplotlib picture of ``plot_fid_vs_time`` with PIL only: axes, ticks, labelled points."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    panel_w, panel_h, top_band = 440, 380, 28
    left, right, top, bottom = 58, 16, 50, 46  # plot-area margins inside a panel
    image = Image.new("RGB", (panel_w * len(tasks), panel_h + top_band), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    blue, red, gray = (31, 119, 180), (214, 39, 40), (128, 128, 128)

    for k, (name, rows) in enumerate(tasks.items()):
        x0, y0 = k * panel_w + left, top_band + top
        x1, y1 = (k + 1) * panel_w - right, top_band + panel_h - bottom
        points = [r for r in rows if r["model"] != "corrupted" and r.get("fid") is not None
                  and r.get("sec_per_image")]
        corrupted = next((r["fid"] for r in rows if r["model"] == "corrupted" and r.get("fid") is not None), None)
        draw.text((x0, top_band + 8), name, fill="black", font=font)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        if not points:
            continue
        # x: log10 of seconds; y: FID from 0
        lo, hi = _log_range([r["sec_per_image"] for r in points])
        fids = [r["fid"] for r in points] + ([corrupted] if corrupted is not None else [])
        yticks = _nice_ticks(0.0, max(fids) * 1.08)
        ymax = yticks[-1]

        def px(sec: float) -> float:
            return x0 + (math.log10(sec) - lo) / (hi - lo) * (x1 - x0)

        def py(fid: float) -> float:
            return y1 - fid / ymax * (y1 - y0)

        for value in yticks:
            y = py(value)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.line([x0 + 1, y, x1 - 1, y], fill=(235, 235, 235))
            text = f"{value:g}"
            draw.text((x0 - 8 - draw.textlength(text, font=font), y - 7), text, fill="black", font=font)
        for decade in range(math.floor(lo), math.ceil(hi) + 1):
            for mult in range(1, 10):
                value = mult * 10.0 ** decade
                if not lo <= math.log10(value) <= hi:
                    continue
                x = px(value)
                labelled = mult == 1 or (hi - lo < 2.0 and mult in (2, 5))
                draw.line([x, y1, x, y1 + (6 if labelled else 3)], fill="black")
                if labelled:
                    draw.line([x, y0 + 1, x, y1 - 1], fill=(235, 235, 235))
                    text = f"{value:g}"
                    draw.text((x - draw.textlength(text, font=font) / 2, y1 + 8), text, fill="black", font=font)
        xlabel = "seconds per image (log scale)"
        draw.text(((x0 + x1) / 2 - draw.textlength(xlabel, font=font) / 2, y1 + 26), xlabel, fill="black",
                  font=font)
        draw.text((x0 - 50, y0 - 8), "FID", fill="black", font=font)
        if corrupted is not None:
            y = py(corrupted)
            for x in range(int(x0), int(x1), 8):
                draw.line([x, y, min(x + 4, x1), y], fill=gray)
        teachers = sorted((r for r in points if r["model"] == "teacher"), key=lambda r: r["sec_per_image"])
        if len(teachers) > 1:
            draw.line([(px(r["sec_per_image"]), py(r["fid"])) for r in teachers], fill=blue, width=2)
        for r in points:
            x, y = px(r["sec_per_image"]), py(r["fid"])
            if r["model"] == "teacher":
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=blue)
                label, color = f"T{r['nfe']}", blue
            else:
                draw.polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], fill=red)
                label, color = f"S{r['nfe']}", red
            draw.text((x + 6, y - 16), label, fill=color, font=font)
        # legend, in the band between the panel's name and the plot area
        lx, ly = x0, top_band + 26
        draw.ellipse([lx, ly + 3, lx + 8, ly + 11], fill=blue)
        draw.text((lx + 13, ly), "teacher (T<NFE>)", fill="black", font=font)
        lx += 130
        draw.polygon([(lx + 4, ly + 1), (lx + 10, ly + 7), (lx + 4, ly + 13), (lx - 2, ly + 7)], fill=red)
        draw.text((lx + 13, ly), "IBMD student (S<NFE>)", fill="black", font=font)
        lx += 165
        for x in (lx, lx + 8):
            draw.line([x, ly + 7, x + 4, ly + 7], fill=gray)
        draw.text((lx + 17, ly), "corrupted", fill="black", font=font)
    image.save(path, format="PNG")


# ----------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scale", choices=sorted(PRESETS), default="cpu", help="preset (PRESETS at the top)")
    parser.add_argument("--tasks", default=",".join(TASKS), metavar="LIST", help="comma-separated tasks")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST_DIR), metavar="DIR",
                        help="folder of the Fashion-MNIST idx files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=None, help="results name (default: GPU name or cpu-<n>core)")
    parser.add_argument("--out-dir", default=RESULTS, metavar="DIR", help="where the JSON, Markdown and PNGs go")
    parser.add_argument("--work-dir", default=os.path.join("runs", "paper_table"), metavar="DIR",
                        help="run directories (one subfolder per scale); finished stages there are reused")
    parser.add_argument("--eval-images", type=int, default=None, metavar="N",
                        help="override the preset's number of evaluation images (the first N of the test split)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    args = parser.parse_args(argv)

    preset = PRESETS[args.scale]
    if args.eval_images is not None:
        if args.eval_images < 2:
            parser.error("--eval-images must be at least 2")
        preset = dataclasses.replace(preset, eval_images=args.eval_images, eval_batch=min(preset.eval_batch,
                                                                                          args.eval_images))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    problem = check_data(args.data_dir)
    if problem is not None:
        print(f"error: Fashion-MNIST is not available: {problem}\n"
              f"Install it with `apt-get install dataset-fashion-mnist` (it puts the idx files in "
              f"{FASHION_MNIST_DIR}), or pass --data-dir DIR.", file=sys.stderr)
        return 1
    device = resolve_device(args.device)
    machine = args.machine or machine_name(device)
    work = os.path.join(args.work_dir, args.scale)
    data = data_spec(args.data_dir)
    stem = os.path.join(args.out_dir, f"paper_table-{args.scale}-{machine}")
    if args.dry_run:
        print(json.dumps({"scale": args.scale, "preset": {**dataclasses.asdict(preset), "note": preset.describe()},
                          "tasks": {t: dataclasses.asdict(TASKS[t]) for t in tasks},
                          "teacher_nfe_run": capped_nfe(preset), "device": device, "machine": machine,
                          "approx_image_network_calls": workload(preset, tasks),
                          "data": data, "work_dir": work, "outputs": stem + ".{json,md,png}"}, indent=2))
        return 0

    print(f"paper_table: scale {args.scale} on {machine} ({device}, {torch.get_num_threads()} threads), "
          f"tasks {', '.join(tasks)}, work dir {work}", flush=True)
    print(f"note: {preset.describe()}", flush=True)
    start = time.perf_counter()
    stages = Stages()
    clf = classifier_stage(stages, preset, data, args.data_dir, work, device, args.seed)
    results = {name: run_task(stages, preset, TASKS[name], data, work, device, args.seed, clf) for name in tasks}

    os.makedirs(args.out_dir, exist_ok=True)
    for name, task in results.items():
        task["grid_png"] = f"{stem}-{name}.png"
        task["grid_columns"] = task["grid"]["columns"]
        labelled_grid(task["grid"]["path"], task["grid_png"], task["grid_columns"], preset.image_size)
    plot = f"{stem}-fid-vs-time.png"
    title = f"IBMD on Fashion-MNIST, scale {args.scale}, {machine}: FID vs seconds per image"
    backend = plot_fid_vs_time({n: t["rows"] for n, t in results.items()}, plot, title)
    report = {
        "scale": args.scale,
        "preset": {**dataclasses.asdict(preset), "note": preset.describe()},
        "environment": environment(device, machine),
        "data": data,
        "classifier": clf,
        "teacher_nfe_run": capped_nfe(preset),
        "reference_nfe": min(REFERENCE_NFE, preset.bridge_steps - 1),
        "tasks": results,
        "plot": plot,
        "plot_backend": backend,
        "stages": stages.log,
        "total_stage_seconds": sum(s["seconds"] for s in stages.log),
        "wall_seconds": time.perf_counter() - start,
        "work_dir": work,
    }
    write_json(stem + ".json", report)
    text = markdown(report)
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write(text)
    for name, task in results.items():
        print(f"\n{name}\n{format_table(printable(task['rows']))}")
        for line in task["reading"]:
            print(f"  {line}")
    print(f"\nwrote {stem}.json, {stem}.md, the grids {stem}-<task>.png and {plot} "
          f"({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
