"""benchmarks/bench_default.py --from-run: a finished default run's records -> default-<machine>.json.

The run itself (``ibmd-fast distill`` then ``ibmd-fast eval``, about 10 minutes) is what the script
times; here a run folder with the same files is written by hand, so only the reading and the
JSON are tested, in a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

import ibmd_fast

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
PACKAGE_ROOT = Path(ibmd_fast.__file__).resolve().parent.parent

DISTILL_ROWS = [
    {"model": "corrupted", "nfe": 0, "psnr": 17.0, "ssim": 0.40, "sec_per_image": 0.0},
    {"model": "teacher", "nfe": 100, "psnr": 21.0, "ssim": 0.60, "sec_per_image": 0.6},
    {"model": "student", "nfe": 1, "psnr": 16.0, "ssim": 0.70, "sec_per_image": 0.006},
]
EVAL_ROWS = [
    {"model": "corrupted", "nfe": 0, "psnr": 17.1, "ssim": 0.41, "fid": 9.0, "sec_per_image": 0.0},
    {"model": "teacher", "nfe": 100, "psnr": 21.2, "ssim": 0.61, "fid": 1.0, "sec_per_image": 0.5},
    {"model": "student", "nfe": 1, "psnr": 21.5, "ssim": 0.62, "fid": 10.0, "sec_per_image": 0.005},
]


def _fake_run(root: Path) -> None:
    distill, evaluation = root / "distill", root / "eval"
    distill.mkdir(parents=True)
    evaluation.mkdir()
    (distill / "comparison.json").write_text(json.dumps(DISTILL_ROWS))
    columns = [
        {"title": "corrupted", "psnr": 20.0, "ms": None},
        {"title": "teacher NFE 100", "psnr": 23.5, "ms": 9000.0},
        {"title": "student NFE 1", "psnr": 22.0, "ms": 90.0},
        {"title": "clean", "psnr": None, "ms": None},
    ]
    (distill / "comparison-photo.json").write_text(
        json.dumps({"photo": "chelsea", "height": 48, "width": 72, "hole": 16, "zoom": 3, "columns": columns})
    )
    (distill / "config.json").write_text(
        json.dumps(
            {
                "device": "auto",
                "teacher": "t.safetensors",
                "steps": 200,
                "data": "skimage",
                "degradation": "inpaint-center",
            }
        )
    )
    (distill / "stats.jsonl").write_text("".join(json.dumps({"step": s, "seconds": 3.0 * s}) + "\n" for s in (10, 20)))
    Image.new("RGB", (8, 4), "white").save(distill / "comparison.png")
    (evaluation / "eval.json").write_text(
        json.dumps({"num_images": 64, "classifier": {"task": "rotation"}, "results": EVAL_ROWS})
    )


def test_bench_default_from_run_writes_the_table_the_time_and_the_picture(tmp_path):
    _fake_run(tmp_path / "run")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_default.py"),
            "--from-run",
            str(tmp_path / "run"),
            "--machine",
            "test",
            "--out-dir",
            str(out),
            "--note",
            "a test",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "default-test.json").read_text())
    assert report["machine"] == "test"
    distill = report["distill"]
    assert distill["rows"] == DISTILL_ROWS and distill["wall_seconds"] == 60.0  # stats.jsonl's last seconds
    assert distill["degradation"] == "inpaint-center" and distill["photo"]["photo"] == "chelsea"
    assert distill["beats_input"] == {
        "teacher-100": {"psnr": True, "ssim": True},
        "student-1": {"psnr": False, "ssim": True},
    }
    assert report["eval"]["rows"] == EVAL_ROWS
    assert report["eval"]["beats_input"]["teacher-100"] == {"fid": True, "psnr": True, "ssim": True}
    assert report["eval"]["beats_input"]["student-1"]["fid"] is False  # FID: lower is better
    figures = report["targets"]
    assert figures["photo_psnr_gain_db"] == {"teacher": 3.5, "student": 2.0, "target": 3.0, "met": False}
    assert figures["student_vs_teacher_100"]["fid_ratio"] == 10.0 and not figures["student_vs_teacher_100"]["met"]
    assert figures["student_vs_teacher_100"]["psnr_gap_db"] == -0.3  # the student is ahead on PSNR here
    assert figures["distill_minutes"]["value"] == 1.0 and figures["distill_minutes"]["met"]
    assert "eval_seconds" not in figures  # --from-run has no eval wall time
    assert report["note"] == "a test"
    with Image.open(out / "default-comparison-test.png") as picture:
        assert picture.size == (8, 4)
    assert "corrupted" in proc.stdout and "student" in proc.stdout


def test_bench_default_from_an_unfinished_run_says_what_is_missing(tmp_path):
    _fake_run(tmp_path / "run")
    os.remove(tmp_path / "run" / "distill" / "comparison-photo.json")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_default.py"),
            "--from-run",
            str(tmp_path / "run"),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "comparison-photo.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_default_from_run_takes_the_times_measured_around_the_commands(tmp_path):
    """--distill-seconds / --eval-seconds (the README's commands timed on a fresh clone) replace
    stats.jsonl's training seconds, and the eval time gets its target; alone they are refused."""
    _fake_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, str(BENCH / "bench_default.py"), "--machine", "test", "--out-dir", str(tmp_path / "out")]
    timed = ["--distill-seconds", "660", "--eval-seconds", "75"]
    proc = subprocess.run(
        args + ["--from-run", str(tmp_path / "run")] + timed, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "default-test.json").read_text())
    assert report["distill"]["wall_seconds"] == 660.0
    assert report["distill"]["wall_seconds_source"] == "measured around the command"
    assert report["targets"]["distill_minutes"] == {**report["targets"]["distill_minutes"], "value": 11.0, "met": False}
    assert report["eval"]["wall_seconds"] == 75.0 and report["targets"]["eval_seconds"]["value"] == 75.0
    alone = subprocess.run(args + timed, env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0 and "go with --from-run" in alone.stderr
