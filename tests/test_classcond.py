"""Class-conditional teachers distill (DBIM's ImageNet inpainting teacher is one).

A tiny class-conditional I2SB teacher (3 classes, random perturbed weights) and a generated
labelled folder (one subfolder per class, as ImageNet's train/) go through distill, sample and
the ONNX export + torch-free runner; unlabelled data stops with one line.
"""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibmd_fast.bridges import I2SBBridge
from ibmd_fast.data import make_dataset
from ibmd_fast.models import Teacher, build_unet
from ibmd_fast.models.unet import UNet
from ibmd_fast.onnx import export_onnx
from ibmd_fast.release import TEACHER_FORMAT, load_generator, save_release
from ibmd_fast.restore import sample_student
from ibmd_fast.restore_files import restore_files
from ibmd_fast.train.ibmd import _check_labels, distill

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "export" / "run_onnx.py"
SIZE = 16
CLASSES = ("cat", "dog", "eel")  # sorted: labels 0, 1, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(root: Path, per_class: int, size, seed: int) -> dict:
    """Class subfolders of small random PNGs; returns {relative path: label}."""
    rng = np.random.default_rng(seed)
    labels = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
            Image.fromarray(small).resize(size[::-1], Image.BICUBIC).save(root / name / f"{i}.png")
            labels[f"{name}/{i}.png"] = label
    return labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("classcond")


@pytest.fixture(scope="module")
def labelled_dir(folder) -> Path:
    _images(folder / "data", 3, (20, 24), seed=0)
    return folder / "data"


