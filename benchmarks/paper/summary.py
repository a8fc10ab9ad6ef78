"""Intervals for every row, the per-(task, student NFE) summary, and the target checks.

Targets (the paper's claim at our scale), per task for the paper's student (1-NFE; 4-NFE for
inpainting; 2-NFE for the DDBM tasks), against the reference teacher (the natural sampler at NFE
100; DBIM with eta = 0 for DDBM):

- FID no worse: the upper end of the paired 95% bootstrap interval of FID(student) - FID(teacher)
  is at most ``FID_MARGIN`` (5%) of the teacher's FID (the student's FID is the mean over seeds);
- CA within ``CA_POINTS`` (1) point of the teacher's (point estimates, mean over seeds);
- time per image at least reference_nfe / (2 k) times lower for a k-NFE student (50x for 1-NFE,
  25x for 2-NFE, 12.5x for 4-NFE at NFE 100).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ibmd_fast.metrics import bootstrap_fid, paired_bootstrap_fid_diff, wilson_interval

CA_POINTS = 1.0
FID_MARGIN = 0.05


def min_speedup(reference_nfe: int, student_nfe: int) -> float:
    return reference_nfe / (2.0 * student_nfe)


def targets(
    fid_diff_ci: Optional[list],
    teacher_fid: Optional[float],
    ca_student: Optional[float],
    ca_teacher: Optional[float],
    speedup: Optional[float],
    reference_nfe: int,
    student_nfe: int,
) -> dict:
    """The three checks of one summary entry, and whether all hold (missing numbers fail their check)."""
    checks = {
        "fid_diff_upper_at_most_5pct": (
            fid_diff_ci is not None and teacher_fid is not None and fid_diff_ci[1] <= FID_MARGIN * teacher_fid
        ),
        "ca_within_1_point": ca_student is not None and ca_teacher is not None and ca_student >= ca_teacher - CA_POINTS,
        "speedup_at_least": speedup is not None and speedup >= min_speedup(reference_nfe, student_nfe),
    }
    return {
        **checks,
        "fid_margin": FID_MARGIN * teacher_fid if teacher_fid is not None else None,
        "min_speedup": min_speedup(reference_nfe, student_nfe),
        "met": all(checks.values()),
    }


def add_intervals(
    rows: list[dict], features: dict[str, np.ndarray], clean: np.ndarray, resamples: int, seed: int, device=None
) -> None:
    """FID (bootstrap interval over test images, metrics.bootstrap_fid) and CA (Wilson interval) of every row,
    in place."""
    for row in rows:
        if row.get("unavailable"):
            continue
        f = features[row["name"]]
        n = f.shape[0]
        boot = bootstrap_fid(f, clean[:n], num_resamples=resamples, seed=seed, device=device)
        row["fid"], row["fid_ci"] = boot["fid"], boot["ci"]
        correct = sum(row["per_image"]["correct"])
        row["ca_ci"] = [100.0 * v for v in wilson_interval(correct, n)]


def add_speedups(rows: list[dict], ref: dict) -> None:
    for row in rows:
        timed = row["model"] != "corrupted" and not row.get("unavailable") and row.get("sec_per_image")
        row["speedup_vs_reference"] = ref["sec_per_image"] / row["sec_per_image"] if timed else None


def summarize(
    name: str,
    task,
    rows: list[dict],
    features: dict[str, np.ndarray],
    clean: np.ndarray,
    reference_nfe: int,
    resamples: int,
    seed: int,
    device=None,
) -> list[dict]:
    """One entry per student NFE of the task: per-seed numbers, their mean, the paired interval of
    mean FID(student) - FID(reference teacher), CA, speedup, targets."""
    ref = rows_by_name(rows)[reference_name(rows)]
    n = features[ref["name"]].shape[0]
    entries = []
    for nfe in task.student_nfe:
        students = [r for r in rows if r["model"] == "student" and r["nfe"] == nfe]
        if not students:
            continue
        group = [features[s["name"]] for s in students]
        diff = paired_bootstrap_fid_diff(
            group, features[ref["name"]], clean[:n], num_resamples=resamples, seed=seed, device=device
        )
        seconds = float(np.mean([s["sec_per_image"] for s in students]))
        entry = {
            "task": name,
            "degradation": task.degradation,
            "bridge": task.bridge,
            "conditional": task.conditional,
            "student_nfe": nfe,
            "paper_student": nfe == task.paper_nfe,
            "seeds": [
                {
                    "seed": s["seed"],
                    "fid": s["fid"],
                    "fid_ci": s["fid_ci"],
                    "ca": s["ca"],
                    "ca_ci": s["ca_ci"],
                    "psnr": s["psnr"],
                    "ssim": s["ssim"],
                    "sec_per_image": s["sec_per_image"],
                    "fid_diff": s["fid_diff_vs_reference"]["diff"],
                    "fid_diff_ci": s["fid_diff_vs_reference"]["ci"],
                }
                for s in students
            ],
            "reference": ref["name"],
            "reference_nfe": ref["nfe"],
            "images": n,
            "teacher_fid": ref["fid"],
            "teacher_fid_ci": ref["fid_ci"],
            "student_fid": float(np.mean([s["fid"] for s in students])),
            "fid_diff": diff["diff"],
            "fid_diff_ci": diff["ci"],
            "ca_student": float(np.mean([s["ca"] for s in students])),
            "ca_teacher": ref["ca"],
            "psnr_student": float(np.mean([s["psnr"] for s in students if s["psnr"] is not None] or [np.nan])),
            "psnr_teacher": ref["psnr"],
            "sec_per_image_student": seconds,
            "sec_per_image_teacher": ref["sec_per_image"],
            "speedup": ref["sec_per_image"] / seconds if seconds > 0 else None,
        }
        check = targets(
            entry["fid_diff_ci"],
            entry["teacher_fid"],
            entry["ca_student"],
            entry["ca_teacher"],
            entry["speedup"],
            reference_nfe,
            nfe,
        )
        entry["targets"], entry["met"] = check, check["met"]
        entries.append(entry)
    return entries


def add_student_diffs(
    rows: list[dict], features: dict[str, np.ndarray], clean: np.ndarray, resamples: int, seed: int, device=None
) -> None:
    """Each student row's own paired interval of FID(student) - FID(reference teacher), in place."""
    ref = rows_by_name(rows)[reference_name(rows)]
    n = features[ref["name"]].shape[0]
    for row in rows:
        if row["model"] == "student":
            row["fid_diff_vs_reference"] = paired_bootstrap_fid_diff(
                features[row["name"]],
                features[ref["name"]],
                clean[:n],
                num_resamples=resamples,
                seed=seed,
                device=device,
            )


