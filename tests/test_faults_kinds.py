"""Issue 24, kind by kind, through the command line: nothing lost, nothing silently wrong.

Every check: a non-zero exit, one ``Error:`` line without a traceback, and every file that was
there before byte-identical after. Tiny releases (the ``tiny`` U-Net at 16 px) keep it fast.
"""

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_faults import (  # noqa: F401  (onnx_model is a fixture; image_dir comes from conftest.py)
    RUNNER,
    _cli_args,
    assert_cli_error,
    assert_runner_error,
    invoke,
    onnx_model,  # noqa: F401  (a fixture)
    run_cli,
    run_runner,
)
from conftest import teacher_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(*roots) -> dict:
    """Every file under ``roots``: path -> bytes."""
    files = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            files[str(path)] = path.read_bytes()
    return files


def assert_unchanged(before: dict) -> None:
    for path, data in before.items():
        assert Path(path).is_file(), f"{path} is gone"
        assert Path(path).read_bytes() == data, f"{path} changed"


def _generator_config():
    from ibmd_fast.bridges import I2SBBridge
    from ibmd_fast.models import Generator, Teacher, build_unet

    torch.manual_seed(0)
    teacher = Teacher(build_unet("tiny", 16, 3, 3), I2SBBridge(n_steps=50))
    generator = Generator(teacher)
    config = {
        **generator.config(),
        "nfe": 1,
        "degradation": "sr4x-bicubic",
        "image_size": 16,
        "channels": 3,
        "inpainting": False,
    }
    tconfig = {
        "unet": teacher.net.config,
        "conditional": False,
        "bridge": teacher.bridge.config(),
        "nfe": 2,
        "degradation": "sr4x-bicubic",
        "image_size": 16,
        "channels": 3,
        "data": "skimage",
    }
    return teacher, generator, tconfig, config


@pytest.fixture
def releases(release_files, tmp_path):
    """Fresh copies for each test (a command that overwrites them must not spoil the next test)."""
    src, key = release_files
    root = tmp_path / "releases"
    shutil.copytree(src, root)
    return root, key


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """A good teacher and generator release, and copies with a NaN / Inf weight written around save_release."""
    from ibmd_fast.release import GENERATOR_FORMAT, TEACHER_FORMAT, save_release

    root = tmp_path_factory.mktemp("releases")
    teacher, generator, tconfig, gconfig = _generator_config()
    save_release(str(root / "teacher.safetensors"), teacher.net, TEACHER_FORMAT, tconfig)
    save_release(str(root / "generator.safetensors"), generator.net, GENERATOR_FORMAT, gconfig)
    for name, fmt, config, net in (
        ("teacher", TEACHER_FORMAT, tconfig, teacher.net),
        ("generator", GENERATOR_FORMAT, gconfig, generator.net),
    ):
        state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
        key = next(k for k in sorted(state) if k.endswith("weight") and state[k].numel() > 8)
        state[key].view(-1)[:3] = float("nan")
        state[key].view(-1)[3] = float("inf")
        save_file(
            state,
            str(root / f"{name}-nan.safetensors"),
            metadata={"format": fmt, "config": json.dumps({"normalization": "[-1,1]", **config})},
        )
    return root, key


