"""The ``ibmd-fast`` command line: train-teacher, distill, sample, eval, train-classifier, export.

A thin layer: options are parsed and checked here (click types with ranges, metavars and
defaults shown, in the manner of NVlabs/edm ``train.py``); the work is done by
``ibmd_fast.train``, ``ibmd_fast.evaluate`` and ``ibmd_fast.onnx``.

- Training commands take every field of their config dataclass as an option; the defaults are
  read from the dataclass (one source). Precedence: dataclass < ``--config FILE`` (YAML/JSON)
  < options given on the command line. ``--dry-run`` prints the resolved config and exits.
- Expected errors (missing paths, bad releases, bad images, divergence, ...) end in one line
  ``Error: ...`` on stderr and a non-zero exit code; set ``IBMD_FAST_DEBUG=1`` for tracebacks
  (``cli_errors.py``). The training commands' options are built in ``cli_config.py``.
- Progress bars (tqdm) go to stderr and are on only when stderr is a terminal, unless
  ``--progress`` / ``--no-progress`` says otherwise.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import click

from ibmd_fast import __version__
from ibmd_fast.cli_config import (  # the training commands' options (config dataclasses -> click)
    IntList,
    _common_config_options,
    _config_options,
    _distill_options,
    _run_trainer,
    _teacher_options,
)
from ibmd_fast.cli_errors import (
    FiniteFloat,
    _auto_progress,
    _check_output_parent,
    _log,
    _one_line,
    check_output_file,
    check_output_outside,
    check_writable,
    friendly_errors,
    seed_option_type,
)

# Kept free of torch so that `ibmd-fast --help` answers at once: the commands import what they
# need when they run (the training commands are built on first use, see _LazyGroup).
from ibmd_fast.paths import DEFAULT_GENERATOR, DEFAULT_TEACHER  # noqa: E402  (torch-free)

_MIN_OPSET = 17  # ibmd_fast.onnx.MIN_OPSET; export_onnx checks the whole range again (check_opset)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_SAMPLE_DIR = os.path.join("runs", "sample")
DEFAULT_EVAL_DIR = os.path.join("runs", "eval")
DEFAULT_CLASSIFIER = os.path.join("runs", "classifier.safetensors")


# ----------------------------------------------------------------------------
# The group


# Commands built on first use (they need torch and the config dataclasses): name -> short help.
_LAZY_COMMANDS = {
    "train-teacher": "Train a bridge-matching teacher (I2SB or DDBM VP).",
    "distill": "IBMD: distill a teacher into a one-step (or --nfe step) generator.",
}


class _LazyGroup(click.Group):
    """A group whose training commands are built when asked for, so `ibmd-fast --help` needs no torch."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in _LAZY_COMMANDS and name not in self.commands:
            _add_train_commands()
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                rows.append((name, _LAZY_COMMANDS[name]))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ibmd-fast")
def cli():
    """Inverse Bridge Matching Distillation: diffusion bridge models -> one-step generators.

    \b
    ibmd-fast train-teacher ...   bridge matching on a data set
    ibmd-fast distill             IBMD: the embedded teacher -> runs/distill/generator.safetensors
    ibmd-fast sample              restore images (default: held-out crops of scikit-image photos)
    ibmd-fast eval                PSNR, SSIM, FID, CA and time per image, teacher vs student
    ibmd-fast export --onnx       generator -> model.onnx, checked against PyTorch
    """


def _train_unavailable(name: str, what: str, error: BaseException):
    @cli.command(
        name,
        context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
        help=f"{what} (unavailable: ibmd_fast.train did not import).",
        add_help_option=False,
    )
    def command():
        raise click.ClickException(f"{name} needs ibmd_fast.train, which failed to import: {_one_line(error)}")

    return command


