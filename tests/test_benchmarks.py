"""The benchmark scripts, run as a user runs them: paper_table at its smoke scale, bench_distill's ladder for 2 steps;
and paper_table's target and summary logic as functions.

Each script runs in a subprocess with one thread, writing into a temporary folder (never into
benchmarks/results). The paper_table smoke run (five tasks, both halves) takes about 2 minutes of
one idle core, twice that with the rerun that must skip every stage.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ibmd_fast
from ibmd_fast.data import FASHION_MNIST_DIR, FashionMNIST
from ibmd_fast.metrics import fid_from_features

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# the subprocesses import the very ibmd_fast this process imported (a checkout or an install)
PACKAGE_ROOT = Path(ibmd_fast.__file__).resolve().parent.parent
TASKS = ("sr4x-pool", "jpeg-10", "inpaint-center", "sketch", "jpeg-5")  # and sketch-ve (the VE bridge)


def _fashion_mnist_missing() -> bool:
    try:
        FashionMNIST(split="test")
    except (FileNotFoundError, ValueError):
        return True
    return False


needs_fashion_mnist = pytest.mark.skipif(
    _fashion_mnist_missing(), reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}"
)


def _run(script: str, *args, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


@needs_fashion_mnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paper_table_smoke_cuda(tmp_path):
    """The gpu preset's path at smoke size: every stage on CUDA (classifier, teacher, 4- and 1-NFE
    students, evaluation) in the smoke preset's fp32; tests/test_train.py's CUDA test covers bf16/fp16
    and channels_last."""
    out = tmp_path / "out"
    proc = _run(
        "paper_table.py",
        "--scale",
        "smoke",
        "--device",
        "cuda",
        "--tasks",
        "inpaint-center,sketch",
        "--out-dir",
        out,
        "--work-dir",
        tmp_path / "work",
        "--machine",
        "test",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "paper_table-smoke-test.json").read_text())
    assert report["environment"]["device"].startswith("cuda")
    rows = report["tasks"]["inpaint-center"]["rows"]
    assert [r["model"] for r in rows].count("student") == 3  # 4-NFE x 2 seeds, 1-NFE x 1
    assert all(math.isfinite(r["fid"]) and (r["model"] == "corrupted" or r["sec_per_image"] > 0) for r in rows)


SUMMARY_KEYS = {
    "task",
    "bridge",
    "conditional",
    "student_nfe",
    "seeds",
    "teacher_fid",
    "student_fid",
    "fid_diff_ci",
    "ca_student",
    "ca_teacher",
    "speedup",
    "paper_student",
    "met",
}


def _check_rows(task: dict, name: str, images: int) -> None:
    rows = task["rows"]
    names = [r["name"] for r in rows]
    if task["bridge"] == "i2sb":
        teachers = ["teacher-i2sb-nfe19", "teacher-i2sb-nfe10", "teacher-i2sb-nfe4", "teacher-i2sb-nfe1"]
    else:
        teachers = [
            "teacher-dbim-eta0-nfe19",
            "teacher-dbim-eta0-nfe10",
            "teacher-dbim-eta0-nfe4",
            "teacher-dbim-eta0-nfe1",
            "teacher-dbim-eta1-nfe19",
            "teacher-heun-nfe19",
        ]
    students = {"inpaint-center": ["student-nfe4-seed0", "student-nfe4-seed1", "student-nfe1-seed0"]}.get(
        name,
        ["student-nfe1-seed0", "student-nfe1-seed1"]
        if task["bridge"] == "i2sb"
        else ["student-nfe2-seed0", "student-nfe2-seed1", "student-nfe1-seed0"],
    )
    assert names == ["corrupted"] + teachers + students, names
    for r in rows:
        n = r["images"]
        assert n == images  # a 20-step bridge caps NFE 999 at 19, so no subset row in the smoke preset
        assert math.isfinite(r["fid"]) and r["fid_ci"][0] <= r["fid_ci"][1]
        assert 0.0 <= r["ca_ci"][0] <= r["ca"] <= r["ca_ci"][1] <= 100.0
        per = r["per_image"]
        assert len(per["psnr"]) == len(per["ssim"]) == len(per["correct"]) == n
        assert r["ca"] == pytest.approx(100.0 * sum(per["correct"]) / n)
        if r["model"] != "corrupted":
            assert r["sec_per_image"] > 0 and r["speedup_vs_reference"] > 0
        if r["model"] == "student":
            assert r["fid_diff_vs_reference"]["ci"][0] <= r["fid_diff_vs_reference"]["ci"][1]
    assert rows[1]["speedup_vs_reference"] == 1.0


@needs_fashion_mnist
def test_paper_table_smoke(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ("--scale", "smoke", "--out-dir", out, "--work-dir", work, "--machine", "test")
    proc = _run("paper_table.py", *args, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = out / "paper_table-smoke-test"
    report = json.loads(Path(f"{stem}.json").read_text())

    ran = set(TASKS) | {"sketch-ve"}
    assert report["scale"] == "smoke" and set(report["tasks"]) == ran
    assert report["skipped_tasks"] == []
    assert 0.0 <= report["classifier"]["clean_test_accuracy"] <= 100.0 and report["classifier"]["feature_dim"] > 0
    assert report["num_images"] == 8 and report["reference_nfe"] == 19
    assert report["environment"]["OMP_NUM_THREADS"] == "1"
    features = np.load(report["features"]["file"])
    for name, task in report["tasks"].items():
        _check_rows(task, name, 8)
        for r in task["rows"]:
            assert features[f"{name}/{r['name']}"].shape == (8, report["features"]["dim"])
        # every FID of the JSON is recomputable from the stored features
        r = task["rows"][1]
        assert r["fid"] == pytest.approx(
            fid_from_features(features[f"{name}/{r['name']}"], features[f"{name}/clean"]), rel=1e-6, abs=1e-8
        )
        with Image.open(task["grid_png"]) as grid:
            columns = len(task["grid_columns"])
            assert task["grid_columns"][0] == "corrupted" and task["grid_columns"][-1] == "clean"
            scale = max(1, 128 // 16)  # enlarged to about 128 px per picture, 2 px padding
            assert columns == 2 + len(task["student_nfe"]) + 1 and grid.width == scale * (2 + columns * 18)
    summary = report["summary"]
    assert [(e["task"], e["student_nfe"]) for e in summary] == [
        (name, k) for name in report["tasks"] for k in report["tasks"][name]["student_nfe"]
    ]
    for e in summary:
        assert SUMMARY_KEYS <= set(e)
        assert e["paper_student"] == (
            e["student_nfe"] == {"inpaint-center": 4, "sr4x-pool": 1, "jpeg-10": 1}.get(e["task"], 2)
        )
        assert len(e["seeds"]) == (2 if e["paper_student"] else 1)
        assert e["student_fid"] == pytest.approx(np.mean([s["fid"] for s in e["seeds"]]))
        assert e["conditional"] == (e["bridge"] != "i2sb")
        assert e["met"] == all(
            v
            for k, v in e["targets"].items()
            if k in ("fid_diff_upper_at_most_5pct", "ca_within_1_point", "speedup_at_least")
        )
    assert len(report["reading"]) == len(summary)
    assert "targets:" in proc.stdout and "clean test images" in proc.stdout

    markdown = Path(f"{stem}.md").read_text()
    assert "| task | bridge | student NFE | seeds |" in markdown
    for name in report["tasks"]:
        assert f"## {name} (" in markdown
    with Image.open(f"{stem}-fid-vs-time.png") as plot:
        assert plot.width >= 3 * 300 and plot.height >= 2 * 200  # two rows of three panels
        assert len(plot.convert("RGB").getcolors(1 << 16) or []) > 2  # more than a blank canvas

    # A second run finds every stage done and only rewrites the outputs.
    again = _run("paper_table.py", *args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(report["stages"]) and "starting" not in again.stdout
    rerun = json.loads(Path(f"{stem}.json").read_text())
    assert rerun["tasks"]["sketch"]["rows"] == report["tasks"]["sketch"]["rows"]
    assert rerun["summary"] == report["summary"]


@needs_fashion_mnist
def test_paper_table_smoke_ve(tmp_path):
    """The sketch task on the DDBM VE bridge, alone."""
    out = tmp_path / "out"
    proc = _run(
        "paper_table.py",
        "--scale",
        "smoke",
        "--tasks",
        "sketch-ve",
        "--out-dir",
        out,
        "--work-dir",
        tmp_path / "work",
        "--machine",
        "test",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "paper_table-smoke-test.json").read_text())
    task = report["tasks"]["sketch-ve"]
    assert task["bridge"] == "ve" and task["conditional"]
    _check_rows(task, "sketch-ve", 8)


def test_paper_table_without_data(tmp_path):
    proc = _run(
        "paper_table.py",
        "--scale",
        "smoke",
        "--data-dir",
        tmp_path / "nothing-here",
        "--out-dir",
        tmp_path / "out",
        "--work-dir",
        tmp_path / "work",
    )
    assert proc.returncode == 1
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "out").exists()


@needs_fashion_mnist
def test_paper_table_dry_run():
    proc = _run("paper_table.py", "--scale", "cpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    tasks = plan["tasks"]
    assert tasks["sr4x-pool"]["teacher_rows"] == [
        "teacher-i2sb-nfe100 (256 images)",
        "teacher-i2sb-nfe10 (256 images)",
        "teacher-i2sb-nfe4 (256 images)",
        "teacher-i2sb-nfe1 (256 images)",
        "teacher-i2sb-nfe999 (16 images)",
    ]
    assert tasks["sketch"]["teacher_rows"] == [
        "teacher-dbim-eta0-nfe100 (256 images)",
        "teacher-dbim-eta0-nfe10 (256 images)",
        "teacher-dbim-eta0-nfe4 (256 images)",
        "teacher-dbim-eta0-nfe1 (256 images)",
        "teacher-dbim-eta1-nfe100 (256 images)",
        "teacher-heun-nfe100 (256 images)",
    ]
    assert tasks["inpaint-center"]["students"] == {"4": [0, 1], "1": [0]}
    assert tasks["jpeg-5"]["students"] == {"2": [0, 1], "1": [0]} and tasks["jpeg-5"]["conditional"]
    # the committed results ran on libjpeg; I2SB's torch JPEG would be another operator (and stage key)
    assert tasks["jpeg-5"]["degradation"] == "jpeg-5-libjpeg" and tasks["jpeg-10"]["degradation"] == "jpeg-10-libjpeg"
    assert tasks["sketch-ve"]["bridge"] == "ve" and tasks["sketch"]["bridge"] == "vp"
    assert tasks["sr4x-pool"]["beta_max"] == 0.3 and tasks["inpaint-center"]["beta_max"] == 1.0
    assert plan["estimated_minutes_2_idle_cpu_cores"]["total"] <= 120  # the budget, on the machine it was sized on
    by_machine = plan["estimated_minutes_by_machine"]
    assert by_machine["reference"] == plan["estimated_minutes_2_idle_cpu_cores"]["total"]
    assert by_machine["epyc-avx2-2core"] > 120  # measured slower per call: the same preset does not fit there


@pytest.fixture
def paper_summary(monkeypatch):
    """benchmarks/paper/summary.py, imported as paper_table imports it."""
    monkeypatch.setattr(sys, "path", [str(BENCH)] + list(sys.path))
    for name in [m for m in sys.modules if m == "paper" or m.startswith("paper.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("paper.summary")


@pytest.mark.parametrize(
    "case, met, missed",
    [
        (dict(ci=[-0.2, 0.04], ca=69.5, speedup=60.0), True, None),  # all three met
        (dict(ci=[-0.2, 0.06], ca=70.0, speedup=60.0), False, "fid_diff_upper_at_most_5pct"),  # 0.06 > 5% of 1.0
        (dict(ci=[-0.2, 0.04], ca=68.9, speedup=60.0), False, "ca_within_1_point"),  # 1.1 points below
        (dict(ci=[-0.2, 0.04], ca=70.0, speedup=49.0), False, "speedup_at_least"),  # 1-NFE needs 100/2 = 50x
        (dict(ci=None, ca=70.0, speedup=60.0), False, "fid_diff_upper_at_most_5pct"),  # no interval: fails
    ],
)
def test_paper_table_targets(paper_summary, case, met, missed):
    """Each of the issue's three targets fails on its own: teacher FID 1.0 and CA 70%, a 1-NFE student."""
    t = paper_summary.targets(case["ci"], 1.0, case["ca"], 70.0, case["speedup"], reference_nfe=100, student_nfe=1)
    checks = ("fid_diff_upper_at_most_5pct", "ca_within_1_point", "speedup_at_least")
    assert t["met"] is met and [k for k in checks if not t[k]] == ([missed] if missed else [])
    assert t["fid_margin"] == pytest.approx(0.05)


