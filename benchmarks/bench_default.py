"""The embedded default, measured as a new user meets it: ``ibmd-fast distill``, then ``ibmd-fast eval``.

Runs the two commands the README starts with, each in a subprocess with nothing but ``--run-dir``
(and ``--no-progress``) added, times the distillation's wall clock, and writes
``benchmarks/results/default-<machine>.json`` with:

- ``distill``: the table ``distill`` prints (its ``comparison.json``: the corrupted input, the
  teacher at NFE 1, 10, 100 and the student, PSNR / SSIM / seconds per image on held-out crops),
  the numbers under ``comparison.png`` (a whole held-out photograph) and ``wall_seconds``;
- ``eval``: the rows of ``ibmd-fast eval`` on the same default (64 held-out crops, with FID on the
  features of the project's classifier, trained on the clean training crops) and its wall time;
- ``environment``: threads, load average, versions (other work on the machine inflates times);
- ``targets``: the figures issue 25 asks of a first run, each with its target and whether it is met:
  the whole-photo PSNR gain of teacher and student over the corrupted input in ``comparison.png``
  (>= 3 dB; judged on the picture's own draw, with the mean and spread over the distiller's further
  draws of the same photo beside it), the student against the teacher at NFE 100 in ``eval`` (FID at most 1.25x, PSNR
  within 0.3 dB), the distillation's wall clock (<= 10 min on 2 idle cores) and ``eval``'s (about
  a minute: the embedded classifier, no training);
- ``note``: what ``--note`` says (e.g. that the machine was busy).

``comparison.png`` is copied to ``benchmarks/results/default-comparison-<machine>.png``, the
picture the README shows. ``--from-run DIR`` reads a finished run (DIR holding ``distill/`` and
``eval/``) instead of running, so the JSON can be rebuilt without training again; its times are
then read from the run's own records (``stats.jsonl``'s ``seconds``).

    OMP_NUM_THREADS=2 python benchmarks/bench_default.py              # about 10 min on 2 CPU cores
    python benchmarks/bench_default.py --from-run runs/bench-default --machine cpu-2core
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _common import RESULTS, environment, machine_name, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], log_path: str) -> float:
    """Run ``python -m ibmd_fast ARGS`` from the repository; its output goes to ``log_path``. Wall seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "ibmd_fast", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as fh:
            tail = fh.read()[-2000:]
        raise SystemExit(f"ibmd-fast {args[0]} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return seconds


def _read_json(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"missing {path}: is this a finished run of bench_default.py?")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _recorded_seconds(run_dir: str) -> float:
    """The last ``seconds`` in a trainer's stats.jsonl (its own wall-clock record)."""
    last = None
    with open(os.path.join(run_dir, "stats.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                last = json.loads(line)
    if not last or "seconds" not in last:
        raise SystemExit(f"{run_dir}/stats.jsonl records no seconds")
    return float(last["seconds"])


def _beats_input(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """For each restoration row: does it beat the corrupted row on each metric (FID lower, others higher)?"""
    base = next((r for r in rows if r["model"] == "corrupted"), None)
    if base is None:
        return {}
    out = {}
    for row in rows:
        if row["model"] == "corrupted":
            continue
        out[f"{row['model']}-{row['nfe']}"] = {
            k: (row[k] < base[k] if k == "fid" else row[k] > base[k])
            for k in keys
            if row.get(k) is not None and base.get(k) is not None
        }
    return out


def _column_psnr(photo: dict) -> dict:
    """comparison.png's whole-photo PSNR per column, keyed by model (corrupted, teacher, student)."""
    return {c["title"].split()[0]: c["psnr"] for c in photo.get("columns", []) if c.get("psnr") is not None}


def _photo_gain(photo: dict) -> dict:
    """Whole-photo PSNR of each restoration in comparison.png minus the corrupted input's (dB)."""
    columns = _column_psnr(photo)
    base = columns.get("corrupted")
    if base is None:
        return {}
    return {name: round(value - base, 3) for name, value in columns.items() if name != "corrupted"}


def _draw_gains(photo: dict) -> dict:
    """Mean, sd, min and max whole-photo PSNR gain over the further draws in comparison-photo.json (dB)."""
    base = _column_psnr(photo).get("corrupted")
    if base is None:
        return {}
    draws = photo.get("draws") or {}
    out = {}
    for name in ("teacher", "student"):  # by name: runs written before draw_seed also hold "seeds" here
        values = [v - base for v in draws.get(name, [])]
        if values:
            out[name] = {
                "mean": round(statistics.fmean(values), 3),
                "sd": round(statistics.pstdev(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
                "n": len(values),
            }
    return out


def _row(rows: list[dict], model: str, nfe: int | None = None) -> dict | None:
    matches = [r for r in rows if r["model"] == model and (nfe is None or r["nfe"] == nfe)]
    return max(matches, key=lambda r: r["nfe"]) if matches else None


def targets(payload: dict) -> dict:
    """The figures a first run is judged by (module docstring), each with its target and ``met``."""
    out = {}
    gain = _photo_gain(payload["distill"].get("photo", {}))
    if gain:
        out["photo_psnr_gain_db"] = {**gain, "target": 3.0, "met": all(v >= 3.0 for v in gain.values())}
        draws = _draw_gains(payload["distill"].get("photo", {}))
        if draws:  # the picture is one draw; where it lies among further draws of the same models
            out["photo_psnr_gain_db"]["draws"] = draws
    report = payload.get("eval")
    if report:
        teacher, student = _row(report["rows"], "teacher", 100), _row(report["rows"], "student")
        if teacher and student and teacher.get("fid") and student.get("fid") is not None:
            ratio = student["fid"] / teacher["fid"]
            gap = teacher["psnr"] - student["psnr"]
            out["student_vs_teacher_100"] = {
                "fid_ratio": round(ratio, 3),
                "fid_ratio_target": 1.25,
                "psnr_gap_db": round(gap, 3),
                "psnr_gap_target": 0.3,
                "met": ratio <= 1.25 and gap <= 0.3,
            }
            paired = next(
                (d for d in report.get("fid_differences", []) if d["b"] == f"teacher NFE {teacher['nfe']}"), None
            )
            if paired is not None:  # student FID minus teacher FID, with its paired bootstrap interval
                out["student_vs_teacher_100"]["fid_diff"] = {k: paired[k] for k in ("diff", "ci", "resamples")}
        if report.get("wall_seconds") is not None:
            origin = (report.get("classifier") or {}).get("origin")
            out["eval_seconds"] = {
                "value": report["wall_seconds"],
                "target": "about 60",
                "classifier": origin,
                "met": origin == "embedded" and report["wall_seconds"] <= 90,
            }
    minutes = payload["distill"]["wall_seconds"] / 60.0
    out["distill_minutes"] = {
        "value": round(minutes, 2),
        "target": 10.0,
        "met": minutes <= 10.0,
        "load_average_1min": payload["environment"].get("load_average_1min"),
    }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run-dir",
        default=os.path.join(REPO, "runs", "bench-default"),
        metavar="DIR",
        help="where distill/ and eval/ are written (default: runs/bench-default)",
    )
    parser.add_argument(
        "--from-run", default=None, metavar="DIR", help="read a finished run instead of running the two commands"
    )
    parser.add_argument("--machine", default=None, help="results file key (default: cpu-<n>core or the GPU)")
    parser.add_argument("--out-dir", default=RESULTS, metavar="DIR", help="where the JSON and PNG go")
    parser.add_argument("--no-eval", action="store_true", help="skip `ibmd-fast eval` (no FID)")
    parser.add_argument("--note", default=None, help="a note kept in the JSON (e.g. what else ran on the machine)")
    parser.add_argument(
        "--distill-seconds",
        type=float,
        default=None,
        metavar="S",
        help="with --from-run: the wall clock of `ibmd-fast distill` as timed around the command by whoever ran "
        "it (e.g. the README's command on a fresh clone), instead of stats.jsonl's training seconds",
    )
    parser.add_argument(
        "--eval-seconds", type=float, default=None, metavar="S", help="with --from-run: `ibmd-fast eval`'s wall clock"
    )
    args = parser.parse_args(argv)
    if (args.distill_seconds is not None or args.eval_seconds is not None) and not args.from_run:
        parser.error("--distill-seconds and --eval-seconds go with --from-run")

    run_dir = args.from_run or args.run_dir
    timed = False
    distill_dir, eval_dir = os.path.join(run_dir, "distill"), os.path.join(run_dir, "eval")
    if args.from_run:
        timed = args.distill_seconds is not None
        distill_seconds = args.distill_seconds if timed else _recorded_seconds(distill_dir)
        eval_seconds = args.eval_seconds
    else:
        os.makedirs(run_dir, exist_ok=True)
        distill_seconds = _run(
            ["distill", "--run-dir", distill_dir, "--no-progress", "--resume", "none"],
            os.path.join(run_dir, "distill.log"),
        )
        eval_seconds = None
        if not args.no_eval:
            eval_seconds = _run(
                [
                    "eval",
                    "--student",
                    os.path.join(distill_dir, "generator.safetensors"),
                    "--run-dir",
                    eval_dir,
                    "--no-progress",
                ],
                os.path.join(run_dir, "eval.log"),
            )

    rows = _read_json(os.path.join(distill_dir, "comparison.json"))
    photo = _read_json(os.path.join(distill_dir, "comparison-photo.json"))
    config = _read_json(os.path.join(distill_dir, "config.json"))
    machine = args.machine or machine_name(config.get("device", "cpu") if config.get("device") != "auto" else "cpu")
    payload = {
        "benchmark": "default",
        "command": "ibmd-fast distill  (then: ibmd-fast eval)",
        "machine": machine,
        "distill": {
            "wall_seconds": round(distill_seconds, 1),
            "wall_seconds_source": ("stats.jsonl" if args.from_run and not timed else "measured around the command"),
            "teacher": config.get("teacher"),
            "data": config.get("data"),
            "degradation": config.get("degradation"),
            "image_size": config.get("image_size"),
            "steps": config.get("steps"),
            "batch_size": config.get("batch_size"),
            "inner_steps": config.get("inner_steps"),
            "eval_items": config.get("eval_items"),
            "rows": rows,
            "beats_input": _beats_input(rows, ("psnr", "ssim")),
            "photo": photo,
        },
        "environment": environment("cpu" if machine.startswith("cpu") else "cuda", machine),
    }
    eval_json = os.path.join(eval_dir, "eval.json")
    if os.path.isfile(eval_json):
        report = _read_json(eval_json)
        payload["eval"] = {
            "wall_seconds": None if eval_seconds is None else round(eval_seconds, 1),
            "num_images": report.get("num_images"),
            "classifier": report.get("classifier"),
            "rows": report["results"],
            "fid_differences": report.get("fid_differences", []),
            "beats_input": _beats_input(report["results"], ("fid", "psnr", "ssim")),
        }
    payload["targets"] = targets(payload)
    if args.note:
        payload["note"] = args.note
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"default-{machine}.json")
    write_json(out, payload)
    picture = os.path.join(args.out_dir, f"default-comparison-{machine}.png")
    shutil.copyfile(os.path.join(distill_dir, "comparison.png"), picture)

    from ibmd_fast.evaluate import format_table

    print(f"distill: {distill_seconds / 60:.1f} min wall clock")
    print(format_table(rows))
    if "eval" in payload:
        print("eval:")
        print(format_table(payload["eval"]["rows"]))
    for name, figure in payload["targets"].items():
        print(f"{name}: {'met' if figure['met'] else 'MISSED'} ({json.dumps(figure)})")
    print(f"wrote {out} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
