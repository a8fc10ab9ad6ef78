"""One run per run dir, and what a run finds there when it starts.

- ``RunLog``: ``log.txt`` (what was printed), ``stats.jsonl`` (a JSON line per log step),
  ``config.json``; rank 0 only.
- ``RunLock``: an exclusive OS lock (``fcntl.flock``) on ``<run_dir>/.lock`` for the whole run.
  The kernel drops it when the process ends, however it ends (kill -9 included), so a lock is
  never stale; a second run on the directory refuses with one line naming the holder's pid.
  ``run_lock`` takes it on rank 0 only and tells every rank the outcome.
- ``find_resume``: the checkpoint a run resumes from (``--resume auto|none|PATH``), refusing to
  start over silently when the directory holds checkpoints but none of them loads, or a run's
  history (``stats.jsonl``, a release) without a readable checkpoint; ``--resume none`` moves a
  previous run's files aside into ``previous-<UTC date>/`` and says where (``move_aside``).
- ``finished``: whether the checkpoint found already reaches ``--steps`` and the release exists,
  so that rerunning a finished run leaves the release as it is.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
from typing import Optional

from ibmd_fast.release import atomic_write, read_release
from ibmd_fast.train.checkpoint import CheckpointError, CheckpointIO
from ibmd_fast.train.distributed import DistEnv

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLog", "write_text", "RunLock", "RunDirInUseError", "run_lock", "find_resume", "finished"]

LOCK_NAME = ".lock"
# A run's history: with any of these and no readable checkpoint, a run does not start over silently.
HISTORY = ("stats.jsonl", "teacher.safetensors", "generator.safetensors")
# What ``--resume none`` moves aside with the history (log.txt stays: it is only ever appended to).
RUN_FILES = HISTORY + ("config.json", "comparison.json", "comparison.png", "comparison-photo.json", "checkpoints")


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


class RunLog:
    """``log.txt``, ``stats.jsonl`` and ``config.json`` of a run; silent on ranks other than 0."""

    def __init__(self, run_dir: str, env: "DistEnv", quiet: bool = False):
        self.run_dir = run_dir
        self.active = env.is_main
        self.quiet = quiet
        self.stats_path = os.path.join(run_dir, "stats.jsonl")
        self.log_path = os.path.join(run_dir, "log.txt")
        if self.active:
            os.makedirs(run_dir, exist_ok=True)

    def __call__(self, message: str) -> None:
        """Print ``message`` and append it to ``log.txt``."""
        if not self.active:
            return
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)  # clears and redraws a progress bar instead of overwriting it
            sys.stdout.flush()
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(message + "\n")

    def record(self, message: str) -> None:
        """Append ``message`` to ``log.txt`` without printing it (it reaches the screen another way)."""
        if self.active:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(message + "\n")

    def write_config(self, config: dict) -> None:
        if self.active:
            write_text(os.path.join(self.run_dir, "config.json"), json.dumps(config, indent=2) + "\n")

    def truncate_stats(self, step: int) -> None:
        """Keep the stats lines of steps <= ``step`` (a resumed run rewrites what came after)."""
        if not self.active or not os.path.exists(self.stats_path):
            return
        kept = []
        with open(self.stats_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        write_text(self.stats_path, "".join(kept))

    def stats(self, row: dict) -> None:
        if self.active:
            with open(self.stats_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, allow_nan=True) + "\n")


class RunDirInUseError(RuntimeError):
    """Another process holds the run dir's lock."""


