"""Reports: the Markdown tables with intervals, the labelled picture grids, the FID-vs-time plot."""

from __future__ import annotations

import math
import os

from paper.summary import CA_POINTS, FID_MARGIN


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _ci(ci, fmt: str = "{:.3f}") -> str:
    return "" if not ci else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def summary_table(summary: list[dict]) -> list[str]:
    """The summary as Markdown: one line per (task, student NFE), intervals in brackets."""
    mark = {True: "yes", False: "**no**"}
    lines = [
        "| task | bridge | student NFE | seeds | teacher FID | student FID (mean) | FID diff [95% paired CI] "
        "| CA student / teacher % | speedup | paper student | targets met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['task']} | {e['bridge']}{' cond.' if e['conditional'] else ''} | {e['student_nfe']} | "
            f"{len(e['seeds'])} | {e['teacher_fid']:.3f}{_ci(e['teacher_fid_ci'])} | {e['student_fid']:.3f} | "
            f"{e['fid_diff']:+.3f}{_ci(e['fid_diff_ci'])} | {e['ca_student']:.1f} / {e['ca_teacher']:.1f} | "
            f"{_cell(e['speedup'], '{:.1f}x')} | {'yes' if e['paper_student'] else 'no'} | {mark[e['met']]} |"
        )
    return lines


