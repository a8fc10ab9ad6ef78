"""Stages that run once, are skipped when done, and resume when interrupted; the training stages."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import torch

from _common import write_json
from ibmd_fast.data import FASHION_MNIST_DIR, FashionMNIST
from ibmd_fast.metrics import classifier_accuracy
from ibmd_fast.classifier import save_classifier, train_classifier
from ibmd_fast.release import atomic_write
from ibmd_fast.train import DistillConfig, TeacherConfig, distill, train_teacher
from paper.config import CHANNELS, Preset, Task, reference_nfe


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so recorded and current keys compare."""
    return json.loads(json.dumps(value))


class Stages:
    """Runs each stage at most once per set of settings.

    A stage's directory holds ``stage.json``: its settings (``key``), whether it finished, its
    seconds and its result. A finished stage with the same key whose outputs exist is skipped; an
    unfinished one with the same key resumes (``resume="auto"``: the trainers continue from their
    newest checkpoint); one recorded with other settings starts over (``resume="none"``).
    """

    def __init__(self, work: str):
        self.work = work  # the scale's folder: one subfolder per task and stage
        self.log: list[dict] = []

    def run(self, label: str, directory: str, key: dict, outputs: list[str], fn: Callable[[str], dict]) -> dict:
        marker = os.path.join(directory, "stage.json")
        key = plain(key)
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
        result = plain(fn(resume))
        # trainers report their seconds over all resumed pieces; other stages are timed here
        seconds = float(result.get("seconds", time.perf_counter() - start))
        write_json(marker, {"key": key, "done": True, "seconds": seconds, "result": result})
        print(f"[{label}] done in {seconds:.1f} s", flush=True)
        self.log.append({"stage": label, "seconds": seconds, "skipped": False})
        return result


def data_spec(data_dir: str) -> str:
    return (
        "fashion-mnist"
        if os.path.abspath(data_dir) == os.path.abspath(FASHION_MNIST_DIR)
        else f"fashion-mnist:{data_dir}"
    )


def check_data(data_dir: str) -> Optional[str]:
    """None when both splits of Fashion-MNIST load from ``data_dir``, else why not."""
    try:
        for split in ("train", "test"):
            FashionMNIST(root=data_dir, split=split)
    except (FileNotFoundError, ValueError) as exc:
        return str(exc)
    return None


def task_dir(work: str, name: str) -> str:
    return os.path.join(work, name)


def teacher_key(preset: Preset, task: Task, data: str, seed: int) -> dict:
    fields = (
        "image_size",
        "arch",
        "bridge_steps",
        "teacher_steps",
        "teacher_batch",
        "teacher_lr",
        "teacher_ema",
        "precision",
        "channels_last",
    )
    return {
        "stage": "teacher",
        "task": dataclasses.asdict(task),
        "data": data,
        "seed": seed,
        **{f: getattr(preset, f) for f in fields},
    }


def train_task_teacher(
    stages: Stages, preset: Preset, name: str, task: Task, data: str, work: str, device: str, seed: int
) -> tuple[str, dict]:
    """The task's teacher by bridge matching (MATH.md 4): its bridge, conditional or not."""
    directory = os.path.join(task_dir(work, name), "teacher")
    release = os.path.join(directory, "teacher.safetensors")
    key = teacher_key(preset, task, data, seed)

    def run(resume: str) -> dict:
        out = train_teacher(
            TeacherConfig(
                run_dir=directory,
                data=data,
                degradation=task.degradation,
                image_size=preset.image_size,
                channels=CHANNELS,
                bridge=task.bridge,
                beta_max=task.beta_max,
                n_steps=preset.bridge_steps,
                conditional=task.conditional,
                arch=preset.arch,
                batch_size=preset.teacher_batch,
                lr=preset.teacher_lr,
                steps=preset.teacher_steps,
                ema_decay=preset.teacher_ema,
                precision=preset.precision,
                channels_last=preset.channels_last,
                seed=seed,
                device=device,
                workers=preset.workers,
                log_every=preset.log_every,
                ckpt_every=preset.teacher_ckpt_every,
                keep_ckpts=2,
                resume=resume,
                sample_nfe=reference_nfe(preset),
            )
        )  # the release's sample grid at the table's reference NFE
        return {"release": out["release"], "steps": out["steps"], "loss": out["loss"], "seconds": out["seconds"]}

    stages.run(f"{name}: teacher", directory, key, [release], run)
    return release, key