def _add_train_commands() -> None:
    """Build train-teacher and distill from their config dataclasses (imports torch)."""
    try:
        from ibmd_fast.train import DistillConfig, TeacherConfig  # lazy: the CLI starts without torch
    except ImportError as exc:  # the trainers are a separate module; the other commands work without them
        _train_unavailable("train-teacher", "Train a bridge-matching teacher", exc)
        _train_unavailable("distill", "IBMD distillation", exc)
        return

    @cli.command("train-teacher", context_settings=CONTEXT)
    @_common_config_options
    @_config_options(TeacherConfig, _teacher_options())
    @click.pass_context
    @friendly_errors
    def train_teacher_cmd(ctx, config_file, dry_run, **options):
        """Train a bridge-matching teacher (I2SB or DDBM VP) and release it as RUN_DIR/teacher.safetensors.

        Every option also reads from --config FILE; options given here win over the file.
        """
        _run_trainer(ctx, TeacherConfig, "train_teacher", options, config_file, dry_run)

    @cli.command("distill", context_settings=CONTEXT)
    @_common_config_options
    @_config_options(DistillConfig, _distill_options())
    @click.pass_context
    @friendly_errors
    def distill_cmd(ctx, config_file, dry_run, **options):
        """IBMD: distill a teacher into a one-step (or --nfe step) generator, RUN_DIR/generator.safetensors.

        With no options: the embedded teacher (center inpainting), on the scikit-image photos, into
        runs/distill; then the corrupted input, teacher (NFE 1, 10, 100) and student (NFE 1) table of PSNR,
        SSIM and seconds per image, and runs/distill/comparison.png (a whole held-out photo).
        """
        _run_trainer(ctx, DistillConfig, "distill", options, config_file, dry_run)


# ----------------------------------------------------------------------------
# sample


def _check_release_exists(path: str, option: str, hint: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path} does not exist{hint}")


_DEFAULT_GENERATOR_HINT = " (it is what a plain `ibmd-fast distill` writes; run that first, or pass {opt})"


