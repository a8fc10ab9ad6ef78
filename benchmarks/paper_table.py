"""The paper's experiment at our scale: IBMD (arXiv 2502.01362) on Fashion-MNIST, both halves, with intervals.

Tasks (32x32 grayscale, padded from 28; benchmarks/paper/config.py):

- I2SB half, unconditional teachers on the I2SB bridge: ``sr4x-pool``, ``jpeg-10`` (1-NFE students)
  and ``inpaint-center`` (4-NFE students as in the paper, 1-NFE beside them); teacher rows at NFE
  999 (on a stated subset), 100, 10, 4, 1.
- DDBM half, conditional teachers (the network sees xT) with DDBM preconditioning on the VP bridge:
  ``sketch`` (edges -> image, the Edges->Handbags analogue) and ``jpeg-5``, and ``sketch-ve`` on the
  DDBM VE bridge (run when ``ibmd_fast.bridges.VEBridge`` exists, else skipped with a note); 2-NFE
  students (the paper's) with 1-NFE beside them; teacher rows DBIM eta = 0 at NFE 100, 10, 4, 1,
  DBIM eta = 1 and Heun at NFE 100.

Each task trains its teacher by bridge matching (MATH.md 4), distills its students with IBMD
(Algorithm 1, MATH.md 5; several distillation seeds for the paper's student), and evaluates every
row on the same test images (MATH.md 7): FID on the features of a small ResNet trained here on the
clean training split (its clean test accuracy is reported; the preset's classifier reaches >= 88%),
with a 95% bootstrap interval over test images; each student against the reference teacher (NFE
100) with the paired bootstrap interval of the FID difference; CA with its Wilson interval; PSNR,
SSIM and seconds per image. The targets (benchmarks/paper/summary.py) are checked and printed.

Every stage runs in its own directory under ``--work-dir/<scale>/`` and records its settings in
``stage.json``; a finished stage whose record matches is skipped, and an interrupted training stage
resumes from its newest checkpoint, so a killed run continues where it stopped (run the same
command again).

    python benchmarks/paper_table.py --scale cpu        # <= 120 min on 2 idle CPU cores (estimate: --dry-run)
    python benchmarks/paper_table.py --scale gpu        # <= 10 min on one H100 / H200 (gpu_check.sh paper)
    python benchmarks/paper_table.py --scale smoke      # a pipeline check in about a minute
    python benchmarks/paper_table.py --scale cpu --dry-run            # settings, work counts, time estimate
    python benchmarks/paper_table.py --scale cpu --tasks sketch,jpeg-5

Writes to ``--out-dir`` (default benchmarks/results): ``paper_table-<scale>-<machine>.json`` (every
row with its per-image PSNR/SSIM/correctness, the summary, the classifier), ``.md``, a picture grid
per task ``-<task>.png``, ``-fid-vs-time.png`` (matplotlib: ``pip install .[bench]``) and the
per-image classifier features ``-features.npz`` (presets with save_features; else in the work dir).
Needs the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import RESULTS, environment, machine_name, resolve_device, write_json  # noqa: E402
from ibmd_fast.data import FASHION_MNIST_DIR  # noqa: E402
from ibmd_fast.evaluate import format_table  # noqa: E402
from ibmd_fast.imageio import save_grid  # noqa: E402
from ibmd_fast.train import TeacherConfig  # noqa: E402
from paper.config import (  # noqa: E402
    MACHINE_COSTS,
    PRESETS,
    TASKS,
    estimate_minutes,
    reference_nfe,
    student_seeds,
    teacher_rows,
    workload,
)  # noqa: E402,E501
from paper.measure import (  # noqa: E402
    corrupted_and_clean,
    corrupted_row,
    load_npz,
    load_task_images,
    student_row,
    teacher_row,
)
from paper.report import labelled_grid, markdown, plot_fid_vs_time  # noqa: E402
from paper.stages import (  # noqa: E402
    Stages,
    check_data,
    classifier_stage,
    data_spec,
    distill_task_student,
    task_dir,
    train_task_teacher,
)
from paper.summary import add_intervals, add_speedups, add_student_diffs, reading, reference_name, summarize  # noqa: E402,E501


def bridge_missing(task) -> str | None:
    """Why this checkout cannot train the task's bridge (None when it can): e.g. no VE bridge yet."""
    try:
        TeacherConfig(bridge=task.bridge, degradation=task.degradation).validate()
    except ValueError as exc:
        return str(exc)
    return None