def test_paper_table_speedup_target_scales_with_nfe(paper_summary):
    """At least 100 / (2k) times faster: 50x for 1-NFE, 25x for 2-NFE, 12.5x for 4-NFE."""
    assert [paper_summary.min_speedup(100, k) for k in (1, 2, 4)] == [50.0, 25.0, 12.5]
    ok = paper_summary.targets([0.0, 0.0], 1.0, 70.0, 70.0, 13.0, 100, 4)
    assert ok["met"] and not paper_summary.targets([0.0, 0.0], 1.0, 70.0, 70.0, 13.0, 100, 2)["met"]


def test_paper_table_summary_pairs_seeds(paper_summary):
    """summarize(): the paired interval is of the MEAN FID over seeds against the reference teacher, computed
    on the same resamples; a student identical to the teacher gives a zero difference."""
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((64, 4))
    teacher = clean + 0.5 * rng.standard_normal((64, 4))
    features = {
        "teacher-x-nfe100": teacher,
        "student-nfe1-seed0": teacher.copy(),
        "student-nfe1-seed1": teacher + 0.3 * rng.standard_normal((64, 4)),
    }

    def row(name, model, nfe, sec, seed=None):
        return {
            "name": name,
            "model": model,
            "nfe": nfe,
            "seed": seed,
            "sec_per_image": sec,
            "psnr": 20.0,
            "ssim": 0.5,
            "ca": 70.0,
            "per_image": {"correct": [1] * 45 + [0] * 19},
        }

    rows = [
        row("teacher-x-nfe100", "teacher", 100, 1.0),
        row("student-nfe1-seed0", "student", 1, 0.01, 0),
        row("student-nfe1-seed1", "student", 1, 0.01, 1),
    ]
    paper_summary.add_intervals(rows, features, clean, 200, 0)
    paper_summary.add_speedups(rows, rows[0])
    paper_summary.add_student_diffs(rows, features, clean, 200, 0)
    assert rows[1]["fid_diff_vs_reference"]["ci"] == [0.0, 0.0]
    task = type(
        "T", (), {"student_nfe": (1,), "paper_nfe": 1, "degradation": "x", "bridge": "i2sb", "conditional": False}
    )()
    (entry,) = paper_summary.summarize("x", task, rows, features, clean, 100, 200, 0)
    assert entry["student_fid"] == pytest.approx(0.5 * (rows[1]["fid"] + rows[2]["fid"]))
    assert entry["fid_diff"] == pytest.approx(entry["student_fid"] - entry["teacher_fid"])
    assert entry["speedup"] == pytest.approx(100.0) and entry["targets"]["speedup_at_least"]
    assert entry["fid_diff_ci"][0] <= entry["fid_diff"] <= entry["fid_diff_ci"][1]
    assert "paper student, 2 seed(s)" in paper_summary.reading(entry)


