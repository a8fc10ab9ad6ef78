"""What the teacher trainer and the IBMD distiller share.

- ``RunLog``: ``log.txt`` (what was printed), ``stats.jsonl`` (a JSON line per log step),
  ``config.json``; rank 0 only.
- ``BatchStream``: an endless, exactly resumable stream of batches. The order is a function of
  (seed, epoch) only (``DistributedSampler``), every item is built under a torch seed of its
  own (seed, epoch, index), so a run resumed at batch ``n`` sees the very batches an
  uninterrupted run sees, with any number of DataLoader workers (started once per run).
- ``capture_rng`` / ``restore_rng``: torch CPU and CUDA, numpy, python and the trainer's own
  noise generator, for bit-identical resumption on CPU.
- ``Precision``: autocast (bf16/fp16, CUDA only) and the fp16 GradScaler.
- ``OptimizerStep``: gradient clipping and the non-finite guard, with one decision for
  every rank.
- ``save_grid``: PNG grids, one row per kind of image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Any, Iterable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ibmd_fast.data import collate
from ibmd_fast.data.images import tensor_to_uint8
from ibmd_fast.ops import draw_seed  # noqa: F401  (re-exported for the trainers)
from ibmd_fast.release import atomic_write
from ibmd_fast.train.distributed import DistEnv
# the optimizer guard lives in its own module; re-exported here, where the trainers import it from
from ibmd_fast.train.optim import MAX_CONSECUTIVE_SKIPS, OptimizerStep, TrainingDivergedError, make_adamw

__all__ = [
    "RunLog",
    "BatchStream",
    "derive_seed",
    "seed_everything",
    "capture_rng",
    "restore_rng",
    "Precision",
    "OptimizerStep",
    "TrainingDivergedError",
    "save_grid",
    "config_dict",
    "check_compatible",
    "check_kind",
    "progress_bar",
    "draw_seed",
    "write_text",
    "Meter",
    "to_device",
    "first_items",
    "set_dataset_epoch",
    "MAX_CONSECUTIVE_SKIPS",
    "make_adamw",
]


# ----------------------------------------------------------------------------
# Seeds


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng(gen: torch.Generator) -> dict:
    """Every random state this process uses, as tensors and plain values (``weights_only`` safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "trainer": gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, gen: torch.Generator) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": int(npst["pos"])},
        "has_gauss": int(npst["has_gauss"]),
        "gauss": float(npst["gauss"]),
    })
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    gen.set_state(state["trainer"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------
# Configs


def config_dict(cfg) -> dict:
    """A config dataclass as a JSON-normalized dict (tuples become lists, paths strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=os.fspath))


def check_kind(payload: dict, kind: str, path: str) -> None:
    """A teacher-training checkpoint cannot resume a distillation, and the other way round."""
    from ibmd_fast.train.checkpoint import CheckpointMismatchError

    if payload.get("kind") != kind:
        raise CheckpointMismatchError(f"checkpoint {path} was written by a {payload.get('kind', 'unknown')!r} run, "
                                      f"not a {kind!r} one; use another run_dir or resume='none'")


def check_compatible(saved: dict, current: dict, keys: Iterable[str], path: str) -> None:
    """One ``CheckpointMismatchError`` naming every differing key among ``keys``."""
    from ibmd_fast.train.checkpoint import CheckpointMismatchError

    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs lists)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in keys if norm(saved.get(k)) != norm(current.get(k))]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for another model or task:\n  " + "\n  ".join(diffs)
            + "\nUse another run_dir, or resume='none' to start over."
        )


# ----------------------------------------------------------------------------
# Output files


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


class RunLog:
    """``log.txt``, ``stats.jsonl`` and ``config.json`` of a run; silent on ranks other than 0."""

    def __init__(self, run_dir: str, env: DistEnv, quiet: bool = False):
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
            print(message, flush=True)
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


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    """tqdm on stderr; off when asked, on ranks other than 0, and when stderr is not a TTY."""
    from tqdm.auto import tqdm

    on = enabled and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not on, dynamic_ncols=True, leave=False)


def save_grid(path: str, rows: list[torch.Tensor], max_cols: int = 8, pad: int = 2) -> None:
    """A PNG with one row per tensor ``[B, C, H, W]`` in [-1, 1] (first ``max_cols`` images each)."""
    rows = [r[:max_cols].detach().float().cpu() for r in rows]
    cols = max(r.shape[0] for r in rows)
    c = max(r.shape[1] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = torch.ones(c, pad + len(rows) * (h + pad), pad + cols * (w + pad))
    for i, row in enumerate(rows):
        if row.shape[1] != c:
            row = row.expand(-1, c, -1, -1)
        for j in range(row.shape[0]):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top:top + h, left:left + w] = row[j].clamp(-1, 1)
    pixels = tensor_to_uint8(canvas)
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels, "L" if c == 1 else "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------
# Data


class _SeededItems(Dataset):
    """Item ``(epoch, index)``: ``dataset[index]`` built under torch seed ``(seed, epoch, index)``.

    Random crops and flips of folder data draw from torch's default generator; seeding per
    item makes every item a function of (seed, epoch, index), whichever process builds it,
    so a resumed run gets the same items. The caller's random state is left untouched. The
    wrapped dataset's ``set_epoch`` (e.g. ``SkimagePhotos`` re-draws its crops) is called here,
    in whichever process (DataLoader worker or main) builds the item, when the epoch changes.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if epoch != self.epoch:
            set_dataset_epoch(self.dataset, epoch)
            self.epoch = epoch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            return self.dataset[index]


def set_dataset_epoch(dataset: Any, epoch: int, _depth: int = 0) -> None:
    """Call ``set_epoch`` on the dataset or any source it wraps (e.g. ``SkimagePhotos`` re-draws crops)."""
    if dataset is None or _depth > 8:
        return
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    for attr in ("source", "images", "dataset"):
        inner = getattr(dataset, attr, None)
        if isinstance(inner, Dataset):
            set_dataset_epoch(inner, epoch, _depth + 1)


class _EndlessSampler(Sampler):
    """``(epoch, index)`` keys for this rank, epoch after epoch, from batch ``start`` on (edm's InfiniteSampler habit).

    Epoch ``e`` is ``DistributedSampler(seed).set_epoch(e)`` cut to whole batches, so batch ``n``
    of the run is batch ``n % per_epoch`` of epoch ``n // per_epoch``, and no batch straddles
    two epochs. One DataLoader iterator serves the whole run (workers are started once).
    """

    def __init__(self, sampler: DistributedSampler, local_batch: int, per_epoch: int, start: int):
        self.sampler, self.local_batch, self.per_epoch, self.start = sampler, local_batch, per_epoch, start

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[offset * self.local_batch: self.per_epoch * self.local_batch]
            for index in indices:
                yield epoch, int(index)
            epoch, offset = epoch + 1, 0


class BatchStream:
    """Endless batches of ``local_batch`` items for this rank, resumable at any batch.

    Batch ``n`` (counted from 0 over the whole run) is batch ``n % per_epoch`` of epoch
    ``n // per_epoch``; the epoch's order is ``DistributedSampler(seed).set_epoch(epoch)``.
    ``position`` is the number of batches handed out so far (store it in checkpoints; pass it
    back as ``start``).
    """

    def __init__(self, dataset: Dataset, local_batch: int, env: DistEnv, seed: int, workers: int = 0,
                 start: int = 0):
        self.dataset = dataset
        self.local_batch = int(local_batch)
        self.position = int(start)
        sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                     shuffle=True, seed=int(seed), drop_last=True)
        self.per_epoch = len(sampler) // self.local_batch
        if self.per_epoch < 1:
            raise ValueError(f"the data set has {len(dataset)} items, fewer than one global batch "
                             f"({self.local_batch * env.world_size}); lower batch_size or add data")
        self.loader = DataLoader(
            _SeededItems(dataset, seed),
            batch_size=self.local_batch,
            sampler=_EndlessSampler(sampler, self.local_batch, self.per_epoch, self.position),
            num_workers=int(workers),
            collate_fn=collate,
            pin_memory=env.device.type == "cuda",
            # the loader draws its workers' base seed from here, not from the global generator
            generator=torch.Generator().manual_seed(derive_seed(seed, env.rank)),
        )
        self._iter = None

    @property
    def epoch(self) -> int:
        return self.position // self.per_epoch

    def next(self) -> dict:
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        self.position += 1
        return batch


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def first_items(dataset: Dataset, n: int) -> Optional[dict]:
    """The first ``n`` items of ``dataset`` as one batch (fixed pictures for sample grids)."""
    n = min(n, len(dataset))
    if n < 1:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return collate([dataset[i] for i in range(n)])


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