def run_task(stages: Stages, preset, name: str, data: str, device: str, seed: int, clf: dict) -> dict:
    task = TASKS[name]
    teacher, tkey = train_task_teacher(stages, preset, name, task, data, stages.work, device, seed)
    students = {
        (nfe, s): distill_task_student(stages, preset, name, teacher, tkey, nfe, s, stages.work, device)
        for nfe in task.student_nfe
        for s in student_seeds(preset, task, nfe, seed)
    }
    batch = load_task_images(data, task, preset, seed)
    results = [
        teacher_row(stages, preset, name, batch, teacher, tkey, row, clf, device, seed)
        for row in teacher_rows(preset, task)
    ]
    results += [
        student_row(stages, preset, name, batch, release, skey, nfe, s, clf, device, seed)
        for (nfe, s), (release, skey) in students.items()
    ]
    corrupted, clean = corrupted_and_clean(clf, batch, device)
    rows = [corrupted_row(corrupted)] + [r["row"] for r in results]
    features = {"corrupted": corrupted["features"], "clean": clean["features"]}
    grids = {}
    for r in results:
        if "npz" in r:
            values = load_npz(r["npz"])
            features[r["row"]["name"]] = values["features"]
            grids[r["row"]["name"]] = torch.from_numpy(values["grid"])
    add_intervals(rows, features, clean["features"], preset.bootstrap_resamples, seed, device)
    ref = next(r for r in rows if r["name"] == reference_name(rows))
    add_speedups(rows, ref)
    add_student_diffs(rows, features, clean["features"], preset.bootstrap_resamples, seed, device)
    summary = summarize(
        name, task, rows, features, clean["features"], reference_nfe(preset), preset.bootstrap_resamples, seed, device
    )

    g = preset.grid_images
    first_seed = {}
    for r in rows:
        if r["model"] == "student":
            first_seed.setdefault(r["nfe"], r["name"])
    columns = [("corrupted", batch["xT"][:g]), (ref["name"], grids[ref["name"]])]
    columns += [(f"student-{nfe}", grids[row]) for nfe, row in first_seed.items()]
    columns.append(("clean", batch["x0"][:g]))
    grid_path = os.path.join(task_dir(stages.work, name), "grid.png")
    save_grid([c for _, c in columns], grid_path, cell=0)  # labelled_grid enlarges and titles it
    return {
        "degradation": task.degradation,
        "bridge": task.bridge,
        "conditional": task.conditional,
        "beta_max": task.beta_max if task.bridge == "i2sb" else None,
        "student_nfe": list(task.student_nfe),
        "paper_nfe": task.paper_nfe,
        "teacher": teacher,
        "rows": rows,
        "summary": summary,
        "grid": grid_path,
        "grid_columns": [n for n, _ in columns],
        "features": features,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(PRESETS), default="cpu", help="preset (paper/config.py)")
    parser.add_argument("--tasks", default=",".join(TASKS), metavar="LIST", help="comma-separated tasks")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--data-dir", default=str(FASHION_MNIST_DIR), metavar="DIR", help="folder of the Fashion-MNIST idx files"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default=None, help="results name (default: GPU name or cpu-<n>core)")
    parser.add_argument("--out-dir", default=RESULTS, metavar="DIR", help="where the JSON, Markdown and PNGs go")
    parser.add_argument(
        "--work-dir",
        default=os.path.join("runs", "paper_table"),
        metavar="DIR",
        help="run directories (one subfolder per scale); finished stages there are reused",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    args = parser.parse_args(argv)

    preset = PRESETS[args.scale]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    problem = check_data(args.data_dir)
    if problem is not None:
        print(
            f"error: Fashion-MNIST is not available: {problem}\n"
            f"Install it with `apt-get install dataset-fashion-mnist` (it puts the idx files in "
            f"{FASHION_MNIST_DIR}), or pass --data-dir DIR.",
            file=sys.stderr,
        )
        return 1
    device = resolve_device(args.device)
    machine = args.machine or machine_name(device)
    work = os.path.join(args.work_dir, args.scale)
    data = data_spec(args.data_dir)
    stem = os.path.join(args.out_dir, f"paper_table-{args.scale}-{machine}")
    skipped = [{"task": t, "why": why} for t in tasks if (why := bridge_missing(TASKS[t])) is not None]
    runnable = [t for t in tasks if t not in {s["task"] for s in skipped}]
    if args.dry_run:
        print(
            json.dumps(
                {
                    "scale": args.scale,
                    "preset": {**dataclasses.asdict(preset), "note": preset.describe()},
                    "tasks": {
                        t: {
                            **dataclasses.asdict(TASKS[t]),
                            "teacher_rows": [r.name + f" ({r.images} images)" for r in teacher_rows(preset, TASKS[t])],
                            "students": {
                                str(k): student_seeds(preset, TASKS[t], k, args.seed) for k in TASKS[t].student_nfe
                            },
                        }
                        for t in tasks
                    },
                    "skipped_tasks": skipped,
                    "device": device,
                    "machine": machine,
                    "approx_image_network_calls": workload(preset, tasks),
                    "estimated_minutes_2_idle_cpu_cores": estimate_minutes(preset, tasks),
                    "estimated_minutes_by_machine": {
                        m: estimate_minutes(preset, tasks, m)["total"] for m in MACHINE_COSTS
                    },
                    "data": data,
                    "work_dir": work,
                    "outputs": stem + ".{json,md,png}",
                },
                indent=2,
            )
        )
        return 0

    print(
        f"paper_table: scale {args.scale} on {machine} ({device}, {torch.get_num_threads()} threads), "
        f"tasks {', '.join(runnable)}, work dir {work}",
        flush=True,
    )
    for s in skipped:
        print(f"note: task {s['task']} not run: {s['why']}", flush=True)
    print(f"note: {preset.describe()}", flush=True)
    start = time.perf_counter()
    stages = Stages(work)
    clf = classifier_stage(stages, preset, data, args.data_dir, work, device, args.seed)
    results = {name: run_task(stages, preset, name, data, device, args.seed, clf) for name in runnable}

    os.makedirs(args.out_dir, exist_ok=True)
    features_path = (stem + "-features.npz") if preset.save_features else os.path.join(work, "features.npz")
    np.savez_compressed(
        features_path, **{f"{t}/{k}": v for t, task in results.items() for k, v in task.pop("features").items()}
    )
    for name, task in results.items():
        task["grid_png"] = f"{stem}-{name}.png"
        labelled_grid(task["grid"], task["grid_png"], task["grid_columns"], preset.image_size)
    plot = f"{stem}-fid-vs-time.png"
    try:
        plot_fid_vs_time(
            {n: t["rows"] for n, t in results.items()},
            plot,
            f"IBMD on Fashion-MNIST, scale {args.scale}, {machine}: FID (95% CI) vs seconds per image",
        )
    except ImportError:  # the numbers are worth keeping without the picture
        print("note: matplotlib is not installed (pip install .[bench]): no FID-vs-time plot", file=sys.stderr)
        plot = None
    summary = [e for task in results.values() for e in task["summary"]]
    report = {
        "scale": args.scale,
        "preset": {**dataclasses.asdict(preset), "note": preset.describe()},
        "environment": environment(device, machine),
        "data": data,
        "classifier": clf,
        "num_images": preset.eval_images,
        "top_nfe_images": preset.top_nfe_images,
        "reference_nfe": reference_nfe(preset),
        "summary": summary,
        "reading": [reading(e) for e in summary],
        "tasks": results,
        "skipped_tasks": skipped,
        "features": {
            "file": features_path,
            "dim": clf["feature_dim"],
            "dtype": "float32",
            "keys": "<task>/<row name>, <task>/clean, <task>/corrupted: [images, dim], test items in order",
        },
        "plot": plot,
        "stages": stages.log,
        "total_stage_seconds": sum(s["seconds"] for s in stages.log),
        "wall_seconds": time.perf_counter() - start,
        "estimated_minutes_2_idle_cpu_cores": estimate_minutes(preset, runnable),
        "estimated_minutes_by_machine": {m: estimate_minutes(preset, runnable, m)["total"] for m in MACHINE_COSTS},
        "work_dir": work,
    }
    write_json(stem + ".json", report)
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write(markdown(report))
    shown = ("name", "nfe", "images", "fid", "ca", "psnr", "ssim", "sec_per_image", "speedup_vs_reference")
    for name, task in results.items():
        print(
            f"\n{name}\n" + format_table([{k: r.get(k) for k in shown if r.get(k) is not None} for r in task["rows"]])
        )
    print(f"\nclassifier: {clf['clean_test_accuracy']:.2f}% top-1 on {clf['clean_test_images']} clean test images")
    print("targets:")
    for line in report["reading"]:
        print(f"  {line}")
    print(
        f"\nwrote {stem}.json, {stem}.md, the grids {stem}-<task>.png, {plot} and {features_path} "
        f"({report['wall_seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