def test_bench_distill_ladder_two_steps(tmp_path):
    """Rungs 1, 2 and 6 of the ladder at 16 px (torch.compile's rungs are too slow for a unit test): one
    process per row, the reference ops in rung 1 only, the per-size section and the speed-up."""
    out = tmp_path / "distill.json"
    proc = _run(
        "bench_distill.py",
        "--steps",
        2,
        "--warmup",
        1,
        "--rounds",
        1,
        "--device",
        "cpu",
        "--rungs",
        "1,2,6",
        "--image-size",
        16,
        "--batch-size",
        2,
        "--inner-steps",
        2,
        "--machine",
        "test",
        "--out",
        out,
        timeout=600,
    )  # three row processes, each importing torch: minutes on a crowded 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    section = report["sizes"]["tiny"]
    rows = {r["rung"]: r for r in section["rows"]}
    assert set(rows) == {1, 2, 6}
    assert rows[1]["backend"] == "reference" and rows[2]["backend"] != "reference"
    assert rows[1]["levers"]["fused_adam"] is False and rows[6]["levers"]["fused_adam"] is True
    assert rows[6]["levers"]["ops"] == "fused"  # every rung keeps the levers below it
    for row in rows.values():
        assert row["it_per_s"] > 0 and len(row["ms_per_iteration_each"]) == 2 and row["peak_memory_mb"] > 0
        assert row["torch_threads"] == 1 and row["generator_skipped"] == 0 and not row["errors"]
    assert rows[1]["speedup_over_naive"] == 1.0
    assert report["speedup_best_over_naive"]["tiny"] == max(r["it_per_s"] for r in rows.values()) / rows[1]["it_per_s"]
    assert section["settings"]["steps"] == 2 and section["settings"]["inner_steps"] == 2
    assert report["OMP_NUM_THREADS"] == "1" and report["machine"] == "test"
    assert "rung 6" in proc.stdout and "+fused-adamw" in proc.stdout  # the printed table


def test_bench_distill_ladder_is_cumulative_and_refuses_gpu_rungs_on_cpu():
    spec = importlib.util.spec_from_file_location("bench_distill", BENCH / "bench_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    six = module.rung_settings(6, [1, 2, 4, 5, 6])
    assert six == {
        "ops": "fused",
        "precision": "fp32",
        "tf32": False,
        "channels_last": True,
        "compile": "default",
        "fused_adam": True,
    }
    assert module.rung_settings(1, [1, 2, 3])["ops"] == "reference"
    assert module.rung_settings(7, list(range(1, 8)))["compile"] == "reduce-overhead"
    with pytest.raises(ValueError, match="rung 3 .* needs CUDA"):
        module.parse_rungs("1,3", cuda=False)
    with pytest.raises(ValueError, match="unknown rung 9"):
        module.parse_rungs("9", cuda=True)


def test_gpu_check_script_parses_and_names_its_parts(tmp_path):
    """benchmarks/gpu_check.sh (run only on a lent GPU machine) at least parses, and refuses an unknown part
    before it touches the GPU or builds anything."""
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run(
        ["bash", str(script), "everything"],
        cwd=str(tmp_path),
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "tests|default|ladder|adm256|ops|inference|paper" in proc.stderr