def _inputs(root: Path, n=2, size=(16, 16)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


# ----------------------------------------------------------------------------
# 4. non-finite numbers never pass


def test_nonfinite_releases_are_refused_by_every_command(releases, tmp_path):
    root, key = releases
    inputs = _inputs(tmp_path / "in")
    before = snapshot(root, inputs)
    gen_nan, teacher_nan = root / "generator-nan.safetensors", root / "teacher-nan.safetensors"
    for args in (
        ("sample", "--model", gen_nan, "--input", inputs, "--output", tmp_path / "out", "--device", "cpu"),
        (
            "sample",
            "--model",
            teacher_nan,
            "--input",
            inputs,
            "--output",
            tmp_path / "o2",
            "--nfe",
            2,
            "--device",
            "cpu",
        ),
        ("export", "--onnx", "--model", gen_nan, "--output", tmp_path / "m.onnx", "--no-check"),
        (
            "eval",
            "--teacher",
            "none",
            "--student",
            gen_nan,
            "--run-dir",
            tmp_path / "eval",
            "--num-images",
            2,
            "--device",
            "cpu",
            "--classifier-epochs",
            1,
            "--classifier-items",
            8,
        ),
        (
            "distill",
            "--teacher",
            teacher_nan,
            "--run-dir",
            tmp_path / "d",
            "--steps",
            1,
            "--batch-size",
            2,
            "--eval-items",
            0,
            "--device",
            "cpu",
            "--no-progress",
        ),
    ):
        result = invoke(*args)
        assert_cli_error(result, key, "4 non-finite")
    assert_unchanged(before)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()
    assert not (tmp_path / "d" / "generator.safetensors").exists()


def test_nonfinite_and_out_of_range_options_name_the_option(tmp_path):
    for args, name in (
        (("train-teacher", "--lr", "inf"), "--lr"),
        (("train-teacher", "--lr", "nan"), "--lr"),
        (("train-teacher", "--beta-max", "1e308"), "--beta-max"),
        (("train-teacher", "--grad-clip", "nan"), "--grad-clip"),
        (("distill", "--fake-lr", "inf"), "--fake-lr"),
        (("sample", "--eta", "nan"), "--eta"),
    ):
        result = invoke(*args, "--dry-run") if args[0] != "sample" else invoke(*args, "--model", tmp_path / "x")
        assert_cli_error(result, name)
    source = tmp_path / "ddbm.pt"
    source.write_bytes(b"")
    result = invoke(
        "import-teacher", source, "--format", "ddbm", "--out", tmp_path / "t.safetensors", "--beta-d", "nan"
    )
    assert_cli_error(result, "--beta-d")
    config = tmp_path / "c.yaml"
    for text, name in (("lr: .inf\n", "lr"), ("beta_max: 1.0e+308\n", "beta_max"), ("ema_decay: .nan\n", "ema_decay")):
        config.write_text(text)
        assert_cli_error(invoke("train-teacher", "--config", config, "--dry-run"), str(config), name)


def test_a_run_whose_weights_turn_nonfinite_writes_no_release(tmp_path, image_dir, monkeypatch):
    from ibmd_fast.train import teacher as teacher_module

    real = teacher_module.OptimizerStep.__call__

    def step_then_poison(self, loss):
        out = real(self, loss)
        with torch.no_grad():
            self.params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(teacher_module.OptimizerStep, "__call__", step_then_poison)
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=100, ema_decay=0.0)
    result = invoke("train-teacher", *_cli_args(kwargs))
    assert_cli_error(result, "non-finite")
    assert not (tmp_path / "teacher.safetensors").exists()
    assert not list((tmp_path / "checkpoints").glob("ckpt-*.pt")) if (tmp_path / "checkpoints").exists() else True


def test_a_run_that_skipped_every_step_writes_no_release(tmp_path, image_dir, monkeypatch):
    from ibmd_fast.train import teacher as teacher_module

    real_loss = teacher_module.ops.bridge_loss
    monkeypatch.setattr(teacher_module.ops, "bridge_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    result = invoke("train-teacher", *_cli_args(teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=100)))
    assert_cli_error(result, "every one of the 2 teacher step(s)", "skipped")
    assert not (tmp_path / "teacher.safetensors").exists()


# ----------------------------------------------------------------------------
# 1. nothing overwritten that the command did not make


def test_outputs_of_another_kind_or_inputs_are_refused(releases, tmp_path):
    root, _ = releases
    gen, teacher = root / "generator.safetensors", root / "teacher.safetensors"
    inputs = _inputs(tmp_path / "in")
    before = snapshot(root, inputs)
    assert_cli_error(invoke("export", "--onnx", "--model", gen, "--output", gen, "--no-check"), str(gen))
    assert_cli_error(invoke("export", "--onnx", "--model", gen, "--output", teacher, "--no-check"), str(teacher))
    assert_cli_error(
        invoke(
            "train-classifier",
            "--output",
            teacher,
            "--epochs",
            1,
            "--max-items",
            8,
            "--image-size",
            8,
            "--device",
            "cpu",
        ),
        str(teacher),
    )
    source = tmp_path / "ddbm.pt"
    torch.save({}, source)
    assert_cli_error(
        invoke("import-teacher", source, "--format", "ddbm", "--out", teacher, "--preset", "e2h"),
        str(teacher),
        "--overwrite",
    )
    assert_cli_error(
        invoke("import-teacher", source, "--format", "ddbm", "--out", gen, "--overwrite", "--preset", "e2h"), str(gen)
    )
    # import-teacher onto its own kind: only with --overwrite
    from test_importers import SIZE, write_i2sb_run

    write_i2sb_run(tmp_path / "run", True)
    out = tmp_path / "t.safetensors"
    args = ("import-teacher", tmp_path / "run", "--format", "i2sb", "--out", out, "--image-size", SIZE)
    assert invoke(*args).exit_code == 0
    first = out.read_bytes()
    assert_cli_error(invoke(*args, "--beta-max", 0.5), str(out), "--overwrite")
    assert out.read_bytes() == first
    result = invoke(*args, "--beta-max", 0.5, "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != first
    # sample: the output inside the input folder would be read back as input next time
    assert_cli_error(
        invoke("sample", "--model", gen, "--input", inputs, "--output", inputs / "restored", "--device", "cpu"),
        "--output",
        "input",
    )
    assert_unchanged(before)
    assert sorted(p.name for p in inputs.iterdir()) == ["0.png", "1.png"]


def test_an_existing_output_of_its_own_kind_needs_overwrite(releases, tmp_path):
    root, _ = releases
    gen = root / "generator.safetensors"
    onnx_path = tmp_path / "m.onnx"
    from ibmd_fast.onnx import export_onnx

    export_onnx(str(gen), str(onnx_path), check=False, progress=False, exporter="torchscript")
    before = snapshot(tmp_path)
    assert_cli_error(
        invoke("export", "--onnx", "--model", gen, "--output", onnx_path, "--no-check"), str(onnx_path), "--overwrite"
    )
    assert_unchanged(before)


# ----------------------------------------------------------------------------
# 2. a run's history is never dropped silently


def test_history_without_a_checkpoint_stops_and_resume_none_moves_it_aside(tmp_path, image_dir):
    from ibmd_fast.train import train_teacher

    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2)
    train_teacher(**kwargs)
    shutil.rmtree(tmp_path / "checkpoints")
    before = snapshot(tmp_path / "stats.jsonl", tmp_path / "teacher.safetensors", tmp_path / "config.json")
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 3}))
    assert_cli_error(result, "stats.jsonl", "no readable checkpoint", "--resume none")
    assert_unchanged(before)
    (tmp_path / "checkpoints").write_text("not a folder")
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 3}))
    assert_cli_error(result, "checkpoints", "not a folder")
    assert_unchanged(before)
    (tmp_path / "checkpoints").unlink()
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 1, "resume": "none"}))
    assert result.exit_code == 0, result.output
    aside = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("previous-")]
    assert len(aside) == 1 and aside[0].name in result.output
    for path, data in before.items():
        assert (aside[0] / Path(path).name).read_bytes() == data


