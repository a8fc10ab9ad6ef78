"""What the teacher trainer and the IBMD distiller share.

- ``RunLog`` (in ``rundir``): ``log.txt`` (what was printed), ``stats.jsonl`` (a JSON line per log step),
  ``config.json``; rank 0 only.
- ``Precision``: autocast (bf16/fp16, CUDA only) and the fp16 GradScaler.
- ``OptimizerStep`` (in ``optim``): gradient clipping and the non-finite guard, with one decision
  for every rank.
- ``as_config``, ``find_checkpoint``, ``restore_rank_rng``, ``RunCheckpoints``, ``set_lr``,
  ``fmt_value``: the config, resume, checkpoint and logging steps every trainer takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Iterable, Optional

import torch

from ibmd_fast.seeds import capture_rng, derive_seed, restore_rng, seed_everything
from ibmd_fast.train.distributed import DistEnv
from ibmd_fast.train.optim import TrainingDivergedError
from ibmd_fast.train.checkpoint import CheckpointIO, CheckpointMismatchError
from ibmd_fast.train.rundir import RunLog, find_resume

__all__ = [
    "Precision",
    "config_dict",
    "check_compatible",
    "check_training_options",
    "check_steps_taken",
    "check_kind",
    "progress_bar",
    "Meter",
    "as_config",
    "set_lr",
    "fmt_value",
    "find_checkpoint",
    "restore_rank_rng",
    "RunCheckpoints",
]

# ----------------------------------------------------------------------------
# Configs


def config_dict(cfg) -> dict:
    """A config dataclass as a JSON-normalized dict (tuples become lists, paths strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=os.fspath))


def check_kind(payload: dict, kind: str, path: str) -> None:
    """A teacher-training checkpoint cannot resume a distillation, and the other way round."""
    if payload.get("kind") != kind:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a {payload.get('kind', 'unknown')!r} run, "
            f"not a {kind!r} one; use another --run-dir or --resume none"
        )


