"""The data pipeline at ImageNet scale: time to the first batch, and images per second per worker.

On a generated folder of JPEGs (``--make N`` writes it: crops of the photographs bundled with
scikit-image at random sizes between ``--min-side`` and ``--max-side`` pixels a side, JPEG quality
75-95, in class folders of 1,000 files as ImageNet's ``train/`` is, plus ``--bad`` unreadable files:
truncated JPEGs and text files named ``.jpg``), this measures what ``ibmd-fast distill`` does with a
clean folder (``CorruptedOnly(ImageFolder(...), degradation)``: decode, resize so the image covers
``--image-size``, random crop and flip, corrupt, drop the clean image):

- ``first_batch``: from nothing to the first batch in hand, as a training run starts: the folder
  listed and the trainers' ``BatchStream`` (DistributedSampler order, per-item seeds, ``--workers``
  DataLoader processes) started and one batch of ``--batch-size`` built. Twice: as rank 0 (walks the
  folder and writes the listing file) and as any other rank (reads that file instead of walking), as
  ``train/batches.shared_dataset`` does under torchrun;
- ``load_check_before``: the old start (``check="load"``: every file decoded before training), timed
  on ``--load-check-classes`` class folders and extrapolated;
- ``pipeline_per_worker``: the pipeline in ONE process on one thread (no DataLoader: one worker's
  work), per degradation (``none``: the images as ``corrupted:DIR`` reads them), over ``--images``
  items in a random order;
- ``loader``: a DataLoader with ``--workers`` processes on the same items.

The rate an IBMD run needs (``--step-it-per-s`` and ``--step-batch``, by default the ADM-256
bf16 eager step measured on an H200, benchmarks/results/distill-adm256-nocap-h200.json: 0.382
Algorithm-1 iterations per second at batch 8): an iteration draws L + 1 = 6 batches (L fake-model
steps and one generator step), so one GPU consumes ``6 * 8 * 0.382 = 18.3`` images per second.
The paper's batch 256 on 8 GPUs is 32 per GPU per step; taking the step time as linear in the
batch (the step is compute-bound at these sizes) it is the same 18.3 images per second per GPU,
147 for 8 GPUs. An H100 has the H200's compute (the same GH100 chip, less memory), so 18.3 is
also an upper bound of one H100's share.

    python benchmarks/bench_data.py --make 100000 --root /work/scratch/layouts/imagenet-like
    python benchmarks/bench_data.py --root /work/scratch/layouts/imagenet-like

Prints a table and writes ``benchmarks/results/bench_data-<machine>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PER_CLASS = 1000
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle")


# ----------------------------------------------------------------------------
# The generated folder


@functools.lru_cache(maxsize=None)
def _photos():
    from PIL import Image

    from ibmd_fast.data.skimage_photos import load_skimage_photo

    return [Image.fromarray(load_skimage_photo(name)) for name in PHOTOS]


def _make_part(args) -> int:
    """Write files ``start..stop`` of the folder (one process's share)."""
    root, start, stop, min_side, max_side, seed = args
    from PIL import Image

    photos = _photos()
    rng = random.Random(seed * 1_000_003 + start)
    for i in range(start, stop):
        folder = os.path.join(root, f"class{i // PER_CLASS:05d}")
        os.makedirs(folder, exist_ok=True)
        photo = photos[i % len(photos)]
        width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        # a crop of the photo at a random scale (between the target size and the whole photo)
        scale = (
            rng.uniform(max(width / photo.width, height / photo.height), 1.0)
            if width <= photo.width and height <= photo.height
            else 1.0
        )
        cw, ch = max(1, min(photo.width, round(width / scale))), max(1, min(photo.height, round(height / scale)))
        left, top = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        image = photo.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(os.path.join(folder, f"img{i:07d}.jpg"), quality=rng.randint(75, 95))
    return stop - start


def make_folder(root: str, n: int, min_side: int, max_side: int, bad: int, processes: int, seed: int = 0) -> dict:
    """Write ``n`` JPEGs (and ``bad`` unreadable files) under ``root``; returns what was made."""
    t0 = time.perf_counter()
    chunk = -(-n // (processes * 8))
    parts = [(root, s, min(n, s + chunk), min_side, max_side, seed) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max_workers=processes) as pool:
        made = sum(pool.map(_make_part, parts))
    rng = random.Random(seed)
    for k in range(bad):  # truncated JPEGs and text named .jpg, spread over the classes
        victim = os.path.join(root, f"class{rng.randrange(max(1, n // PER_CLASS)):05d}", f"bad{k:04d}.jpg")
        if k % 2 == 0:
            with open(os.path.join(root, "class00000", "img0000000.jpg"), "rb") as fh:
                data = fh.read()
            with open(victim, "wb") as fh:
                fh.write(data[: len(data) // 3])
        else:
            with open(victim, "w") as fh:
                fh.write("not an image\n")
    size = sum(e.stat().st_size for d in os.scandir(root) if d.is_dir() for e in os.scandir(d.path))
    return {
        "files": made + bad,
        "jpegs": made,
        "bad_files": bad,
        "min_side": min_side,
        "max_side": max_side,
        "bytes": size,
        "seconds_to_make": round(time.perf_counter() - t0, 1),
        "processes": processes,
    }


# ----------------------------------------------------------------------------
# Measurements


def _dataset(root: str, image_size: int, degradation: str, listing=None, check: str = "none"):
    """What distill builds for a folder: clean images corrupted on the fly, or (``none``) the images as
    ``corrupted:DIR`` reads them."""
    from ibmd_fast.data import CorruptedOnly, ImageFolder

    images = ImageFolder(root, size=image_size, crop="random", flip=True, listing=listing, check=check)
    return images if degradation == "none" else CorruptedOnly(images, degradation)


def time_first_batch(root: str, image_size: int, degradation: str, batch_size: int, workers: int, run_dir: str) -> dict:
    """Seconds from nothing to the first batch, for rank 0 (lists, writes) and for any other rank (reads)."""
    import torch

    from ibmd_fast.data import Listing
    from ibmd_fast.train.batches import BatchStream
    from ibmd_fast.train.distributed import DistEnv

    out = {}
    for rank, write in ((0, True), (1, False)):
        t0 = time.perf_counter()
        listing = Listing(os.path.join(run_dir, "listings"), write=write)
        dataset = _dataset(root, image_size, degradation, listing)
        t_list = time.perf_counter() - t0
        # the trainers' stream: DistributedSampler order, per-item seeds, workers started once
        stream = BatchStream(
            dataset, batch_size, DistEnv(rank=0, world_size=1, device=torch.device("cpu")), seed=rank, workers=workers
        )
        batch = stream.next()
        total = time.perf_counter() - t0
        del stream
        out["rank0" if rank == 0 else "other_ranks"] = {
            "listing": "walked and written" if write else "read from rank 0's file",
            "build_s": round(t_list, 3),
            "first_batch_s": round(total, 3),
            "items": len(dataset),
            "batch": list(batch["xT"].shape),
        }
    return out


def time_load_check(root: str, classes: int) -> dict:
    """The old start: ``check="load"`` decodes every file before training, timed on ``classes`` class folders."""
    from ibmd_fast.data import ImageFolder

    folders = sorted(d for d in os.listdir(root) if d.startswith("class"))[:classes]
    files = sum(len(os.listdir(os.path.join(root, d))) for d in folders)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for d in folders:
            ImageFolder(os.path.join(root, d), check="load")
    seconds = time.perf_counter() - t0
    return {
        "files": files,
        "seconds": round(seconds, 2),
        "files_per_s": round(files / seconds, 1),
        "extrapolated_100k_s": round(seconds / files * 100_000, 1),
        "extrapolated_imagenet_1281167_s": round(seconds / files * 1_281_167, 1),
    }


def time_pipeline(root: str, image_size: int, degradation: str, images: int, run_dir: str) -> dict:
    """Images per second of decode + resize + crop + flip + corrupt in this one process, one thread
    (a DataLoader worker's work)."""
    import torch

    from ibmd_fast.data import Listing

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run their torch ops on one thread
    try:
        dataset = _dataset(root, image_size, degradation, Listing(os.path.join(run_dir, "listings"), write=False))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))[: images + 5].tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in order[:5]:  # warm-up: imports, first allocations
                dataset[i]
            t0, cpu0 = time.perf_counter(), time.process_time()
            for i in order[5:]:
                dataset[i]
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        torch.set_num_threads(threads)
    return {
        "degradation": degradation,
        "images": images,
        "seconds": round(wall, 3),
        "images_per_s_per_worker": round(images / wall, 1),
        "images_per_cpu_s": round(images / max(cpu, 1e-9), 1),
    }


def time_loader(
    root: str, image_size: int, degradation: str, images: int, batch_size: int, workers: int, run_dir: str
) -> dict:
    """Images per second through a DataLoader with ``workers`` processes (after its first batch)."""
    import torch
    from torch.utils.data import DataLoader

    from ibmd_fast.data import Listing, collate

    dataset = _dataset(root, image_size, degradation, Listing(os.path.join(run_dir, "listings"), write=False))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(2))[: images + batch_size].tolist()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    next(it)  # workers started, first batch out
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += batch["xT"].shape[0]
    wall = time.perf_counter() - t0
    return {
        "degradation": degradation,
        "workers": workers,
        "images": n,
        "seconds": round(wall, 3),
        "images_per_s": round(n / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the folder of JPEGs (made with --make)")
    parser.add_argument("--make", type=int, default=0, help="write this many JPEGs under --root first, then stop")
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--bad", type=int, default=10, help="unreadable files planted among them (with --make)")
    parser.add_argument("--processes", type=int, default=2, help="processes writing the folder (with --make)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--degradations", default="sr4x-bicubic,jpeg-10,inpaint-center,none")
    parser.add_argument("--images", type=int, default=400, help="items timed per degradation")
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch (the paper: 256 over 8 GPUs)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument(
        "--load-check-classes",
        type=int,
        default=5,
        help="class folders timed with the old check='load' start (0: skip)",
    )
    parser.add_argument(
        "--step-it-per-s",
        type=float,
        default=0.382,
        help="IBMD iterations per second of one GPU at --step-batch (H200, ADM-256, bf16 eager)",
    )
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5, help="L: one iteration reads L + 1 batches")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--machine", default=None, help="file-name key (default cpu-<n>core)")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. the machine was shared)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_data-<machine>.json)")
    args = parser.parse_args()

    made_file = os.path.join(args.root, ".bench_data-folder.json")  # hidden: never listed as an image
    if args.make:
        made = make_folder(args.root, args.make, args.min_side, args.max_side, args.bad, args.processes)
        with open(made_file, "w") as fh:
            json.dump(made, fh, indent=2)
        print(made)
        return
    if not os.path.isdir(args.root):
        raise SystemExit(f"{args.root} does not exist: make it first with --make 100000")
    with open(made_file) as fh:
        folder = json.load(fh)

    from _common import RESULTS, environment, write_json

    degradations = [d.strip() for d in args.degradations.split(",") if d.strip()]
    run_dir = tempfile.mkdtemp(prefix="bench_data-run-")
    try:
        first = time_first_batch(args.root, args.image_size, degradations[0], args.batch_size, args.workers, run_dir)
        print(
            f"first batch: rank 0 {first['rank0']['first_batch_s']:.2f} s (listing {first['rank0']['build_s']:.2f} s), "
            f"other ranks {first['other_ranks']['first_batch_s']:.2f} s "
            f"(listing read {first['other_ranks']['build_s']:.2f} s), {first['rank0']['items']} files"
        )
        load = time_load_check(args.root, args.load_check_classes) if args.load_check_classes else None
        if load:
            print(
                f"check='load' (the old start): {load['files_per_s']:.0f} files/s -> "
                f"{load['extrapolated_100k_s']:.0f} s for 100k files, "
                f"{load['extrapolated_imagenet_1281167_s'] / 60:.0f} min for ImageNet"
            )
        pipeline = [time_pipeline(args.root, args.image_size, d, args.images, run_dir) for d in degradations]
        loader = (
            time_loader(
                args.root, args.image_size, degradations[0], args.images, args.batch_size, args.workers, run_dir
            )
            if args.workers
            else None
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    per_gpu = (args.inner_steps + 1) * args.step_batch * args.step_it_per_s
    need = {
        "images_per_s_per_gpu": round(per_gpu, 2),
        "images_per_s_all_gpus": round(per_gpu * args.gpus, 1),
        "gpus": args.gpus,
        "assumption": (
            f"one Algorithm-1 iteration reads L + 1 = {args.inner_steps + 1} batches; one H200 runs "
            f"{args.step_it_per_s} it/s at batch {args.step_batch} (ADM-256, bf16 eager, "
            "benchmarks/results/distill-adm256-nocap-h200.json), so "
            f"{args.inner_steps + 1} x {args.step_batch} x {args.step_it_per_s} images/s per GPU; the "
            "paper's batch 256 over 8 GPUs (32 per GPU) at a step time linear in the batch consumes the "
            "same per GPU; an H100 has the H200's compute (same GH100 chip), so this bounds one H100's "
            "share from above"
        ),
    }
    rows = []
    for row in pipeline:
        rate = row["images_per_s_per_worker"]
        rows.append(
            {**row, "times_one_gpu_need": round(rate / per_gpu, 2), "workers_per_gpu_needed": round(per_gpu / rate, 2)}
        )

    print(f"\n{'pipeline (one worker, 1 thread)':34s} {'img/s':>8s} {'img/CPU-s':>10s} {'x one GPU':>10s}")
    for row in rows:
        print(
            f"{row['degradation']:34s} {row['images_per_s_per_worker']:8.1f} {row['images_per_cpu_s']:10.1f} "
            f"{row['times_one_gpu_need']:10.2f}"
        )
    if loader:
        print(f"DataLoader, {loader['workers']} workers, {loader['degradation']}: {loader['images_per_s']:.1f} img/s")
    print(f"an IBMD step consumes {per_gpu:.1f} img/s per GPU, {per_gpu * args.gpus:.0f} img/s on {args.gpus} GPUs")

    payload = {
        **environment("cpu", args.machine),
        "what": (
            "the data pipeline of distill on a folder of JPEGs: time to the first batch (listing, DataLoader "
            "start, one batch) and images per second per worker process (decode, resize, random crop and "
            "flip, corrupt) against what an IBMD step consumes"
        ),
        "note": args.note,
        "folder": {
            **folder,
            "root": args.root,
            "layout": f"class folders of {PER_CLASS} files, as ImageNet's train/",
            "page_cache": "warm (the folder had just been written; caches were not dropped)",
        },
        "settings": {
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "images_timed": args.images,
        },
        "first_batch": first,
        "load_check_before": load,
        "pipeline_per_worker": rows,
        "loader": loader,
        "ibmd_step_consumes": need,
        "goals": {
            "first_batch_under_30_s": first["rank0"]["first_batch_s"] < 30,
            "per_core_faster_than_one_gpu_share": all(r["times_one_gpu_need"] > 1 for r in rows),
        },
    }
    path = args.out or os.path.join(RESULTS, f"bench_data-{payload['machine']}.json")
    write_json(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