@cli.command("sample", context_settings=CONTEXT)
@click.option(
    "--model",
    type=str,
    metavar="PATH",
    default=DEFAULT_GENERATOR,
    show_default=True,
    help="Teacher or generator release.",
)
@click.option(
    "--input",
    "input_path",
    type=str,
    metavar="PATH",
    default=None,
    show_default="held-out scikit-image crops",
    help="Corrupted image or folder of them (at the target size; see --upsample). Default: a few "
    "held-out crops of the bundled photos, degraded like the release's training data and "
    "written to OUTPUT/inputs/ (clean ones to OUTPUT/clean/).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    metavar="DIR",
    default=DEFAULT_SAMPLE_DIR,
    show_default=True,
    help="Where restored PNGs go, with the inputs' relative names.",
)
@click.option(
    "--nfe",
    type=click.IntRange(min=1),
    metavar="N",
    default=None,
    show_default="the release's",
    help="Network calls per image (teachers only).",
)
@click.option(
    "--sampler",
    type=click.Choice(["i2sb", "dbim", "heun"]),
    default=None,
    show_default="i2sb for I2SB, dbim for VP",
    help="Teacher sampler (teachers only).",
)
@click.option(
    "--eta",
    type=FiniteFloat(0.0, 1.0),
    metavar="ETA",
    default=None,
    show_default="1.0 (DBIM's)",
    help="DBIM noise level: 1 = the posterior sampler, 0 = deterministic (dbim sampler only).",
)
@click.option(
    "--upsample",
    type=click.IntRange(min=2),
    metavar="K",
    default=None,
    help="Inputs are low-resolution: upsample them K times (bicubic, or the release's srKx upsampling) first.",
)
@click.option(
    "--mask",
    "mask_path",
    type=str,
    metavar="PATH",
    default=None,
    show_default="the degradation's fixed mask",
    help="Inpainting releases: mask image, white = hole (resized to each input).",
)
@click.option(
    "--masks",
    "masks_path",
    type=str,
    metavar="FILE",
    default=None,
    help="Free-form inpainting releases, default inputs: Palette's imagenet_freeform_masks.npz or "
    "I2SB's imagenet_freeform<range>_masks.npz.",
)
@click.option(
    "--labels",
    "labels",
    type=str,
    metavar="FILE.csv|folders",
    default=None,
    help="Class-conditional releases: the class of each --input image, from a CSV of path,label lines "
    "(paths relative to the input folder) or 'folders' (one subfolder per class, index = sorted "
    "name, as --data classes:DIR).",
)
@click.option(
    "--class-label",
    type=click.IntRange(min=0),
    metavar="N",
    default=None,
    help="Class-conditional releases: one class label for every image.",
)
@click.option(
    "--num-images",
    type=click.IntRange(1, 64),
    metavar="N",
    default=4,
    show_default=True,
    help="How many default crops (without --input).",
)
@click.option("--seed", type=seed_option_type(), metavar="INT", default=0, show_default=True, help="Noise seed.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    default=8,
    show_default=True,
    help="Images per network call.",
)
@click.option("--device", type=str, metavar="DEV", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@friendly_errors
def sample_cmd(
    model,
    input_path,
    output,
    nfe,
    sampler,
    eta,
    upsample,
    mask_path,
    masks_path,
    labels,
    class_label,
    num_images,
    seed,
    batch_size,
    device,
    progress,
):
    """Restore corrupted images with a teacher or generator release; writes PNGs to OUTPUT."""
    from ibmd_fast.restore_files import restore_files  # lazy: the CLI starts without torch

    _check_output_parent(output, "--output")
    check_output_outside(output, input_path)
    if model == DEFAULT_GENERATOR:
        _check_release_exists(model, "--model", _DEFAULT_GENERATOR_HINT.format(opt="--model"))
    summary = restore_files(
        model=model,
        inputs=input_path,
        output=output,
        nfe=nfe,
        sampler=sampler,
        eta=eta,
        seed=seed,
        batch_size=batch_size,
        device=device,
        upsample=upsample,
        mask=mask_path,
        masks=masks_path,
        labels=labels,
        class_label=class_label,
        num_default=num_images,
        progress=_auto_progress(progress),
        log=_log,
    )
    how = f"{summary['kind']}, NFE {summary['nfe']}" + (f", {summary['sampler']}" if summary["sampler"] else "")
    click.echo(f"restored {summary['restored']} image(s) with {summary['model']} ({how}) -> {summary['output']}")
    if summary["skipped"]:
        click.echo(f"skipped {len(summary['skipped'])} unreadable input(s)")


# ----------------------------------------------------------------------------
# eval


def _none_or_path(value: Optional[str]) -> Optional[str]:
    return None if value is None or value.strip().lower() in ("", "none") else value


@cli.command("eval", context_settings=CONTEXT)
@click.option(
    "--teacher",
    type=str,
    metavar="PATH|none",
    default=None,
    show_default="the embedded teacher-inpaint",
    help="Teacher release; 'none' leaves the teacher out.",
)
@click.option("--teacher-nfe", type=IntList(), default="1,10,100", show_default=True, help="Teacher NFEs to measure.")
@click.option(
    "--sampler",
    type=click.Choice(["i2sb", "dbim", "heun"]),
    default=None,
    show_default="i2sb for I2SB, dbim for VP",
    help="Teacher sampler.",
)
@click.option(
    "--eta",
    type=FiniteFloat(0.0, 1.0),
    metavar="ETA",
    default=None,
    show_default="1.0 (DBIM's)",
    help="DBIM noise level: 1 = the posterior sampler, 0 = deterministic (dbim sampler only).",
)
@click.option(
    "--student",
    type=str,
    metavar="PATH|none",
    default=None,
    show_default="runs/distill/generator.safetensors",
    help="Generator release; 'none' leaves the student out.",
)
@click.option(
    "--data",
    type=str,
    metavar="SPEC",
    default=None,
    show_default="the release's data, else skimage",
    help="Test data (test split): skimage, fashion-mnist[:DIR], folder:DIR (with --degradation), "
    "or paired:CLEAN_DIR,CORRUPTED_DIR.",
)
@click.option(
    "--degradation",
    type=str,
    metavar="NAME",
    default=None,
    show_default="the release's",
    help="Corruption applied to clean test images.",
)
@click.option(
    "--masks",
    type=str,
    metavar="FILE",
    default=None,
    help="inpaint-freeform1020/2030: Palette's imagenet_freeform_masks.npz or I2SB's "
    "imagenet_freeform<range>_masks.npz.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=4),
    metavar="PX",
    default=None,
    show_default="the release's",
    help="Test crop size.",
)
@click.option(
    "--num-images",
    type=click.IntRange(min=2),
    metavar="N",
    default=64,
    show_default=True,
    help="Test images (the first N of the test split).",
)
@click.option(
    "--classifier",
    type=str,
    metavar="PATH",
    default=None,
    show_default="the embedded one for the default data, else train one, cached in RUN_DIR",
    help="Feature classifier from `ibmd-fast train-classifier` (for FID and CA).",
)
@click.option(
    "--classifier-task",
    type=click.Choice(["labels", "photo", "rotation"]),
    default=None,
    show_default="labels, else photo where the data knows it, else rotation",
    help="Task of a classifier trained here (see train-classifier --task).",
)
@click.option(
    "--classifier-epochs",
    type=click.IntRange(min=1),
    metavar="N",
    default=5,
    show_default=True,
    help="Epochs of a classifier trained here (none is for the embedded default's data, which "
    "ships one; a --classifier-task other than photo trains one there too).",
)
@click.option(
    "--classifier-items",
    type=click.IntRange(min=2),
    metavar="N",
    default=8192,
    show_default=True,
    help="Clean training images for a classifier trained here.",
)
@click.option(
    "--features",
    type=str,
    metavar="NET[:FILE]",
    default="classifier",
    show_default=True,
    help="FID features: classifier[:FILE] (the project's own, see --classifier), "
    "inception-pytorch:FILE (I2SB's FID: pytorch-fid's pt_inception-2015-12-05-6726825d.pth) or "
    "inception-tf:FILE (DDBM/DBIM's FID and IS: the TorchScript inception-2015-12-05.pt). "
    "Local files only; see README.md for where they are published.",
)
@click.option(
    "--ca",
    type=str,
    metavar="resnet50:FILE",
    default=None,
    help="CA as I2SB: torchvision ResNet-50 IMAGENET1K_V1 weights (resnet50-0676ba61.pth); "
    "needs class labels (--data classes:DIR).",
)
@click.option(
    "--fid-ref",
    type=str,
    metavar="FILE.npz|DIR",
    default=None,
    show_default="the clean test images",
    help="Inception FID reference: an .npz with mu and sigma (e.g. VIRTUAL_imagenet256_labeled.npz), "
    "an .npz of reference images arr_0 (ADM's / DDBM's reference batches) or a folder of clean "
    "images (statistics of those two cached as RUN_DIR/fid_ref.npz).",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    metavar="R",
    default=None,
    show_default="1000 where cheap: fewer images than features, or the classifier's features",
    help="Bootstrap resamples of the test images for each FID's 95% interval and the student's "
    "paired FID difference to each teacher row; 0: none.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    default=DEFAULT_EVAL_DIR,
    show_default=True,
    help="Where eval.json, eval-grid.png, the cached classifier and the cached teacher restorations go.",
)
@click.option(
    "--reuse-teacher/--resample-teacher",
    default=True,
    show_default=True,
    help="Reuse the teacher rows' restorations cached in RUN_DIR/teacher-restorations by an earlier eval "
    "with the same teacher, test images and sampling settings (their row says cached, with the time "
    "per image measured then), or sample them again.",
)
@click.option("--seed", type=seed_option_type(), metavar="INT", default=0, show_default=True, help="Noise seed.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    default=16,
    show_default=True,
    help="Images per network call.",
)
@click.option("--device", type=str, metavar="DEV", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@friendly_errors
def eval_cmd(
    teacher,
    teacher_nfe,
    sampler,
    eta,
    student,
    data,
    degradation,
    masks,
    image_size,
    num_images,
    classifier,
    classifier_task,
    classifier_epochs,
    classifier_items,
    features,
    ca,
    fid_ref,
    bootstrap,
    run_dir,
    reuse_teacher,
    seed,
    batch_size,
    device,
    progress,
):
    """Teacher (at each --teacher-nfe) vs student on test data: PSNR, SSIM, FID, CA, seconds per image.

    Prints a table and writes RUN_DIR/eval.json and RUN_DIR/eval-grid.png (columns: corrupted | teacher
    at its largest NFE | student | clean).
    """
    from ibmd_fast.evaluate import evaluate, format_differences, format_table  # lazy: the CLI starts without torch

    teacher_path = DEFAULT_TEACHER if teacher is None else _none_or_path(teacher)
    student_path = DEFAULT_GENERATOR if student is None else _none_or_path(student)
    if teacher is None:
        _check_release_exists(
            teacher_path, "the embedded teacher", " (this installation lacks it; pass --teacher PATH or --teacher none)"
        )
    if student is None:
        _check_release_exists(
            student_path, "--student", _DEFAULT_GENERATOR_HINT.format(opt="--student PATH or --student none")
        )
    if classifier is not None and os.path.isdir(classifier):
        raise click.ClickException(f"--classifier {classifier} is a folder, not a classifier file")
    if classifier is not None and not os.path.isfile(classifier):
        raise click.ClickException(f"classifier file not found: {classifier}")
    _check_output_parent(run_dir, "--run-dir")
    check_writable(run_dir, "--run-dir")  # before minutes of classifier training and sampling
    result = evaluate(
        teacher=teacher_path,
        student=student_path,
        data=data,
        degradation=degradation,
        masks=masks,
        image_size=image_size,
        teacher_nfe=teacher_nfe,
        sampler=sampler,
        eta=eta,
        classifier=classifier,
        classifier_task=classifier_task,
        classifier_epochs=classifier_epochs,
        classifier_items=classifier_items,
        num_images=num_images,
        batch_size=batch_size,
        seed=seed,
        device=device,
        run_dir=run_dir,
        progress=_auto_progress(progress),
        log=_log,
        features=features,
        ca=ca,
        fid_ref=fid_ref,
        bootstrap=bootstrap,
        reuse_teacher=reuse_teacher,
    )
    measured = result["classifier"]["description"]
    if not result["classifier"]["task"].startswith("inception"):
        measured = f"FID/CA on the features of the {measured}"
    click.echo(
        f"{result['num_images']} test images of {result['data']} ({result['degradation']}, "
        f"{result['image_size']}px); {measured}"
    )
    click.echo(format_table(result["results"]))
    if result["fid_differences"]:
        click.echo(format_differences(result["fid_differences"]))
    click.echo(f"wrote {os.path.join(run_dir, 'eval.json')} and {result['grid']}")


# ----------------------------------------------------------------------------
# train-classifier


@cli.command("train-classifier", context_settings=CONTEXT)
@click.option(
    "--data",
    type=str,
    metavar="SPEC",
    default="skimage",
    show_default=True,
    help="Clean training images (training split): skimage, fashion-mnist[:DIR], folder:DIR, "
    "paired:CLEAN_DIR,CORRUPTED_DIR.",
)
@click.option(
    "--output",
    type=str,
    metavar="PATH.safetensors",
    default=DEFAULT_CLASSIFIER,
    show_default=True,
    help="Where the classifier goes (safetensors with its config).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=4),
    metavar="PX",
    default=32,
    show_default=True,
    help="Image size; the same as the images it will measure.",
)
@click.option("--channels", type=click.Choice([1, 3]), default=3, show_default=True, help="Image channels.")
@click.option(
    "--epochs", type=click.IntRange(min=1), metavar="N", default=10, show_default=True, help="Training epochs."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), metavar="N", default=128, show_default=True, help="Images per step."
)
@click.option(
    "--max-items",
    type=click.IntRange(min=2),
    metavar="N",
    default=8192,
    show_default=True,
    help="Training images read from the data set (the first N).",
)
@click.option(
    "--task",
    type=click.Choice(["labels", "photo", "rotation"]),
    default=None,
    show_default="labels, else photo where the data knows it, else rotation",
    help="labels: supervised; photo: which photograph a crop comes from (the scikit-image "
    "crops); rotation: self-supervised 4-way rotation (any unlabeled square images).",
)
@click.option("--seed", type=seed_option_type(), metavar="INT", default=0, show_default=True, help="Random seed.")
@click.option("--device", type=str, metavar="DEV", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing classifier at --output (atomically).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@friendly_errors
def train_classifier_cmd(
    data, output, image_size, channels, epochs, batch_size, max_items, task, seed, device, overwrite, progress
):
    """Train the feature classifier that `eval` measures FID and CA with."""
    from ibmd_fast.classifier import describe_classifier  # lazy: the CLI starts without torch
    from ibmd_fast.evaluate import fit_classifier, save_classifier_atomic  # lazy: the CLI starts without torch

    if os.path.isdir(output):
        raise click.ClickException(f"--output {output} is a folder; give a file name such as classifier.safetensors")
    _check_output_parent(output, "--output", is_file=True)
    check_output_file(output, "--output", "classifier", overwrite)
    check_writable(os.path.dirname(os.path.abspath(output)), "--output")  # before the epochs of training
    model = fit_classifier(
        data,
        image_size=image_size,
        channels=channels,
        task=task,
        epochs=epochs,
        batch_size=batch_size,
        max_items=max_items,
        seed=seed,
        device=device,
        progress=_auto_progress(progress),
        log=_log,
    )
    save_classifier_atomic(model, output)
    click.echo(f"wrote {output}: {describe_classifier(model)}")


# ----------------------------------------------------------------------------
# export


@cli.command("export", context_settings=CONTEXT)
@click.option("--onnx", "to_onnx", is_flag=True, help="Export to ONNX (the only format for now; required).")
@click.option(
    "--model",
    type=str,
    metavar="PATH",
    default=DEFAULT_GENERATOR,
    show_default=True,
    help="Generator release to export.",
)
@click.option(
    "--output",
    type=str,
    metavar="PATH.onnx",
    default=None,
    show_default="next to the release",
    help="Where the ONNX model goes.",
)
@click.option("--fp16", is_flag=True, help="Export half-precision weights and arithmetic.")
@click.option(
    "--opset",
    type=click.IntRange(min=_MIN_OPSET),
    metavar="N",
    default=18,
    show_default=True,
    help="ONNX opset version.",
)
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime vs PyTorch parity check.")
@click.option("--overwrite", is_flag=True, help="Replace an existing ONNX model at --output (once the new one passes).")
@click.option(
    "--example-size",
    type=click.IntRange(min=1),
    metavar="PX",
    default=None,
    show_default="the release's image size",
    help="Output side of the example the exporter traces; the parity check runs near it (the model "
    "gives any multiple of the U-Net's downsampling factor, and of K for an srKx model, which takes "
    "the low-resolution image).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@friendly_errors
def export_cmd(to_onnx, model, output, fp16, opset, no_check, overwrite, example_size, progress):
    """Export a generator release to ONNX and check it against PyTorch (exit code 1 when parity fails)."""
    if not to_onnx:
        raise click.UsageError("choose the export format: --onnx (the only one for now)")
    from ibmd_fast.onnx import check_opset  # lazy: the CLI starts without torch

    check_opset(opset)  # before anything is loaded or exported
    if output is not None:
        _check_output_parent(output, "--output", is_file=True)
    if model == DEFAULT_GENERATOR:
        _check_release_exists(model, "--model", _DEFAULT_GENERATOR_HINT.format(opt="--model"))
    elif not os.path.exists(model):
        raise FileNotFoundError(f"release file not found: {model}")
    if output is None:
        output = str(Path(model).with_suffix(".onnx"))
    if os.path.isdir(output):
        raise click.ClickException(f"--output {output} is a folder; give a file name such as model.onnx")
    check_output_file(output, "--output", "onnx model", overwrite, inputs=[model])
    from ibmd_fast.onnx import OnnxParityError, export_onnx  # lazy: the CLI starts without torch

    try:
        report = export_onnx(
            model,
            output,
            fp16=fp16,
            opset=opset,
            example_size=example_size,
            check=not no_check,
            progress=_auto_progress(progress),
        )
    except OnnxParityError as exc:
        message = _one_line(exc)
        if "parity" not in message.lower():
            message = f"ONNX parity check failed: {message}"
        raise click.ClickException(message) from None
    _print_export_report(report)


def _print_export_report(report: Any) -> None:
    """The export report: where, how, and the parity numbers (the full report is the return value)."""
    if not isinstance(report, dict):
        click.echo(str(report))
        return
    click.echo(f"wrote {report.get('onnx')}")
    if report.get("external_data"):
        click.echo(f"weights: {report['external_data']} (external data: keep it beside the model)")
    for key, label in (
        ("release", "release"),
        ("precision", "precision"),
        ("opset", "opset"),
        ("nfe", "student NFE"),
        ("inputs", "inputs"),
        ("seconds", "seconds"),
    ):
        if key in report:
            value = report[key]
            click.echo(f"{label}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    exporter = report.get("exporter")
    if report.get("fallback_reason"):
        exporter = f"{exporter} (fallback: {report['fallback_reason']})"
    click.echo(f"exporter: {exporter}")
    parity = report.get("parity") or []
    if not parity:
        click.echo("parity: not checked (--no-check)")
    for row in parity:
        shape = "x".join(str(d) for d in row.get("shape", []))
        status = "ok" if row.get("ok") else "FAILED"
        click.echo(
            f"parity [{shape}]: max abs error {row.get('max_abs_err', float('nan')):.3g} "
            f"(tolerance {row.get('tolerance', float('nan')):.3g}) {status}"
        )


# ----------------------------------------------------------------------------
# Entry points


@cli.command("import-teacher", context_settings=CONTEXT)
@click.argument("source", type=click.Path(exists=True), metavar="SOURCE")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["i2sb", "ddbm"]),
    required=True,
    help="i2sb: an I2SB run folder (latest.pt + options.pkl); ddbm: a DDBM/DBIM state-dict .pt.",
)
@click.option("--out", type=str, metavar="PATH", required=True, help="The teacher release to write (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace an existing teacher release at --out (atomically).")
@click.option(
    "--model-kwargs",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    default=None,
    help="Architecture: create_model keywords (.pkl of plain data, JSON or YAML).",
)
@click.option(
    "--preset",
    type=click.Choice(["e2h", "diode", "imagenet-inpaint"]),
    default=None,
    help="DDBM/DBIM: the released checkpoints' settings (DiffusionBridge scripts/args.sh).",
)
@click.option(
    "--weights",
    type=click.Choice(["ema", "raw"]),
    default="ema",
    show_default=True,
    help="I2SB: the EMA weights or the raw net.",
)
@click.option("--degradation", type=str, metavar="NAME", default=None, help="Corruption the teacher undoes.")
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    metavar="PX",
    default=None,
    help="Image size (default: from the options / model keywords).",
)
@click.option(
    "--label",
    type=click.IntRange(min=0),
    metavar="N",
    default=None,
    help="Class-conditional teachers: the class label to sample with.",
)
@click.option("--nfe", type=click.IntRange(min=1), metavar="N", default=None, help="Default teacher sampling NFE.")
@click.option(
    "--noise-schedule",
    type=click.Choice(["vp", "ve", "i2sb_cond"]),
    default=None,
    help="DDBM/DBIM: override the schedule.",
)
@click.option("--beta-max", type=FiniteFloat(), metavar="F", default=None, help="I2SB / i2sb_cond: beta_max.")
@click.option("--beta-min", type=FiniteFloat(), metavar="F", default=None, help="DDBM VP / i2sb_cond: beta_min.")
@click.option("--beta-d", type=FiniteFloat(), metavar="F", default=None, help="DDBM VP: beta_d.")
@click.option("--sigma-min", type=FiniteFloat(), metavar="F", default=None, help="DDBM: t_min (VP) / sigma_min (VE).")
@click.option("--sigma-max", type=FiniteFloat(), metavar="F", default=None, help="DDBM: sigma_max (VE; VP needs 1).")
@click.option("--sigma-data", type=FiniteFloat(), metavar="F", default=None, help="DDBM preconditioning sigma_data.")
@click.option("--cov-xy", type=FiniteFloat(), metavar="F", default=None, help="DDBM preconditioning cov_xy.")
@click.option("--interval", type=click.IntRange(min=2), metavar="N", default=None, help="I2SB: steps.")
@click.option("--t0", type=FiniteFloat(), metavar="F", default=None, help="I2SB: network time start.")
@click.option("--T", "T", type=FiniteFloat(), metavar="F", default=None, help="I2SB: network time end.")
@friendly_errors
def import_teacher_cmd(
    source, fmt, out, overwrite, model_kwargs, preset, weights, degradation, image_size, label, nfe, **overrides
):
    """Import a released I2SB, DDBM or DBIM checkpoint as a teacher release for distill / sample / eval."""
    from ibmd_fast.importers import import_teacher  # lazy: the CLI starts without torch

    _check_output_parent(out, "--out", is_file=True)
    check_output_file(out, "--out", "teacher release", overwrite, inputs=[source])

    config = import_teacher(
        source,
        fmt,
        out,
        model_kwargs=model_kwargs,
        weights=weights,
        degradation=degradation,
        image_size=image_size,
        preset=preset,
        label=label,
        nfe=nfe,
        **overrides,
    )
    src = config["source"]
    click.echo(
        f"teacher release: {out} ({config['bridge']['type']} bridge, "
        f"{'conditional' if config['conditional'] else 'unconditional'}, {config['image_size']}px; "
        f"from {src['file']} sha256 {src['sha256'][:12]})"
    )


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"Warning: {_one_line(message)}\n"


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point ``ibmd-fast`` (and ``python -m ibmd_fast``)."""
    warnings.formatwarning = _format_warning  # one line per warning, no source excerpt
    cli.main(args=argv, prog_name="ibmd-fast")


__all__ = ["cli", "main"]

if __name__ == "__main__":  # pragma: no cover
    main()