def check_compatible(saved: dict, current: dict, keys: Iterable[str], path: str) -> None:
    """One ``CheckpointMismatchError`` naming every differing key among ``keys``."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs lists)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
        for k in keys
        if norm(saved.get(k)) != norm(current.get(k))
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for another model or task:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --run-dir, or --resume none to start over."
        )


def check_training_options(saved: dict, current: dict, keys: Iterable[str], path: str, allow: bool, log) -> None:
    """A resumed run whose training options (``keys``) differ from the checkpoint's: refused with one line
    naming each option, unless ``allow`` (``--allow-config-change``), when the differences are logged."""
    diffs = [
        f"--{k.replace('_', '-')} {current[k]} (checkpoint: {saved[k]})"
        for k in keys
        if k in saved and k in current and saved[k] != current[k]
    ]
    if not diffs:
        return
    if allow:
        log(f"note: resuming {path} with changed options: {', '.join(diffs)}")
        return
    raise CheckpointMismatchError(
        f"resuming {path} with other training options than it was written with: {', '.join(diffs)}; give the "
        "checkpoint's values, or pass --allow-config-change to go on with the new ones"
    )


def check_steps_taken(name: str, skipped: int, steps: int, log) -> None:
    """A run in which every optimizer step of ``name`` was skipped (non-finite loss or gradient) has learnt
    nothing: ``TrainingDivergedError`` instead of a release that looks trained."""
    if steps > 0 and skipped >= steps:
        message = (
            f"every one of the {steps} {name} step(s) of this run was skipped (non-finite loss or gradient); "
            "no release written. Check the teacher and the data, or lower --lr"
        )
        log.record(f"error: {message}")
        raise TrainingDivergedError(message)


def as_config(cls, cfg, overrides):
    if cfg is None:
        cfg = cls()
    elif isinstance(cfg, dict):
        cfg = cls(**cfg)
    if overrides:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} setting(s): {unknown}")
        cfg = cls(**{**config_dict(cfg), **overrides})
    for field in dataclasses.fields(cls):  # NaN passes every range check; Inf overflows what it scales
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    return cfg


# ----------------------------------------------------------------------------
# Run machinery both trainers use (resume, learning rate, log formatting)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def fmt_value(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def find_checkpoint(resume: str, ckpt: CheckpointIO, log: RunLog, env) -> Optional[tuple[str, dict]]:
    """The checkpoint to resume from (``rundir.find_resume``: ``auto`` the newest readable one, a path
    that file, ``none`` nothing); its warnings also go to log.txt."""
    ckpt.log = log.record
    return find_resume(resume, ckpt, env)


class RunCheckpoints:
    """A run's checkpoints, written the same way by both trainers.

    ``save(step, data_position)``: every rank's random states are gathered and rank 0 writes
    ``ckpt.save`` with ``fields`` (kind, config, ...), the data position and the run's seconds so
    far; then all ranks meet. ``periodic``: the checkpoint of every ``ckpt_every`` steps, held back
    (with a log line) while steps are being skipped. ``final``: the last one, unless that step was
    just saved. ``saved_at`` starts at the resumed step (or -1).
    """

    def __init__(
        self,
        ckpt: "CheckpointIO",
        env,
        rng: torch.Generator,
        started: float,
        seconds_before: float,
        saved_at: int,
        **fields,
    ):
        self.ckpt, self.env, self.rng = ckpt, env, rng
        self.started, self.seconds_before = started, seconds_before
        self.saved_at = saved_at
        self.fields = fields

    def seconds(self) -> float:
        """Training seconds of the whole run, resumed parts included."""
        return self.seconds_before + time.perf_counter() - self.started

    def save(self, step: int, data_position: int) -> None:
        states = self.env.gather(capture_rng(self.rng))
        if self.env.is_main:
            self.ckpt.save(step, **self.fields, rng=states, data_position=data_position, seconds=self.seconds())
        self.saved_at = step
        self.env.barrier()

    def periodic(self, step: int, data_position: int, skipping: bool, log) -> None:
        if skipping:
            log(f"step {step}: no checkpoint while steps are being skipped")
        else:
            self.save(step, data_position)

    def final(self, step: int, data_position: int) -> None:
        if self.saved_at != step:
            self.save(step, data_position)


def restore_rank_rng(payload: dict, rng: torch.Generator, env, log) -> None:
    states = payload["rng"]
    if len(states) == env.world_size:
        restore_rng(states[env.rank], rng)
    else:
        # Another number of processes: the run goes on, with fresh noise streams.
        log(
            f"note: checkpoint written by {len(states)} process(es), resuming with {env.world_size}: "
            "noise streams are re-seeded (the run is not bit-identical to an uninterrupted one)"
        )
        rng.manual_seed(derive_seed(int(payload["step"]), env.rank, 2))
        seed_everything(derive_seed(int(payload["step"]), env.rank, 3) % 2**31)


# ----------------------------------------------------------------------------
# Output files


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    """tqdm on stderr; off when asked, on ranks other than 0, and when stderr is not a TTY."""
    from tqdm.auto import tqdm

    on = enabled and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not on, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------
# Precision and optimizer steps


class Precision:
    """Autocast and loss scaling for one run. Low precision is a CUDA feature: on CPU the run is fp32."""

    def __init__(self, name: str, device: torch.device, log=None):
        if name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {name!r}")
        if name != "fp32" and device.type != "cuda":
            if log is not None:
                log(f"note: precision {name} applies on CUDA only; running fp32 on {device}")
            name = "fp32"
        self.name = name
        self.device = device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler("cuda" if self.device.type == "cuda" else "cpu", enabled=self.name == "fp16")


class Meter:
    """Running means of named values between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.steps = 0

    def add(self, **values) -> None:
        """Python numbers, or 0-d tensors (summed where they are, so adding one never syncs the host)."""
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().double()
                finite = torch.isfinite(v)
                self.sums[k] = self.sums.get(k, 0.0) + torch.where(finite, v, torch.zeros_like(v))
                self.counts[k] = self.counts.get(k, 0) + finite.long()
                continue
            finite = v is not None and math.isfinite(v)
            # every key is registered even when its value is skipped: ranks all-reduce the same list
            self.sums[k] = self.sums.get(k, 0.0) + (float(v) if finite else 0.0)
            self.counts[k] = self.counts.get(k, 0) + int(finite)

    def means(self, env: DistEnv) -> dict[str, Optional[float]]:
        """Means over the interval and over ranks (None when nothing finite was seen)."""
        keys = sorted(self.sums)
        flat = []
        for k in keys:
            flat += [float(self.sums[k]), float(self.counts[k])]
        flat = env.all_reduce_sum(flat) if keys else []
        out = {}
        for i, k in enumerate(keys):
            s, c = flat[2 * i], flat[2 * i + 1]
            out[k] = s / c if c else None
        return out

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.t0 = time.perf_counter()
        self.steps = 0