@pytest.fixture(scope="module")
def teacher_release(folder) -> str:
    torch.manual_seed(0)
    net = build_unet("tiny", SIZE, 3, 3, num_classes=len(CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialized output layer too: the label matters
    bridge = I2SBBridge(n_steps=50)
    path = folder / "teacher.safetensors"
    save_release(
        str(path),
        net,
        TEACHER_FORMAT,
        {
            "unet": net.config,
            "conditional": False,
            "bridge": bridge.config(),
            "nfe": 4,
            "degradation": "inpaint-center",
            "image_size": SIZE,
            "channels": 3,
        },
    )
    return str(path)


def _distill_kwargs(run_dir, teacher, data, **overrides) -> dict:
    kwargs = dict(
        run_dir=str(run_dir),
        teacher=teacher,
        data=data,
        batch_size=4,
        steps=2,
        inner_steps=1,
        lr=1e-4,
        fake_lr=1e-4,
        log_every=1,
        ckpt_every=2,
        eval_items=0,
        device="cpu",
        progress=False,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def distilled(folder, teacher_release, labelled_dir):
    """A 2-step distillation on the labelled folder, every U-Net call's labels recorded."""
    calls = []
    forward = UNet.forward

    def recording(self, x, timesteps, y=None):
        calls.append((id(self), None if y is None else y.tolist()))
        return forward(self, x, timesteps, y)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNet, "forward", recording)
        summary = distill(**_distill_kwargs(folder / "run", teacher_release, f"classes:{labelled_dir}"))
    return summary, calls


def test_labelled_corrupted_only_data_carries_the_folder_class(labelled_dir):
    data = make_dataset(f"classes:{labelled_dir}", "inpaint-center", size=SIZE, corrupted_only=True)
    items = [data[i] for i in range(len(data))]
    assert all("x0" not in item for item in items)
    assert [int(item["label"]) for item in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(item["label"].dtype == torch.int64 for item in items)


def test_distill_gives_every_network_the_batch_labels(distilled):
    summary, calls = distilled
    assert summary["steps"] == 2
    # teacher, fake model and generator on batches of 4 (the EMA copy draws the 8-image grid at the end)
    assert len({net for net, y in calls if len(y) == 4}) == 3
    assert all(y is not None and len(y) in (4, 8) and set(y) <= {0, 1, 2} for _, y in calls)
    # Every teacher / fake-model call sees the labels of the generator call that made its x0.
    generator_net = calls[0][0]  # the first call of a fake step is the generator's
    last_generator_y = None
    checked = 0
    for net, y in calls:
        if net == generator_net:
            last_generator_y = y
        elif len(y) == 4:  # not the end-of-run grid
            assert y == last_generator_y
            checked += 1
    assert checked >= 4
    assert len({tuple(y) for _, y in calls}) > 1  # the labels follow the data, not one constant


def test_the_generator_release_is_class_conditional_and_the_label_changes_its_output(distilled):
    summary, _ = distilled
    generator, config = load_generator(summary["release"])
    assert config["num_classes"] == len(CLASSES) and config["unet"]["num_classes"] == len(CLASSES)
    xT = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    z = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out0 = generator(xT, z, y=torch.tensor([0, 0]))
        out1 = generator(xT, z, y=torch.tensor([1, 1]))
        out01 = generator(xT, z, y=torch.tensor([0, 1]))
    assert (out0 - out1).abs().max() > 1e-3
    torch.testing.assert_close(out01[0], out0[0])
    torch.testing.assert_close(out01[1], out1[1])
    with pytest.raises(ValueError, match="class-conditional .* needs a class label"):
        sample_student(generator, xT, 1)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        sample_student(generator, xT, 1, y=torch.tensor([0, 3]))


def test_sample_with_labels(distilled, folder):
    summary, _ = distilled
    inputs = folder / "inputs"
    table = _images(inputs, 1, (SIZE, SIZE), seed=5)
    by_folder = restore_files(summary["release"], str(inputs), str(folder / "s1"), labels="folders", device="cpu")
    assert by_folder["restored"] == 3
    labels_csv = folder / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *table.items()])
    restore_files(summary["release"], str(inputs), str(folder / "s2"), labels=str(labels_csv), device="cpu")
    restore_files(summary["release"], str(inputs), str(folder / "s3"), class_label=2, device="cpu")

    def read(run, rel):
        return np.asarray(Image.open(folder / run / rel))

    for rel in table:
        assert (read("s1", rel) == read("s2", rel)).all()  # class folders give the CSV's labels
        same = (read("s1", rel) == read("s3", rel)).all()
        assert same == (table[rel] == 2), rel  # --class-label 2 for all: only the eel input restores alike
    with pytest.raises(ValueError, match="class-conditional .* needs a class label per image"):
        restore_files(summary["release"], str(inputs), str(folder / "s4"), device="cpu")
    with pytest.raises(ValueError, match="out of range"):
        restore_files(summary["release"], str(inputs), str(folder / "s4"), class_label=7, device="cpu")
    assert not (folder / "s4").exists()


def _run_runner(args):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_onnx_export_takes_class_label_and_the_runner_matches_pytorch(distilled, folder):
    summary, _ = distilled
    report = export_onnx(summary["release"], str(folder / "onnx" / "model.onnx"), progress=False)
    assert report["exporter"] == "dynamo" and report["fallback_reason"] is None  # no data-dependent label check
    assert report["inputs"][-1] == "class_label"
    assert report["metadata"]["num_classes"] == "3"
    assert all(r["ok"] for r in report["parity"])
    import onnx

    graph_input = {i.name: i for i in onnx.load(report["onnx"]).graph.input}["class_label"]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["batch"]

    images = folder / "onnx-in"
    table = _images(images, 1, (SIZE, SIZE), seed=9)
    labels_csv = folder / "onnx-labels.csv"
    labels_csv.write_text("".join(f"{rel},{label}\n" for rel, label in table.items()))
    out = folder / "onnx-out"
    result = _run_runner(
        [
            "--model",
            report["onnx"],
            "--input",
            images,
            "--output",
            out,
            "--seed",
            3,
            "--provider",
            "cpu",
            "--labels",
            labels_csv,
            "--quiet",
        ]
    )
    assert result.returncode == 0, result.stderr

    generator, _ = load_generator(summary["release"])
    spec = importlib.util.spec_from_file_location("run_onnx", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rng = np.random.default_rng(3)
    for rel in sorted(table):
        xT = torch.from_numpy(runner.load_input(images / rel, 3))[None]
        noises = runner.draw_noises(
            rng, [{"name": "z", "channels": 3}, {"name": "hole_noise", "channels": 3}], SIZE, SIZE
        )
        mask = torch.from_numpy(runner.center_mask(SIZE, SIZE))[None]
        xT = xT * (1 - mask)
        hole = torch.from_numpy(noises["hole_noise"])[None]
        xT_filled = xT * (1 - mask) + hole * mask
        with torch.no_grad():
            x0 = generator(xT_filled, torch.from_numpy(noises["z"])[None], y=torch.tensor([table[rel]]))
        expected = (x0 * mask + xT_filled * (1 - mask))[0]
        written = np.asarray(Image.open(out / rel)).astype(int)
        pixels = np.clip(np.round((expected.numpy() + 1) * 127.5), 0, 255).astype(int).transpose(1, 2, 0)
        assert np.abs(written - pixels).max() <= 1, rel

    missing = _run_runner(
        ["--model", report["onnx"], "--input", images, "--output", folder / "o2", "--provider", "cpu"]
    )
    assert missing.returncode == 1
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "class-conditional (3 classes)" in lines[0], missing.stderr
    bad = _run_runner(
        [
            "--model",
            report["onnx"],
            "--input",
            images,
            "--output",
            folder / "o3",
            "--provider",
            "cpu",
            "--class-label",
            3,
        ]
    )
    assert bad.returncode == 1 and "out of range" in bad.stderr


def test_unlabelled_data_with_a_class_conditional_teacher_is_one_line(teacher_release, folder, labelled_dir):
    from test_cli import assert_one_error_line, invoke

    result = invoke(
        "distill",
        "--teacher",
        teacher_release,
        "--data",
        f"folder:{labelled_dir}",
        "--run-dir",
        folder / "unlabelled",
        "--steps",
        1,
        "--batch-size",
        2,
        "--eval-items",
        0,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert_one_error_line(result, "is class-conditional (3 classes)", "has no class labels", "classes:DIR")


def test_label_checks_of_the_distiller(teacher_release, labelled_dir):
    from ibmd_fast.release import load_teacher
    from ibmd_fast.train.ibmd import DistillConfig

    teacher, _ = load_teacher(teacher_release)
    cfg = DistillConfig(teacher=teacher_release, data=f"classes:{labelled_dir}")
    assert _check_labels(cfg, teacher, [0, 1, 2], None) is True
    with pytest.raises(ValueError, match=r"class label 3, out of range .*\(3 classes"):
        _check_labels(cfg, teacher, [0, 3], None)
    unconditional = Teacher(build_unet("tiny", SIZE, 3, 3), I2SBBridge(n_steps=50))
    said = []
    assert _check_labels(cfg, unconditional, [0, 1], said.append) is False
    assert len(said) == 1 and "not used" in said[0]


def test_eval_passes_the_data_labels(distilled, teacher_release, labelled_dir, folder):
    from ibmd_fast.evaluate import evaluate, load_eval_data
    from ibmd_fast.data import get_degradation
    from ibmd_fast.release import load_model
    from ibmd_fast.restore import restore_with_generator

    summary, _ = distilled
    common = dict(
        teacher=teacher_release,
        student=summary["release"],
        teacher_nfe=(2,),
        classifier_task="labels",
        classifier_epochs=1,
        classifier_items=9,
        num_images=6,
        batch_size=4,
        device="cpu",
    )
    result = evaluate(data=f"classes:{labelled_dir}", run_dir=str(folder / "eval"), **common)
    student_row = next(row for row in result["results"] if row["model"] == "student")
    # the student's row is the restoration with the data's labels (from the same seed), not with any others
    batch = load_eval_data(f"classes:{labelled_dir}", get_degradation("inpaint-center"), SIZE, 3, 6, 0)
    model = load_model(summary["release"], "cpu")
    from ibmd_fast.metrics import psnr

    def mean_psnr(labels):
        out = restore_with_generator(model.model, batch["xT"], 1, batch["mask"], 0, 4, labels=labels)
        return float(psnr(out, batch["x0"]).mean())

    assert student_row["psnr"] == pytest.approx(mean_psnr(batch["label"]), abs=1e-4)
    assert student_row["psnr"] != pytest.approx(mean_psnr((batch["label"] + 1) % 3), abs=1e-4)
    with pytest.raises(ValueError, match="class-conditional .* needs a class label per image"):
        evaluate(data=f"folder:{labelled_dir}", run_dir=None, **common)


def test_sample_cli_takes_labels_and_refuses_none(distilled, folder):
    from test_cli import assert_one_error_line, invoke

    summary, _ = distilled
    inputs = folder / "cli-in"
    _images(inputs, 1, (SIZE, SIZE), seed=7)
    ok = invoke(
        "sample",
        "--model",
        summary["release"],
        "--input",
        inputs,
        "--output",
        folder / "cli-out",
        "--labels",
        "folders",
        "--device",
        "cpu",
    )
    assert ok.exit_code == 0, ok.output
    assert sorted(p.relative_to(folder / "cli-out").as_posix() for p in (folder / "cli-out").rglob("*.png")) == [
        "cat/0.png",
        "dog/0.png",
        "eel/0.png",
    ]
    missing = invoke(
        "sample", "--model", summary["release"], "--input", inputs, "--output", folder / "cli-none", "--device", "cpu"
    )
    assert_one_error_line(missing, "class-conditional (3 classes)", "--class-label")