# ----------------------------------------------------------------------------
# 3. damaged files are detected, not loaded


def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_release_is_refused(releases, tmp_path):
    root, _ = releases
    damaged = tmp_path / "generator.safetensors"
    shutil.copy(root / "generator.safetensors", damaged)
    _flip(damaged, damaged.stat().st_size // 2)
    inputs = _inputs(tmp_path / "in")
    before = snapshot(tmp_path)
    assert_cli_error(
        invoke("sample", "--model", damaged, "--input", inputs, "--output", tmp_path / "out", "--device", "cpu"),
        str(damaged),
        "damaged",
    )
    assert_unchanged(before)


def test_releases_without_a_checksum_still_load():
    from ibmd_fast.paths import DEFAULT_TEACHER
    from ibmd_fast.release import load_model

    assert load_model(DEFAULT_TEACHER).kind == "teacher"


def test_a_damaged_checkpoint_is_moved_aside_not_loaded(tmp_path, image_dir):
    from ibmd_fast.train import train_teacher

    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2)
    train_teacher(**kwargs)
    ckpt = tmp_path / "checkpoints" / "ckpt-2.pt"
    with zipfile.ZipFile(ckpt) as archive:  # the largest tensor record: flip bytes in its middle
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(ckpt, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(fh.read(4), dtype="<u2")
    _flip(ckpt, info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2)
    damaged = ckpt.read_bytes()
    before = snapshot(tmp_path / "stats.jsonl", tmp_path / "teacher.safetensors")
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 3}))
    assert_cli_error(result, "unreadable", "--resume none")
    assert_unchanged(before)
    assert (tmp_path / "checkpoints" / "ckpt-2.pt.corrupt").read_bytes() == damaged


# ----------------------------------------------------------------------------
# 6. messages name the thing


def test_messages_name_the_thing(releases, tmp_path, image_dir):
    root, _ = releases
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_cli_error(
        invoke("distill", "--teacher", folder, "--run-dir", tmp_path / "d", "--steps", 1, "--device", "cpu"),
        str(folder),
        "is a folder",
    )
    assert_cli_error(
        invoke("train-teacher", *_cli_args(teacher_kwargs(tmp_path / "t", image_dir, steps=1)), "--resume", folder),
        str(folder),
        "is a folder",
    )
    assert_cli_error(
        invoke("export", "--onnx", "--model", folder, "--output", tmp_path / "m.onnx"), str(folder), "is a folder"
    )
    assert_cli_error(invoke("sample", "--model", folder), str(folder), "is a folder")
    assert_cli_error(invoke("sample", "--model", root / "generator.safetensors", "--seed", 2**64), "--seed")
    assert_cli_error(invoke("train-teacher", "--seed", 2**64, "--dry-run"), "--seed")
    # a release whose config holds a bad value: the file and the key
    bad = tmp_path / "bad.safetensors"
    state = load_file(str(root / "generator.safetensors"))
    from safetensors import safe_open

    with safe_open(str(root / "generator.safetensors"), framework="pt") as fh:
        metadata = dict(fh.metadata())
    config = json.loads(metadata["config"])
    config["nfe"] = "two"
    metadata["config"] = json.dumps(config)
    metadata.pop("sha256", None)
    save_file(state, str(bad), metadata=metadata)
    assert_cli_error(
        invoke(
            "sample",
            "--model",
            bad,
            "--input",
            _inputs(tmp_path / "in"),
            "--output",
            tmp_path / "out",
            "--device",
            "cpu",
        ),
        str(bad),
        "nfe",
    )