def distill_task_student(
    stages: Stages, preset: Preset, name: str, teacher: str, tkey: dict, nfe: int, seed: int, work: str, device: str
) -> tuple[str, dict]:
    """One IBMD student (Algorithm 1) of ``nfe`` steps, distilled with ``seed``."""
    directory = os.path.join(task_dir(work, name), f"student-nfe{nfe}-seed{seed}")
    release = os.path.join(directory, "generator.safetensors")
    fields = (
        "distill_steps",
        "inner_steps",
        "distill_batch",
        "distill_lr",
        "distill_ema",
        "precision",
        "channels_last",
    )
    key = {"stage": "distill", "teacher": tkey, "nfe": nfe, "seed": seed, **{f: getattr(preset, f) for f in fields}}

    def run(resume: str) -> dict:
        out = distill(
            DistillConfig(
                run_dir=directory,
                teacher=teacher,
                nfe=nfe,
                inner_steps=preset.inner_steps,
                steps=preset.distill_steps,
                batch_size=preset.distill_batch,
                lr=preset.distill_lr,
                fake_lr=preset.distill_lr,
                ema_decay=preset.distill_ema,
                precision=preset.precision,
                channels_last=preset.channels_last,
                seed=seed,
                device=device,
                workers=preset.workers,
                log_every=preset.log_every,
                ckpt_every=preset.distill_ckpt_every,
                keep_ckpts=2,
                resume=resume,
                eval_items=0,
            )
        )
        return {
            "release": out["release"],
            "steps": out["steps"],
            "loss_theta": out["loss_theta"],
            "loss_phi": out["loss_phi"],
            "seconds": out["seconds"],
        }

    stages.run(f"{name}: distill {nfe}-NFE student, seed {seed}", directory, key, [release], run)
    return release, key


def _split_tensors(data_dir: str, split: str, size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = FashionMNIST(root=data_dir, split=split, size=size, channels=CHANNELS)
    n = len(dataset) if count <= 0 else min(count, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def classifier_stage(
    stages: Stages, preset: Preset, data: str, data_dir: str, work: str, device: str, seed: int
) -> dict:
    """The FID/CA classifier (a small ResNet, ibmd_fast.classifier), trained on the clean training split,
    with its top-1 accuracy on the clean test split."""
    directory = os.path.join(work, "classifier")
    path = os.path.join(directory, "classifier.safetensors")
    key = {
        "stage": "classifier",
        "data": data,
        "image_size": preset.image_size,
        "seed": seed,
        "items": preset.classifier_items,
        "epochs": preset.classifier_epochs,
        "width": preset.classifier_width,
        "test_images": preset.classifier_test_images,
    }

    def run(resume: str) -> dict:
        images, labels = _split_tensors(data_dir, "train", preset.image_size, preset.classifier_items)
        print(f"  classifier: {images.shape[0]} clean training images, {preset.classifier_epochs} epoch(s)", flush=True)
        # no flips or shifts: a few epochs learn faster without them (the 88% bar is met without)
        clf = train_classifier(
            (images, labels),
            epochs=preset.classifier_epochs,
            width=preset.classifier_width,
            augment="none",
            seed=seed,
            device=device,
            progress=True,
            log=lambda line: print("  " + line, flush=True),
        )
        atomic_write(path, lambda tmp: save_classifier(clf, tmp))
        test_x, test_y = _split_tensors(data_dir, "test", preset.image_size, preset.classifier_test_images)
        accuracy = classifier_accuracy(clf, test_x, test_y)
        print(f"  classifier: {accuracy:.2f}% top-1 on {test_x.shape[0]} clean test images", flush=True)
        return {
            "path": path,
            "clean_test_accuracy": accuracy,
            "clean_test_images": int(test_x.shape[0]),
            "train_items": int(images.shape[0]),
            "epochs": preset.classifier_epochs,
            "width": preset.classifier_width,
            "feature_dim": int(clf.feature_dim),
        }

    return stages.run("classifier", directory, key, [path], run)
