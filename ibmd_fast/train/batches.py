"""Batches for the trainers: an endless, exactly resumable stream (``BatchStream``).

The order is a function of (seed, epoch) only (``DistributedSampler``), every item is built under
a torch seed of its own (seed, epoch, index), so a run resumed at batch ``n`` sees the very
batches an uninterrupted run sees, with any number of DataLoader workers (started once per run).
Also ``shared_dataset`` (the folders listed once per run, by rank 0), ``to_device`` and
``first_items`` (the fixed pictures of sample grids).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ibmd_fast.data import Listing, collate
from ibmd_fast.seeds import derive_seed
from ibmd_fast.train.distributed import DistEnv

__all__ = ["BatchStream", "shared_dataset", "to_device", "first_items", "set_dataset_epoch"]


def shared_dataset(build: Callable[[Listing], Dataset], env: DistEnv, run_dir: str) -> Dataset:
    """``build(listing)`` on every rank, the folders walked once: by rank 0, whose listings the others read.

    Rank 0 builds first with ``Listing(run_dir/listings, write=True)`` (walking each folder and
    writing what it found); after it, the other ranks build with ``write=False`` (reading those
    files: on a network file system 1.28M ``stat`` calls per rank are what takes minutes). The
    order of the items is then the same on every rank by construction. When rank 0 fails, every
    rank raises (rank 0 its own error, the others one line saying so), so none waits forever.
    """
    folder = os.path.join(run_dir, "listings")
    if not env.distributed:
        return build(Listing(folder, write=True))
    dataset, problem = None, None
    if env.is_main:
        try:
            dataset = build(Listing(folder, write=True))
        except Exception as exc:
            problem = exc
    said = env.broadcast(None if problem is None else f"{type(problem).__name__}: {problem}")  # also the barrier
    if problem is not None:
        raise problem
    if said is not None:
        raise RuntimeError(f"rank 0 could not build the training data: {said}")
    if not env.is_main:
        dataset = build(Listing(folder, write=False))
    return dataset


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
            indices = list(self.sampler)[offset * self.local_batch : self.per_epoch * self.local_batch]
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

    def __init__(self, dataset: Dataset, local_batch: int, env: DistEnv, seed: int, workers: int = 0, start: int = 0):
        self.dataset = dataset
        self.local_batch = int(local_batch)
        workers = cap_workers(int(workers))
        self.position = int(start)
        sampler = DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=int(seed), drop_last=True
        )
        self.per_epoch = len(sampler) // self.local_batch
        if self.per_epoch < 1:
            raise ValueError(
                f"the data set has {len(dataset)} items, fewer than one global batch "
                f"({self.local_batch * env.world_size}); lower batch_size or add data"
            )
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
        try:
            batch = next(self._iter)
        except RuntimeError as exc:  # the folder data sets' "none of the N items could be read"
            if "could be read" not in str(exc):
                raise
            if self.position == 0:  # folders are checked lazily: an unreadable folder shows here
                raise DataUnreadableError(
                    f"none of the training images can be read{_data_root(self.dataset)}; "
                    "check that they are image files (png, jpg, webp, bmp, tif)"
                ) from None
            raise DataUnreadableError(
                f"the training images can no longer be read{_data_root(self.dataset)} "
                "(moved or deleted during the run?); the checkpoints written so far are "
                "kept: restore the images and rerun to resume"
            ) from None
        self.position += 1
        return batch


class DataUnreadableError(OSError):
    """Every training item failed to load mid-run (the files were moved or deleted)."""


def _data_root(dataset, depth: int = 0) -> str:
    """`` in ROOT`` of the folder a data set reads (through wrappers), or ""."""
    if dataset is None or depth > 8:
        return ""
    root = getattr(dataset, "root", None)
    if root is not None:
        return f" in {root}"
    for attr in ("source", "images", "dataset"):
        found = _data_root(getattr(dataset, attr, None), depth + 1)
        if found:
            return found
    return ""


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


def cap_workers(workers: int) -> int:
    """DataLoader workers at most the CPU count (one warning): more only queue for the same cores, and
    ``--workers 100000`` would try to start a hundred thousand processes."""
    cpus = os.cpu_count() or 1
    if workers > cpus:
        warnings.warn(
            f"--workers {workers} is more than the {cpus} CPU(s) of this machine; using {cpus}",
            UserWarning,
            stacklevel=2,
        )
        return cpus
    return workers
