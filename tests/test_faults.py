"""Faults a user meets: nothing written is lost, and every user error is one clear line.

Data loss: the run-dir lock (two real processes), pruning and resuming around unreadable
checkpoints (a truncated high-step file), ``--resume none`` keeping the old checkpoints until a
new one exists, finished runs left as they are, the ONNX runner's output folder. Then one line,
not a traceback, for the errors of issue 15.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import teacher_kwargs
import ibmd_fast
from ibmd_fast.train import CheckpointError, CheckpointIO, CheckpointWarning, train_teacher

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_train_worker.py"
PACKAGE_ROOT = Path(ibmd_fast.__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(PACKAGE_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


def _cli_args(kwargs: dict) -> list[str]:
    args = []
    for key, value in kwargs.items():
        if isinstance(value, bool):
            args.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ibmd_fast", *map(str, args)],
        cwd=str(REPO),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _steps(run_dir) -> list[int]:
    return [s for s, _ in CheckpointIO(Path(run_dir) / "checkpoints").checkpoints()]


# ----------------------------------------------------------------------------
# 1. one run per run dir


def test_a_second_run_on_a_locked_run_dir_refuses_naming_the_pid(tmp_path, image_dir):
    run_dir = tmp_path / "run"
    kwargs = teacher_kwargs(run_dir, image_dir, steps=40, ckpt_every=1000, log_every=1)
    first = subprocess.Popen(
        [sys.executable, str(WORKER), "teacher", json.dumps(kwargs), "--slow", "0.5"],
        cwd=str(REPO),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stats = run_dir / "stats.jsonl"
        deadline = time.monotonic() + 120
        while not (stats.exists() and stats.read_text().strip()):
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "the first run wrote no stats line"
            time.sleep(0.05)
        config_before = (run_dir / "config.json").read_text()
        second = run_cli("train-teacher", *_cli_args({**kwargs, "steps": 2}))
        assert_one_line(second, str(run_dir), f"pid {first.pid}")
        assert (run_dir / "config.json").read_text() == config_before
        assert first.poll() is None  # the first run goes on
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    # kill -9 released the lock: a new run takes the directory
    summary = train_teacher(**teacher_kwargs(run_dir, image_dir, steps=2, resume="none"))
    assert summary["steps"] == 2


def test_run_lock_in_process(tmp_path):
    from ibmd_fast.train.rundir import RunDirInUseError, RunLock

    with RunLock(str(tmp_path)):
        with pytest.raises(RunDirInUseError, match=f"pid {os.getpid()}"):
            with RunLock(str(tmp_path)):
                pass
    with RunLock(str(tmp_path)):  # released on exit
        pass


# ----------------------------------------------------------------------------
# 2. pruning and resuming around unreadable checkpoints


def _truncated_copy(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def test_pruning_keeps_readable_checkpoints_and_moves_a_truncated_one_aside(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2, keep_ckpts=1)
    train_teacher(**kwargs)
    ckpt_dir = tmp_path / "checkpoints"
    _truncated_copy(ckpt_dir / "ckpt-2.pt", ckpt_dir / "ckpt-999.pt")  # a damaged high-step file

    with pytest.warns(CheckpointWarning, match="ckpt-999.pt"):
        train_teacher(**{**kwargs, "steps": 6})
    assert _steps(tmp_path) == [6]  # the newest readable one, kept=1
    assert (ckpt_dir / "ckpt-999.pt.corrupt").exists()
    CheckpointIO.read(str(ckpt_dir / "ckpt-6.pt"))
    # the next auto resume continues from 6, it does not restart
    summary = train_teacher(**{**kwargs, "steps": 8})
    assert summary["steps"] == 8
    assert f"resumed from {ckpt_dir / 'ckpt-6.pt'} at step 6" in (tmp_path / "log.txt").read_text()


def test_prune_never_deletes_the_last_readable_checkpoint(tmp_path):
    io = CheckpointIO(str(tmp_path), keep=1, net=torch.nn.Linear(2, 2))
    io.save(1)
    good = Path(io.path(1))
    for step in (5, 9):
        _truncated_copy(good, Path(io.path(step)))
    with pytest.warns(CheckpointWarning):
        io.prune()
    assert [s for s, _ in io.checkpoints()] == [1]
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == ["ckpt-5.pt.corrupt", "ckpt-9.pt.corrupt"]


def test_resume_auto_with_only_unreadable_checkpoints_stops_and_keeps_stats(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2, keep_ckpts=1)
    train_teacher(**kwargs)
    ckpt = tmp_path / "checkpoints" / "ckpt-2.pt"
    _truncated_copy(ckpt, ckpt)
    stats_before = (tmp_path / "stats.jsonl").read_text()
    assert stats_before
    for _ in range(2):  # the second time the damaged file has been moved aside already
        with pytest.raises(CheckpointError, match="--resume none"):
            train_teacher(**{**kwargs, "steps": 4})
        assert (tmp_path / "stats.jsonl").read_text() == stats_before
    # through the command line: one line
    proc = run_cli("train-teacher", *_cli_args({**kwargs, "steps": 4}))
    assert_one_line(proc, "unreadable", "--resume none")
    assert (tmp_path / "stats.jsonl").read_text() == stats_before


# ----------------------------------------------------------------------------
# 3. --resume none keeps the old checkpoints until a new one is written


def test_resume_none_keeps_old_checkpoints_until_the_first_new_one(tmp_path, image_dir, monkeypatch):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=4, ckpt_every=2, keep_ckpts=3)
    train_teacher(**kwargs)
    assert _steps(tmp_path) == [2, 4]
    from ibmd_fast.train import teacher as teacher_module

    def boom(*args, **kwargs):
        raise RuntimeError("the new run fails before its first checkpoint")

    with monkeypatch.context() as m:
        m.setattr(teacher_module.OptimizerStep, "__call__", boom)
        with pytest.raises(RuntimeError, match="fails before"):
            train_teacher(**{**kwargs, "resume": "none"})
    kept = sorted(p.name for p in tmp_path.rglob("ckpt-*.pt"))
    assert kept == ["ckpt-2.pt", "ckpt-4.pt"]  # still there, moved into previous-*/
    # a new run writes its own checkpoints beside the previous run's, which stay moved aside
    train_teacher(**{**kwargs, "resume": "none", "steps": 2})
    assert _steps(tmp_path) == [2]
    assert not list((tmp_path / "checkpoints").glob("previous-*"))
    assert sorted(p.name for p in tmp_path.glob("previous-*/checkpoints/ckpt-*.pt")) == ["ckpt-2.pt", "ckpt-4.pt"]


# ----------------------------------------------------------------------------
# 5. a finished run is left as it is


def test_rerunning_a_finished_run_leaves_the_release(tmp_path, image_dir):
    kwargs = teacher_kwargs(tmp_path, image_dir, steps=2, ckpt_every=2)
    first = train_teacher(**kwargs)
    release = Path(first["release"])
    before = release.read_bytes()
    stats_before = (tmp_path / "stats.jsonl").read_text()
    again = train_teacher(**kwargs)
    assert release.read_bytes() == before
    assert (tmp_path / "stats.jsonl").read_text() == stats_before
    assert again["steps"] == 2 and again["loss"] == first["loss"]
    assert "finished" in (tmp_path / "log.txt").read_text().splitlines()[-1]
    # more steps: it continues
    more = train_teacher(**{**kwargs, "steps": 3})
    assert more["steps"] == 3 and release.read_bytes() != before


# ----------------------------------------------------------------------------
# 4. the ONNX runner: output folders, unreadable inputs, options that do not fit the model

RUNNER = REPO / "export" / "run_onnx.py"


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from ibmd_fast.bridges import I2SBBridge
    from ibmd_fast.models import Generator, Teacher, build_unet
    from ibmd_fast.onnx import export_onnx
    from ibmd_fast.release import GENERATOR_FORMAT, save_release

    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    generator = Generator(Teacher(build_unet("tiny", 16, 3, 3), I2SBBridge()))
    config = {
        **generator.config(),
        "nfe": 1,
        "degradation": "sr4x-bicubic",
        "image_size": 16,
        "channels": 3,
        "inpainting": False,
    }
    save_release(str(root / "g.safetensors"), generator.net, GENERATOR_FORMAT, config)
    return export_onnx(
        str(root / "g.safetensors"), str(root / "model.onnx"), check=False, progress=False, exporter="torchscript"
    )["onnx"]  # the quicker exporter: the runner is under test


def run_runner(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=120, env=_env()
    )


def assert_runner_error(proc, *fragments) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("run_onnx: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _images(root: Path, names, size=(16, 16)) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    return {name: (root / name).read_bytes() for name in names}


def test_runner_refuses_to_write_over_its_inputs(onnx_model, tmp_path):
    before = _images(tmp_path / "in", ["a.png", "b.png"])
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in", "--output", tmp_path / "in")
    assert_runner_error(proc, "input folder", "overwrite")
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in" / "a.png", "--output", tmp_path / "in")
    assert_runner_error(proc, "folder of the input", "overwrite")
    assert {n: (tmp_path / "in" / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.png", "b.png"]


def test_runner_skips_unreadable_images_as_sample_does(onnx_model, tmp_path):
    _images(tmp_path / "in", ["a.png", "c.png"])
    (tmp_path / "in" / "b.png").write_bytes(b"not a png")
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    warnings_ = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings_) == 1 and "skipped 1 unreadable input image(s): b.png" in warnings_[0], proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    (tmp_path / "in" / "a.png").write_bytes(b"")
    (tmp_path / "in" / "c.png").write_bytes(b"x")
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in", "--output", tmp_path / "out2")
    assert_runner_error(proc, "no readable input image")


def test_runner_refuses_options_the_model_does_not_take(onnx_model, tmp_path):
    _images(tmp_path / "in", ["a.png"], size=(4, 4))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in", "--output", tmp_path / "o", "--mask", mask)
    assert_runner_error(proc, "--mask", "inpainting")
    # an sr4x model takes the low-resolution image and upsamples it itself: 4x4 in, 16x16 out
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in", "--output", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o" / "a.png").size == (16, 16)


def test_runner_output_that_cannot_be_written(onnx_model, tmp_path, monkeypatch, capsys):
    _images(tmp_path / "in", ["a.png"])
    (tmp_path / "file").write_text("a file")
    proc = run_runner("--model", onnx_model, "--input", tmp_path / "in", "--output", tmp_path / "file" / "out")
    assert_runner_error(proc, "is a file")
    # a folder this process may not write (root may write anywhere: simulate the refusal)
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_onnx_faults", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(runner.tempfile, "mkstemp", refuse)
    assert runner.main(["--model", onnx_model, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "ro")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run_onnx: error:" in err[0] and "cannot write" in err[0], err


def test_runner_inputs_vanishing_mid_run(onnx_model, tmp_path, monkeypatch, capsys):
    import importlib.util

    _images(tmp_path / "in", ["a.png", "b.png"])
    spec = importlib.util.spec_from_file_location("run_onnx_vanish", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    checked = runner.list_inputs

    def list_then_delete(root):
        items = checked(root)
        real_size = runner._image_size

        def size_then_delete(path):
            out = real_size(path)
            os.remove(path)  # gone after the check, before the run
            return out

        monkeypatch.setattr(runner, "_image_size", size_then_delete)
        return items

    monkeypatch.setattr(runner, "list_inputs", list_then_delete)
    assert runner.main(["--model", onnx_model, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and "no readable input image" in err[0], err


# ----------------------------------------------------------------------------
# One clear line, not a traceback


def invoke(*args):
    from click.testing import CliRunner

    from ibmd_fast.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def assert_cli_error(result, *fragments) -> str:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_export_opset_outside_the_exporter_is_refused_before_exporting(tmp_path):
    import onnx

    top = onnx.defs.onnx_opset_version()
    result = invoke("export", "--onnx", "--model", tmp_path / "missing.safetensors", "--opset", top + 1)
    assert_cli_error(result, f"--opset {top + 1}", f"17..{top}")
    result = invoke("export", "--onnx", "--model", tmp_path / "missing.safetensors", "--opset", 12)
    assert_cli_error(result, "--opset")


def test_export_without_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    import ibmd_fast.onnx as ionnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ionnx.OnnxExportError, match="pip install onnxruntime"):
        ionnx.require_runtime()


def test_output_whose_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke("sample", "--model", tmp_path / "none.safetensors", "--output", tmp_path / "file" / "out")
    assert_cli_error(result, "is a file")
    result = invoke("train-teacher", "--run-dir", tmp_path / "file" / "run", "--device", "cpu", "--steps", 1)
    assert_cli_error(result, "is a file")
    result = invoke("export", "--onnx", "--model", tmp_path / "file", "--output", tmp_path / "file" / "m.onnx")
    assert_cli_error(result, "is a file")


def test_device_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the message is for machines without it
    for command in ("train-teacher", "distill"):
        result = invoke(command, "--run-dir", tmp_path / command, "--device", "cuda", "--steps", 1)
        assert_cli_error(result, "--device cuda", "no CUDA")


def test_image_size_the_unet_cannot_take(tmp_path):
    result = invoke("train-teacher", "--run-dir", tmp_path, "--arch", "small", "--image-size", 30, "--dry-run")
    assert_cli_error(result, "--image-size 30", "multiples of 8", "24 or 32")


def test_out_of_memory_says_lower_batch_size_with_the_sizes(tmp_path, monkeypatch):
    import ibmd_fast.train

    for exc in (
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1234 bytes."),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ):

        def boom(cfg, exc=exc):
            raise exc

        monkeypatch.setattr(ibmd_fast.train, "train_teacher", boom)
        result = invoke("train-teacher", "--run-dir", tmp_path, "--batch-size", 64, "--image-size", 32)
        assert_cli_error(result, "out of", "memory", "--batch-size 64", "32px", "lower --batch-size")


def test_config_nulls_and_wrong_types_are_refused(tmp_path):
    cases = {
        "steps: null": "steps",
        "run_dir: null": "run_dir",
        "steps: true": "integer",
        "steps: 2.7": "integer",
        "lr: yes": "number",
        "conditional: 1": "true or false",
        "data: 3": "text",
    }
    for text, fragment in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text + "\n")
        result = invoke("train-teacher", "--config", path, "--dry-run")
        assert_cli_error(result, str(path), fragment)
    path.write_text("steps: 5\nlr: 1\nconditional: true\n")  # an int is a fine float
    result = invoke("train-teacher", "--config", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 5


def test_malicious_checkpoint_message(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "ckpt-1.pt"
    torch.save({"format": "ibmd_fast.checkpoint/1", "state": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        CheckpointIO.read(str(path))
    message = str(info.value)
    assert "weights_only" not in message and "arbitrary code" not in message, message
    assert "Python objects" in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_messages_name_the_options(tmp_path, image_dir):
    from ibmd_fast.train import CheckpointMismatchError

    kwargs = teacher_kwargs(tmp_path, image_dir, steps=1, ckpt_every=1)
    train_teacher(**kwargs)
    with pytest.raises(CheckpointMismatchError) as info:
        train_teacher(**{**kwargs, "arch": "small", "steps": 2})
    assert "--resume none" in str(info.value) and "resume='none'" not in str(info.value)


def test_steps_zero_and_one_pixel_images_warn(tmp_path):
    from ibmd_fast.train.preflight import check_settings

    with pytest.warns(UserWarning, match="--steps 0"):
        check_settings(steps=0)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny / f"{i}.png")
    for spec in (f"folder:{tiny}", f"corrupted:{tiny}", f"paired:{tiny},{tiny}"):
        with pytest.warns(UserWarning, match="1x1"):
            check_settings(steps=5, data=spec, image_size=16)


def test_help_does_not_import_torch():
    code = (
        "import sys; from ibmd_fast.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", proc.stdout + proc.stderr
    assert "train-teacher" in proc.stdout and "export" in proc.stdout


def test_log_lines_do_not_print_over_the_progress_bar(tmp_path, monkeypatch):
    from tqdm import tqdm

    from ibmd_fast.train.rundir import RunLog
    from ibmd_fast.train.distributed import DistEnv

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False: written.append(s)))
    RunLog(str(tmp_path), DistEnv())("a line")
    assert written == ["a line"]


def test_training_images_vanishing_mid_run(tmp_path, image_dir, monkeypatch):
    import shutil

    from ibmd_fast.train import teacher as teacher_module

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    step = teacher_module.OptimizerStep.__call__

    def step_then_delete(self, loss):
        out = step(self, loss)
        for path in images.glob("*.png"):
            path.unlink()
        return out

    monkeypatch.setattr(teacher_module.OptimizerStep, "__call__", step_then_delete)
    kwargs = teacher_kwargs(tmp_path / "run", images, steps=4, ckpt_every=1)
    result = invoke("train-teacher", *_cli_args(kwargs))
    assert_cli_error(result, "can no longer be read", str(images))
    assert _steps(tmp_path / "run") == [1]  # what was written stays


def test_divergence_and_warnings_print_once(tmp_path, image_dir, monkeypatch):
    from ibmd_fast.train import teacher as teacher_module

    real_loss = teacher_module.ops.bridge_loss
    monkeypatch.setattr(teacher_module.ops, "bridge_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    kwargs = teacher_kwargs(tmp_path / "nan", image_dir, steps=30, ckpt_every=100, log_every=100)
    result = invoke("train-teacher", *_cli_args(kwargs))
    assert_cli_error(result, "training diverged")
    assert result.output.count("training diverged") == 1, result.output
    assert "training diverged" in (tmp_path / "nan" / "log.txt").read_text()  # the log file keeps it
    monkeypatch.undo()

    # a damaged checkpoint: one warning line on the screen (a real process: pytest does not capture it)
    kwargs = teacher_kwargs(tmp_path / "run", image_dir, steps=2, ckpt_every=2)
    train_teacher(**kwargs)
    _truncated_copy(tmp_path / "run" / "checkpoints" / "ckpt-2.pt", tmp_path / "run" / "checkpoints" / "ckpt-7.pt")
    proc = run_cli("train-teacher", *_cli_args({**kwargs, "steps": 3}))
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "ckpt-7.pt" in line]) == 1, proc.stderr


def test_rerunning_a_finished_distillation_leaves_the_release(tmp_path, image_dir):
    from ibmd_fast.train import distill

    teacher = train_teacher(**teacher_kwargs(tmp_path / "t", image_dir, steps=1, ckpt_every=1))["release"]
    kwargs = dict(
        run_dir=str(tmp_path / "d"),
        teacher=teacher,
        batch_size=4,
        steps=1,
        inner_steps=1,
        log_every=1,
        ckpt_every=1,
        eval_items=0,
        device="cpu",
        progress=False,
    )
    first = distill(**kwargs)
    before = Path(first["release"]).read_bytes()
    again = distill(**kwargs)
    assert Path(first["release"]).read_bytes() == before
    assert again["steps"] == 1 and again["loss_theta"] == first["loss_theta"] and again["comparison"] == []