def markdown(report: dict) -> str:
    preset, env, clf = report["preset"], report["environment"], report["classifier"]
    lines = [
        f"# IBMD on Fashion-MNIST, scale `{report['scale']}` ({env['machine']})",
        "",
        preset["note"],
        "",
        f"- device {env['device']} ({env['device_name']}), {env['torch_threads']} torch threads, torch "
        f"{env['torch']}, ops backend {env['ops_backend']}, 1-min load average at the end "
        f"{_cell(env['load_average_1min'], '{:.2f}')} (other work on the machine inflates the times)",
        f"- classifier for FID/CA: a small ResNet (width {clf['width']}, {clf['feature_dim']}-d features) trained "
        f"on {clf['train_items']} clean training images for {clf['epochs']} epoch(s): "
        f"**{clf['clean_test_accuracy']:.2f}%** top-1 on {clf['clean_test_images']} clean test images",
        f"- {report['num_images']} test images per row at NFE <= 100 (the I2SB teacher at NFE 999: the first "
        f"{preset['top_nfe_images']}); FID with a 95% bootstrap interval over test images "
        "(percentile, shifted by the bootstrap bias) "
        f"({preset['bootstrap_resamples']} resamples), each student against the reference teacher with the "
        "paired bootstrap interval of the FID difference (same resampled images for both), CA with its 95% "
        "Wilson interval",
        f"- students: K = {preset['distill_steps']} generator steps, L = {preset['inner_steps']}, batch "
        f"{preset['distill_batch']}, lr {preset['distill_lr']}; {preset['paper_seeds']} distillation seeds per "
        f"paper student, {preset['comparison_seeds']} per comparison student (each reported, and their mean)",
        "",
        f"Targets per task for the paper's student (I2SB 1-NFE, inpainting 4-NFE, DDBM 2-NFE) against the "
        f"reference teacher at NFE {report['reference_nfe']} (I2SB sampler; DBIM eta = 0 for DDBM): the upper "
        f"end of the paired interval of FID(student) - FID(teacher) at most {100 * FID_MARGIN:g}% of the teacher's "
        f"FID; CA within {CA_POINTS:g} point; time per image at least {report['reference_nfe']}/(2k) times lower "
        "for a k-NFE student.",
        "",
    ]
    lines += summary_table(report["summary"]) + [""]
    lines += [f"- {line}" for line in report["reading"]] + [""]
    lines += [f"- task {entry['task']} not run: {entry['why']}" for entry in report["skipped_tasks"]]
    lines += [""] if report["skipped_tasks"] else []
    for name, task in report["tasks"].items():
        lines += [
            f"## {name} ({task['bridge']} bridge, {'conditional' if task['conditional'] else 'unconditional'})",
            "",
            "| row | NFE | images | FID [95% CI] | CA % [95% CI] | PSNR dB | SSIM | s/img | speedup |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in task["rows"]:
            if r.get("unavailable"):
                lines.append(f"| {r['name']} | {r['nfe']} | - | unavailable: {r['unavailable']} | | | | | |")
                continue
            sec = "-" if r["model"] == "corrupted" else _cell(r["sec_per_image"], "{:.4g}")
            lines.append(
                f"| {r['name']} | {r['nfe']} | {r['images']} | {r['fid']:.3f}{_ci(r['fid_ci'])} | "
                f"{r['ca']:.1f}{_ci(r['ca_ci'], '{:.1f}')} | {_cell(r['psnr'], '{:.2f}')} | "
                f"{r['ssim']:.4f} | {sec} | {_cell(r.get('speedup_vs_reference'), '{:.1f}x')} |"
            )
        lines += [
            "",
            f"- grid: `{os.path.basename(task['grid_png'])}` (columns: {' | '.join(task['grid_columns'])})",
            "",
        ]
    plot = f"`{os.path.basename(report['plot'])}`" if report["plot"] else "not drawn (no matplotlib)"
    lines += [
        f"FID against seconds per image (bars: 95% intervals): {plot}.",
        "",
        f"Stages ({report['total_stage_seconds']:.0f} s of compute in all, {report['wall_seconds']:.0f} s "
        "in this invocation):",
        "",
    ]
    lines += [
        f"- {s['stage']}: {s['seconds']:.1f} s{' (earlier run)' if s['skipped'] else ''}" for s in report["stages"]
    ]
    return "\n".join(lines) + "\n"


def labelled_grid(src: str, dst: str, columns: list[str], image_size: int, pad: int = 2) -> None:
    """``src`` (``save_grid``'s layout: one column per model) enlarged to about 128 px per image
    (nearest neighbour, pixels stay sharp) under a header naming the columns."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, 128 // image_size)
    with Image.open(src) as grid:
        grid = grid.convert("RGB")
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    header = 22
    out = Image.new("RGB", (grid.width, grid.height + header), "white")
    out.paste(grid, (0, header))
    draw = ImageDraw.Draw(out)
    for j, name in enumerate(columns):
        center = scale * (pad + j * (image_size + pad) + image_size / 2)
        draw.text((center - draw.textlength(name, font=font) / 2, 4), name, fill="black", font=font)
    out.save(dst, format="PNG")


def plot_fid_vs_time(tasks: dict[str, list[dict]], path: str, title: str) -> None:
    """FID (with its 95% interval) against seconds per image (log x), one panel per task: teacher rows
    by sampler, students by NFE (each seed), the corrupted input as a dashed line. Needs matplotlib
    (``pip install .[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cols = max(1, min(3, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    colors = {"i2sb": "tab:blue", "dbim-eta0": "tab:blue", "dbim-eta1": "tab:green", "heun": "tab:purple"}
    for ax, (name, rows) in zip(axes.flat, tasks.items()):
        timed = [r for r in rows if r["model"] != "corrupted" and r.get("fid") is not None and r.get("sec_per_image")]
        groups: dict[str, list[dict]] = {}
        for r in timed:
            label = (
                "student"
                if r["model"] == "student"
                else r["sampler"] + ("" if r.get("eta") is None else f"-eta{r['eta']:g}")
            )
            groups.setdefault(label, []).append(r)
        for label, members in groups.items():
            members = sorted(members, key=lambda r: r["sec_per_image"])
            xs = [r["sec_per_image"] for r in members]
            ys = [r["fid"] for r in members]
            err = [
                [max(0.0, r["fid"] - r["fid_ci"][0]) for r in members],
                [max(0.0, r["fid_ci"][1] - r["fid"]) for r in members],
            ]
            student = label == "student"
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                fmt="D" if student else "o",
                color="tab:red" if student else colors.get(label, "tab:gray"),
                capsize=3,
                markersize=5,
                linewidth=1,
                linestyle="none" if student else "-",
                label="IBMD student" if student else f"teacher {label}",
            )
            for r in members:
                tag = f"S{r['nfe']}" if student else f"T{r['nfe']}"
                ax.annotate(tag, (r["sec_per_image"], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        corrupted = next((r for r in rows if r["model"] == "corrupted" and r.get("fid") is not None), None)
        if corrupted:
            ax.axhline(corrupted["fid"], color="gray", linestyle="--", linewidth=1, label="corrupted input")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds per image (log scale)")
        ax.set_ylabel("FID (classifier features)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