class RunLock:
    """``with RunLock(run_dir):`` holds an exclusive lock on ``run_dir/.lock`` (the file holds the pid)."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirInUseError(
                f"run dir {self.run_dir} is in use by another run (pid {holder}); wait for it "
                "to end or give another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(run_dir: str, env):
    """``RunLock`` on rank 0; every rank raises the same ``RunDirInUseError`` when it is taken."""
    lock = RunLock(run_dir)
    problem = None
    if env.is_main:
        try:
            lock.acquire()
        except RunDirInUseError as exc:
            problem = str(exc)
    problem = env.broadcast(problem)
    if problem:
        raise RunDirInUseError(problem)
    try:
        yield lock
    finally:
        lock.release()


def history(run_dir: str) -> list[str]:
    """The files of a previous run in ``run_dir`` that a fresh start must not drop (names)."""
    found = []
    for name in HISTORY:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path) and (name != "stats.jsonl" or os.path.getsize(path) > 0):
            found.append(name)
    return found


def move_aside(run_dir: str) -> Optional[str]:
    """Move a previous run's files (``RUN_FILES``, ``samples-*.png``) into ``run_dir/previous-<UTC date>/``;
    returns that folder, or None when there was nothing to move."""
    names = [n for n in RUN_FILES if os.path.lexists(os.path.join(run_dir, n))]
    if os.path.isdir(run_dir):
        names += sorted(n for n in os.listdir(run_dir) if n.startswith("samples-") and n.endswith(".png"))
    if not names:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target, n = os.path.join(run_dir, f"previous-{stamp}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(run_dir, f"previous-{stamp}-{n}")
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(target, name))  # same file system: a rename
    return target


def find_resume(resume: str, ckpt: CheckpointIO, env) -> Optional[tuple[str, dict]]:
    """The checkpoint to resume from: ``auto`` the newest readable one, a path that file, ``none`` nothing.

    ``none`` moves a previous run's files (history, release, checkpoints) aside into
    ``previous-<UTC date>/`` and logs where (``move_aside``). ``auto`` moves unreadable files aside as
    ``*.corrupt`` and, when that leaves nothing to resume from, stops instead of starting over; it
    stops too when the run dir holds a history (``stats.jsonl``, a release) but no readable
    checkpoint. Every rank reads the file itself; rank 0 alone cleans up and moves files.
    """
    resume = str(resume).strip()
    run_dir = os.path.dirname(ckpt.directory.rstrip(os.sep)) or "."
    if resume.lower() == "none":
        moved = move_aside(run_dir) if env.is_main else None
        if moved and ckpt.log is not None:
            ckpt.log(f"note: --resume none: the previous run's files are kept in {moved}")
        if moved:
            from tqdm import tqdm

            tqdm.write(f"--resume none: the previous run in {run_dir} was moved aside to {moved}", file=sys.stderr)
        env.barrier()
        return None
    if os.path.lexists(ckpt.directory) and not os.path.isdir(ckpt.directory):
        raise CheckpointError(
            f"{ckpt.directory} is a file, not a folder of checkpoints; nothing was changed. "
            "Move it away, or pass --resume none to move the run's files aside and start over"
        )
    if env.is_main:
        ckpt.remove_stale_temporaries()
    env.barrier()
    if resume.lower() == "auto":
        found = ckpt.find_latest(quarantine=env.is_main)
        env.barrier()
        if found is None:
            corrupt = ckpt.corrupt()
            if corrupt:
                names = ", ".join(os.path.basename(p) for p in corrupt[-3:])
                raise CheckpointError(
                    f"{ckpt.directory} holds only unreadable checkpoints ({names}); nothing to resume from. "
                    "Pass --resume none to start over (the damaged files are kept) or --resume PATH"
                )
            kept = history(run_dir)
            if kept:
                why = "which is missing" if not os.path.isdir(ckpt.directory) else "which holds none"
                raise CheckpointError(
                    f"{run_dir} holds a run's history ({', '.join(kept)}) but no readable checkpoint in "
                    f"{ckpt.directory} ({why}), so it cannot go on; nothing was changed. Pass --resume none to "
                    "move the history aside into previous-<date>/ and start over, or --resume PATH"
                )
        paths = env.gather(None if found is None else found[0])
        if len(set(paths)) > 1:
            raise RuntimeError(f"ranks found different checkpoints to resume from: {paths}")
        return found
    return resume, CheckpointIO.read(resume)


def finished(payload: Optional[dict], steps: int, release: str) -> bool:
    """True when the resumed checkpoint is at (or past) ``steps`` and the release was written."""
    return payload is not None and int(payload["step"]) >= steps and os.path.isfile(release)


def finished_summary(run_dir: str, release: str, payload: dict, log: RunLog, steps: int) -> dict:
    """A rerun of a finished run: say so, leave the release as it is, return its summary."""
    _, _, extra = read_release(release)
    step = int(payload["step"])
    log(
        f"the run in {run_dir} is finished (step {step}, --steps {steps}); {release} is left as it is. "
        "Give a larger --steps to train on, or --resume none to start over"
    )
    return {
        "run_dir": run_dir,
        "release": release,
        "steps": step,
        "finished": True,
        "seconds": float(payload.get("seconds", 0.0)),
        **{k: v for k, v in extra.items() if k not in ("step", "teacher")},
    }