def test_run_onnx_seed_out_of_range_is_one_line(tmp_path):
    _inputs(tmp_path / "in")
    proc = run_runner(
        "--model", tmp_path / "missing.onnx", "--input", tmp_path / "in", "--output", tmp_path / "o", "--seed", -1
    )
    assert_runner_error(proc, "--seed")


def test_run_onnx_output_inside_its_input_folder_is_refused(onnx_model, tmp_path):
    inputs = _inputs(tmp_path / "in")
    before = snapshot(inputs)
    proc = run_runner("--model", onnx_model, "--input", inputs, "--output", inputs / "restored")
    assert_runner_error(proc, "inside the input folder")
    assert_unchanged(before)
    assert sorted(p.name for p in inputs.iterdir()) == ["0.png", "1.png"]


def test_eval_and_train_classifier_check_their_output_before_training(tmp_path, monkeypatch):
    import tempfile

    import ibmd_fast.evaluate as evaluate

    def trained(*args, **kwargs):
        raise AssertionError("trained before checking the output")

    monkeypatch.setattr(evaluate, "fit_classifier", trained)
    monkeypatch.setattr(evaluate, "evaluate", trained)
    real = tempfile.mkstemp
    locked = tmp_path / "locked"

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    locked.mkdir()
    assert_cli_error(
        invoke("train-classifier", "--output", locked / "c.safetensors", "--device", "cpu"), str(locked), "cannot write"
    )
    assert_cli_error(
        invoke("eval", "--run-dir", locked / "eval", "--student", "none", "--device", "cpu"),
        str(locked),
        "cannot write",
    )


def test_resuming_with_other_training_options_says_which(tmp_path, image_dir):
    from ibmd_fast.train import train_teacher

    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2)
    train_teacher(**kwargs)
    before = snapshot(tmp_path)
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 3, "batch_size": 2, "lr": 5e-4}))
    assert_cli_error(result, "--batch-size", "--lr", "--allow-config-change")
    assert_unchanged({k: v for k, v in before.items() if not k.endswith("log.txt")})
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 3, "batch_size": 2}), "--allow-config-change")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------
# 5. work sized before it starts


def test_workers_are_capped_at_the_cpu_count(tmp_path, image_dir, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=1, ckpt_every=1, workers=3)
    with pytest.warns(UserWarning, match="--workers 3"):
        result = invoke("train-teacher", *_cli_args(kwargs))
    assert result.exit_code == 0, result.output


def test_sample_upsample_beyond_memory_is_refused_with_the_figure(releases, tmp_path):
    root, _ = releases
    inputs = _inputs(tmp_path / "in", size=(4, 4))
    before = snapshot(inputs)
    proc = run_cli(
        "sample",
        "--model",
        root / "generator.safetensors",
        "--input",
        inputs,
        "--output",
        tmp_path / "out",
        "--upsample",
        4000,
        "--device",
        "cpu",
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--upsample 4000" in errors[0] and "GiB" in errors[0], proc.stderr
    assert_unchanged(before)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing_half_written(tmp_path, image_dir, monkeypatch):
    import ibmd_fast.release as release
    from ibmd_fast.train import checkpoint as checkpoint_module
    from ibmd_fast.train import train_teacher

    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2)
    train_teacher(**kwargs)
    before = snapshot(tmp_path / "teacher.safetensors", tmp_path / "checkpoints")

    def full(*args, **kwargs):
        path = args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("f")
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(release, "save_file", full)
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 3}))
    assert_cli_error(result, str(tmp_path / "teacher.safetensors"), "no space left")
    assert_unchanged(before)
    assert not [p for p in tmp_path.rglob("*.tmp")]
    monkeypatch.undo()

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    result = invoke("train-teacher", *_cli_args({**kwargs, "steps": 4, "ckpt_every": 1}))
    assert_cli_error(result, "ckpt-", "no space left")
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert_unchanged(before)
