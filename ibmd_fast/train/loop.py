"""The one training loop of both trainers, in the manner of NVlabs/edm's ``training_loop``.

``run_training(cfg, build)`` owns the run: the run dir's lock, ``log.txt`` / ``stats.jsonl`` /
``config.json`` (``RunLog``), resume (the checkpoint, the data position, each rank's noise), the
progress bar, a stats row and a log line every ``log_every`` steps, the checkpoints of every
``ckpt_every`` steps and the last one, divergence (``TrainingDivergedError``: 20 non-finite
steps in a row, or a run whose every step was skipped) and the run's seconds. The trainer's part
is a ``TrainingTask`` that ``build(env, log, precision)`` returns: its networks and optimizers
(the state objects of the checkpoints), its step, its part of a stats row, its sample grids and its
release. The teacher trainer (MATH.md 4) and the IBMD distiller (MATH.md 5) are two such tasks.

Both therefore share every feature of the loop: fused AdamW with the device-side guard
(``OptimizerStep``: the divergence error is raised at log steps, where ``check`` reads the
counters), the held-back checkpoint while steps are being skipped, bit-identical resumption.
"""

from __future__ import annotations

import abc
import os
import time
from typing import Callable, Optional

import torch

from ibmd_fast.seeds import seed_everything
from ibmd_fast.train import distributed
from ibmd_fast.train.batches import BatchStream
from ibmd_fast.train.checkpoint import CheckpointIO
from ibmd_fast.train.common import (
    Meter,
    Precision,
    RunCheckpoints,
    check_compatible,
    check_kind,
    check_steps_taken,
    check_training_options,
    config_dict,
    find_checkpoint,
    progress_bar,
    restore_rank_rng,
    set_lr,
)
from ibmd_fast.train.optim import OptimizerStep, TrainingDivergedError
from ibmd_fast.train.rundir import RunLog, finished, finished_summary, run_lock

__all__ = ["TrainingTask", "run_training"]


class TrainingTask(abc.ABC):
    """What a trainer hands the loop. The trainer sets these attributes and defines the methods below.

    - ``kind``: ``"teacher"`` | ``"distill"``: the checkpoints' kind (a run refuses the other's) and the
      progress bar's label.
    - ``release``: the file the run writes at the end (a finished run is one whose release exists).
    - ``dataset``: the training data, read through a resumable ``BatchStream``.
    - ``noise``: this rank's ``torch.Generator`` (its state is saved per rank in each checkpoint).
    - ``guards``: stats key -> ``OptimizerStep``, the main optimizer's first (``"skipped"``): each row
      carries their skip counts, a checkpoint is held back while any is skipping, and a run whose
      every step of the first was skipped writes no release.
    - ``learning_rates``: ``[(optimizer, lr)]``, the run's settings, set again after a checkpoint loads.
    - ``model_keys`` / ``training_keys``: settings a checkpoint must share with the run that resumes it /
      may change only with ``--allow-config-change``.
    - ``model_config``: None (``model_keys`` are compared in the checkpoint's ``config``), or a dict
      saved as the checkpoint's ``model`` and compared there.
    - ``config_extra``: entries of ``config.json`` after the settings and ``world_size``.
    - ``last_keys``: stats keys whose latest values the summary and the release carry.
    """

    kind: str
    release: str
    dataset: torch.utils.data.Dataset
    noise: torch.Generator
    guards: dict[str, OptimizerStep]
    learning_rates: list[tuple[torch.optim.Optimizer, float]]
    model_keys: tuple[str, ...]
    training_keys: tuple[str, ...]
    model_config: Optional[dict] = None
    config_extra: dict = {}
    last_keys: tuple[str, ...]

    @abc.abstractmethod
    def state_objects(self) -> dict:
        """name -> object with ``state_dict`` / ``load_state_dict``: what a checkpoint holds."""

    def finished_extra(self) -> dict:
        """Summary entries of a finished run rerun, beside ``rundir.finished_summary``'s."""
        return {}

    def prepare(self) -> None:
        """Compile and DDP-wrap, after a checkpoint was loaded into the plain modules."""

    @abc.abstractmethod
    def step(self, stream: BatchStream, meter: Meter) -> None:
        """One training step: its batches from ``stream``, its values added to ``meter``."""

    @abc.abstractmethod
    def stats(self, means: dict) -> dict:
        """The task's part of a stats row (between ``step`` and ``it_per_s``), from the meter's means."""

    @abc.abstractmethod
    def log_line(self, row: dict) -> str:
        """The log line of a stats row."""

    @abc.abstractmethod
    def write_samples(self, step: int) -> None:
        """The sample grid ``samples-<step>.png`` (rank 0 only)."""

    @abc.abstractmethod
    def finish(self, step: int, last: dict) -> dict:
        """On every rank after the last checkpoint: the last grid and the release (rank 0 writes them);
        returns summary entries of the task's own."""