def rows_by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def reference_name(rows: list[dict]) -> str:
    """The reference teacher: the first teacher row (config.teacher_rows puts it first)."""
    return next(r["name"] for r in rows if r["model"] == "teacher")


def _ci(ci: Optional[list], fmt: str = "{:.3g}") -> str:
    return "-" if ci is None else f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def reading(entry: dict) -> str:
    """One line saying what a summary entry shows and whether its targets are met."""
    t = entry["targets"]
    misses = [
        what
        for what, ok in (
            (
                f"the FID difference's upper end {entry['fid_diff_ci'][1]:.3g} > 5% of {entry['teacher_fid']:.3g}",
                t["fid_diff_upper_at_most_5pct"],
            ),
            (
                f"CA {entry['ca_student']:.1f}% more than {CA_POINTS:g} point below {entry['ca_teacher']:.1f}%",
                t["ca_within_1_point"],
            ),
            (f"speedup {entry['speedup'] or 0:.1f}x < {t['min_speedup']:.1f}x", t["speedup_at_least"]),
        )
        if not ok
    ]
    verdict = "meets the targets" if t["met"] else "misses: " + "; ".join(misses)
    kind = "paper student" if entry["paper_student"] else "comparison"
    return (
        f"{entry['task']} {entry['student_nfe']}-NFE ({kind}, {len(entry['seeds'])} seed(s)): FID "
        f"{entry['student_fid']:.3g} vs {entry['reference']} {entry['teacher_fid']:.3g}, difference "
        f"{entry['fid_diff']:+.3g} {_ci(entry['fid_diff_ci'])}; CA {entry['ca_student']:.1f}% vs "
        f"{entry['ca_teacher']:.1f}%; {entry['speedup'] or 0:.1f}x faster per image: {verdict}."
    )