def run_training(cfg, build: Callable[[distributed.DistEnv, RunLog, Precision], TrainingTask]) -> dict:
    """Run a training task on the config ``cfg`` (a ``TeacherConfig`` or ``DistillConfig``; the run's
    settings: run_dir, device, precision, batch_size, steps, seed, workers, log_every, ckpt_every,
    keep_ckpts, sample_every, resume, allow_config_change, progress).

    Under torchrun every rank calls it; rank 0 holds the run dir's lock and writes the files.
    ``build(env, log, precision)`` makes the task, after the lock is taken. Returns the summary
    ``{"run_dir", "release", "steps", <last_keys>, <skip counts>, "seconds", <finish's entries>}``.
    """
    env = distributed.init(cfg.device)
    with run_lock(cfg.run_dir, env):
        t_start = time.perf_counter()
        log = RunLog(cfg.run_dir, env)
        local_batch = distributed.local_batch_size(cfg.batch_size, env)
        precision = Precision(cfg.precision, env.device, log)
        task = build(env, log, precision)
        return _loop(cfg, task, env, log, local_batch, t_start)


def _loop(cfg, task: TrainingTask, env: distributed.DistEnv, log: RunLog, local_batch: int, t_start: float) -> dict:
    # The global generators (dropout, if any), seeded after the task is built so a resumed run restores them.
    seed_everything(cfg.seed + env.rank)

    # Resume.
    ckpt = CheckpointIO(os.path.join(cfg.run_dir, "checkpoints"), cfg.keep_ckpts, **task.state_objects())
    run_config = config_dict(cfg)
    start_step, seconds_before, position = 0, 0.0, 0
    found = find_checkpoint(cfg.resume, ckpt, log, env)
    if found is not None:
        path, payload = found
        check_kind(payload, task.kind, path)
        if task.model_config is None:
            check_compatible(payload["config"], run_config, task.model_keys, path)
        else:
            check_compatible(payload["model"], task.model_config, task.model_keys, path)
        if finished(payload, cfg.steps, task.release):
            return {**finished_summary(cfg.run_dir, task.release, payload, log, cfg.steps), **task.finished_extra()}
        check_training_options(payload["config"], run_config, task.training_keys, path, cfg.allow_config_change, log)
        ckpt.load(payload, path)
        for optimizer, lr in task.learning_rates:  # the run's settings win over those saved with the optimizers
            set_lr(optimizer, lr)
        start_step = int(payload["step"])
        seconds_before = float(payload.get("seconds", 0.0))
        position = int(payload["data_position"])
        restore_rank_rng(payload, task.rng, env, log)
        log(f"resumed from {path} at step {start_step}")
    log.truncate_stats(start_step)
    log.write_config({**run_config, "world_size": env.world_size, **task.config_extra})

    task.prepare()
    stream = BatchStream(task.dataset, local_batch, env, cfg.seed, cfg.workers, start=position)

    meter = Meter()
    last: dict = {key: None for key in task.last_keys}
    step = start_step
    main_guard = next(iter(task.guards.values()))
    skipped_before = main_guard.skipped
    fields = {"kind": task.kind, "config": run_config}
    if task.model_config is not None:
        fields["model"] = task.model_config
    checkpoints = RunCheckpoints(
        ckpt, env, task.rng, t_start, seconds_before, start_step if found is not None else -1, **fields
    )
    bar = progress_bar(cfg.steps, start_step, cfg.progress and env.is_main, task.kind)

    at = step  # the step an error is reported at
    try:
        while step < cfg.steps:
            at = step + 1
            task.step(stream, meter)
            meter.steps += 1
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                at = step
                for guard in task.guards.values():
                    guard.check()  # the device-side guards (fused AdamW) raise here, a plain one in its step
                means = meter.means(env)
                elapsed = time.perf_counter() - meter.t0
                row = {
                    "step": step,
                    **task.stats(means),
                    "it_per_s": meter.steps / max(elapsed, 1e-9),
                    **{key: guard.skipped for key, guard in task.guards.items()},
                    "seconds": round(seconds_before + time.perf_counter() - t_start, 3),
                }
                log.stats(row)
                last = {key: row[key] for key in task.last_keys}
                log(task.log_line(row))
                meter.reset()
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                skipping = any(guard.consecutive for guard in task.guards.values())
                checkpoints.periodic(step, stream.position, skipping=skipping, log=log)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and env.is_main:
                task.write_samples(step)
    except TrainingDivergedError as exc:
        log.record(f"error at step {at}: {exc}")  # the caller shows it (once)
        raise
    finally:
        bar.close()

    check_steps_taken(main_guard.name, main_guard.skipped - skipped_before, step - start_step, log)
    checkpoints.final(step, stream.position)
    extra = task.finish(step, last)
    env.barrier()
    seconds = seconds_before + time.perf_counter() - t_start
    return {
        "run_dir": cfg.run_dir,
        "release": task.release,
        "steps": step,
        **last,
        **{key: guard.skipped for key, guard in task.guards.items()},
        "seconds": seconds,
        **extra,
    }
