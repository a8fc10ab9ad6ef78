"""The `ibmd-fast` command line and the evaluate module behind it.

Tiny releases (16 px, the "tiny" U-Net, a 100-step I2SB bridge) are built here with
`save_release`, so nothing needs a trained model. Most commands run in-process through
click's CliRunner; a few through `python -m ibmd_fast` to check the real entry point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import ibmd_fast.cli as cli_module
import ibmd_fast.onnx as onnx_module
import ibmd_fast.train as train_module
from ibmd_fast import imageio
from ibmd_fast.bridges import I2SBBridge, VPBridge
from ibmd_fast.data import FASHION_MNIST_DIR
from ibmd_fast.cli_config import IntList
from ibmd_fast.cli import cli
from ibmd_fast.config_io import ConfigError, check_keys, load_config_file, resolve_config
from ibmd_fast.paths import DEFAULT_GENERATOR, DEFAULT_TEACHER
from ibmd_fast.evaluate import (
    classifier_line,
    classifier_training_data,
    evaluate,
    fit_classifier,
    format_table,
    get_classifier,
)
from ibmd_fast.release import load_model
from ibmd_fast.restore import restore_with_generator, restore_with_teacher
from ibmd_fast.classifier import Classifier, load_classifier, save_classifier
from ibmd_fast.models import Generator, build_unet
from ibmd_fast.release import GENERATOR_FORMAT, TEACHER_FORMAT, save_release
from ibmd_fast.train import DistillConfig, TeacherConfig

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


# tiny networks on shared cores: one thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------
# Tiny releases


def _randomized(net, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


def make_teacher_release(
    path,
    bridge="i2sb",
    degradation="sr4x-bicubic",
    conditional=False,
    nfe=2,
    seed=0,
    channels=3,
    unet_config_override=None,
):
    bridge_obj = (
        I2SBBridge(n_steps=100, beta_max=1.0 if degradation.startswith("inpaint") else 0.3)
        if bridge == "i2sb"
        else VPBridge()
    )
    net = _randomized(build_unet("tiny", SIZE, channels * (2 if conditional else 1), channels), seed)
    unet = dict(net.config, **(unet_config_override or {}))
    save_release(
        str(path),
        net,
        TEACHER_FORMAT,
        {
            "unet": unet,
            "conditional": conditional,
            "bridge": bridge_obj.config(),
            "nfe": nfe,
            "degradation": degradation,
            "image_size": SIZE,
            "channels": channels,
            "data": "skimage",
        },
    )
    return str(path)


def make_generator_release(path, teacher_path, nfe=1):
    loaded = load_model(teacher_path, expect="teacher")
    generator = Generator(loaded.model, multistep=nfe > 1)
    save_release(
        str(path),
        generator.net,
        GENERATOR_FORMAT,
        {
            **generator.config(),
            "nfe": nfe,
            "degradation": loaded.degradation,
            "image_size": SIZE,
            "channels": loaded.image_channels,
        },
    )
    return str(path)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    teacher = make_teacher_release(root / "teacher.safetensors")
    out = {
        "root": root,
        "teacher": teacher,
        "generator": make_generator_release(root / "generator.safetensors", teacher),
        "generator2": make_generator_release(root / "generator-2step.safetensors", teacher, nfe=2),
        "inpaint": make_teacher_release(root / "inpaint.safetensors", degradation="inpaint-center"),
        "vp": make_teacher_release(root / "vp.safetensors", bridge="vp", conditional=True),
        "other_arch": make_teacher_release(
            root / "other-arch.safetensors", unet_config_override={"model_channels": 64}
        ),
    }
    text = root / "notes.txt"
    text.write_text("not a release\n")
    out["text"] = str(text)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(root / "random.safetensors"))
    out["random"] = str(root / "random.safetensors")
    torch.save({"step": 3, "net": {"w": torch.zeros(2)}}, str(root / "ckpt-3.pt"))
    out["checkpoint"] = str(root / "ckpt-3.pt")
    return out


def _png(path, size=(SIZE, SIZE), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


def invoke(*args, **kwargs):
    """Run the CLI in-process; stderr is kept apart from stdout."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True, **kwargs)


def assert_one_error_line(result, *fragments):
    """Exit code != 0, exactly one `Error: ...` line on stderr, no traceback, the fragments in it."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]
    return errors[0]


def run_module(*args, cwd):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "ibmd_fast", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ----------------------------------------------------------------------------
# Help, entry point


COMMANDS = ["train-teacher", "distill", "sample", "eval", "train-classifier", "export"]


def test_help_of_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    for name in COMMANDS:
        result = invoke(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output and "--help" in result.output


def test_python_dash_m_entry_point(tmp_path):
    result = run_module("--help", cwd=tmp_path)
    assert result.returncode == 0 and "train-classifier" in result.stdout
    # An expected error: one line on stderr, exit code 1, no traceback.
    result = run_module("sample", "--model", tmp_path / "missing.safetensors", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("Error: ") and "missing.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------
# Config: defaults < file < options


@dataclasses.dataclass
class _Toy:
    lr: float = 1e-3
    steps: int = 10
    name: str = "a"
    nfe: tuple = (1, 10)


def test_config_io_precedence_and_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nsteps: 20\nnfe: [2, 3]\n")
    options = {"lr": 1e-3, "steps": 10, "name": "a", "nfe": (1, 10)}
    cfg = resolve_config(_Toy, options, given=set(), config_file=cfg_file)
    assert (cfg.lr, cfg.steps, cfg.name, cfg.nfe) == (0.5, 20, "a", [2, 3])
    cfg = resolve_config(_Toy, {**options, "steps": 7}, given={"steps"}, config_file=cfg_file)
    assert (cfg.lr, cfg.steps) == (0.5, 7)
    assert resolve_config(_Toy, options, given=set()) == _Toy()

    json_file = tmp_path / "c.json"
    json_file.write_text('{"name": "b", "step-count": 1, "bogus": 2}')
    with pytest.raises(ConfigError, match="unknown key.*bogus, step-count"):
        resolve_config(_Toy, options, set(), json_file)
    check_keys(_Toy, {"lr": 1}, "x")  # dashes or underscores, known keys pass
    for text, match in (("[1, 2]", "mapping"), ("a: [", "not valid YAML")):
        cfg_file.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config_file(cfg_file)
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "none.yaml")
    cfg_file.write_text("")
    assert load_config_file(cfg_file) == {}


def test_int_list_type():
    assert IntList().convert("1,10, 100", None, None) == (1, 10, 100)
    assert IntList().convert([2, 3], None, None) == (2, 3)
    with pytest.raises(Exception, match="integers"):
        IntList().convert("1,x", None, None)


@pytest.mark.parametrize("command,cls", [("train-teacher", "TeacherConfig"), ("distill", "DistillConfig")])
def test_every_config_field_is_an_option_with_the_dataclass_default(command, cls):
    cls = {"TeacherConfig": TeacherConfig, "DistillConfig": DistillConfig}[cls]
    params = {p.name: p for p in cli.get_command(None, command).params}  # built on first use
    for f in dataclasses.fields(cls):
        assert f.name in params, f"{command} has no option for {cls.__name__}.{f.name}"
        assert params[f.name].default == getattr(cls(), f.name), f.name
        assert "see its docstring" not in (params[f.name].help or ""), (
            f"{command}: {f.name} has only a generic option; give it an explicit one in cli.py"
        )


def test_dry_run_precedence(tmp_path):
    result = invoke("train-teacher", "--dry-run")
    assert result.exit_code == 0, result.output
    defaults = json.loads(result.stdout)
    expected = json.loads(json.dumps(dataclasses.asdict(TeacherConfig())))
    expected["progress"] = defaults["progress"]  # follows the terminal unless given
    assert defaults == expected

    cfg_file = tmp_path / "teacher.yaml"
    cfg_file.write_text("lr: 0.001\nsteps: 7\nimage-size: 16\nconditional: true\nprogress: false\n")
    result = invoke("train-teacher", "--config", cfg_file, "--steps", "3", "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert (resolved["lr"], resolved["steps"], resolved["image_size"], resolved["conditional"]) == (0.001, 3, 16, True)
    assert resolved["batch_size"] == TeacherConfig.batch_size and resolved["progress"] is False
    assert not (tmp_path / "runs").exists()

    cfg_file = tmp_path / "distill.json"
    cfg_file.write_text(json.dumps({"eval_teacher_nfe": [1, 4], "nfe": 2, "run_dir": str(tmp_path / "d")}))
    result = invoke("distill", "--config", cfg_file, "--nfe", "3", "--dry-run")
    resolved = json.loads(result.stdout)
    assert resolved["eval_teacher_nfe"] == [1, 4] and resolved["nfe"] == 3
    assert resolved["teacher"] == "" and resolved["lr"] == DistillConfig.lr
    result = invoke("distill", "--dry-run", "--eval-teacher-nfe", "1,5")
    assert json.loads(result.stdout)["eval_teacher_nfe"] == [1, 5]
    assert not (tmp_path / "d").exists()


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nbogus: 1\nalso_bad: 2\n")
    assert_one_error_line(invoke("train-teacher", "--config", bad, "--dry-run"), "unknown key", "also_bad, bogus")
    bad.write_text("lr: -1\n")
    assert_one_error_line(invoke("distill", "--config", bad, "--dry-run"), "lr", "range")
    assert_one_error_line(invoke("train-teacher", "--config", tmp_path / "none.yaml", "--dry-run"), "not found")
    assert_one_error_line(invoke("train-teacher", "--degradation", "blur-3", "--dry-run"), "unknown degradation")


# ----------------------------------------------------------------------------
# sample


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_sample_teacher_default_inputs(releases, tmp_path):
    out = tmp_path / "out"
    result = invoke("sample", "--model", releases["teacher"], "--output", out, "--num-images", 3, "--nfe", 2)
    assert result.exit_code == 0, result.output
    assert "teacher, NFE 2, i2sb" in result.stdout
    names = [f"skimage-{i:03d}.png" for i in range(3)]
    for sub in ("", "inputs", "clean"):
        assert sorted(p.name for p in (out / sub).glob("*.png")) == names
    assert all(_pixels(out / n).shape == (SIZE, SIZE, 3) for n in names)
    assert not np.array_equal(_pixels(out / names[0]), _pixels(out / "inputs" / names[0]))


def test_sample_generator_folder_names_and_a_corrupt_file(releases, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    _png(inputs / "a.png", seed=1)
    _png(inputs / "sub" / "b.jpg", size=(2 * SIZE, SIZE), seed=2)  # other size, other format
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 1 unreadable input image.*broken.png"):
        result = invoke("sample", "--model", releases["generator"], "--input", inputs, "--output", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png", "sub/b.png"]
    assert _pixels(out / "a.png").shape == (SIZE, SIZE, 3)
    assert _pixels(out / "sub" / "b.png").shape == (SIZE, 2 * SIZE, 3)

    # A two-step student samples with its own NFE; --nfe other than that is refused.
    result = invoke("sample", "--model", releases["generator2"], "--input", inputs / "a.png", "--output", out)
    assert result.exit_code == 0 and "generator, NFE 2" in result.stdout
    assert_one_error_line(
        invoke("sample", "--model", releases["generator2"], "--nfe", 1, "--output", out), "distilled for 2 step"
    )


def test_sample_upsample_and_gray_input(releases, tmp_path):
    low = _png(tmp_path / "low.png", size=(SIZE // 4, SIZE // 4), mode="L")
    out = tmp_path / "out"
    result = invoke(
        "sample", "--model", releases["teacher"], "--input", low, "--upsample", 4, "--output", out, "--nfe", 1
    )
    assert result.exit_code == 0, result.output
    assert _pixels(out / "low.png").shape == (SIZE, SIZE, 3)


def test_sample_inpainting_keeps_known_pixels(releases, tmp_path):
    out = tmp_path / "default"
    result = invoke("sample", "--model", releases["inpaint"], "--output", out, "--num-images", 2, "--nfe", 2)
    assert result.exit_code == 0, result.output
    known = np.ones((SIZE, SIZE), bool)
    known[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = False  # inpaint-center's hole
    restored, given = _pixels(out / "skimage-000.png"), _pixels(out / "inputs" / "skimage-000.png")
    assert np.array_equal(restored[known], given[known])
    assert not np.array_equal(restored[~known], given[~known])

    # A mask file (white = hole), resized to the input.
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    image = _png(tmp_path / "img.png", seed=3)
    out = tmp_path / "masked"
    result = invoke(
        "sample",
        "--model",
        releases["inpaint"],
        "--input",
        image,
        "--mask",
        tmp_path / "mask.png",
        "--output",
        out,
        "--nfe",
        1,
    )
    assert result.exit_code == 0, result.output
    hole = np.zeros((SIZE, SIZE), bool)
    hole[: SIZE // 2, : SIZE // 2] = True
    assert np.array_equal(_pixels(out / "img.png")[~hole], _pixels(image)[~hole])


def test_sample_vp_teacher_samplers(releases, tmp_path):
    image = _png(tmp_path / "x.png")
    for args in (("--nfe", 2), ("--sampler", "heun", "--nfe", 3), ("--sampler", "dbim", "--nfe", 2)):
        result = invoke("sample", "--model", releases["vp"], "--input", image, "--output", tmp_path / "o", *args)
        assert result.exit_code == 0, result.output
        assert ("heun" if "heun" in args else "dbim") in result.stdout
    assert_one_error_line(
        invoke("sample", "--model", releases["vp"], "--sampler", "i2sb", "--output", tmp_path),
        "i2sb sampler needs an I2SB teacher",
    )


def test_sample_eta_reaches_dbim_and_is_refused_elsewhere(releases, tmp_path):
    image = _png(tmp_path / "x.png")
    pixels = {}
    for eta in (None, "1", "0"):
        out = tmp_path / f"out-{eta}"
        result = invoke(
            "sample",
            "--model",
            releases["vp"],
            "--input",
            image,
            "--output",
            out,
            "--nfe",
            3,
            *(() if eta is None else ("--eta", eta)),
        )
        assert result.exit_code == 0, result.output
        pixels[eta] = _pixels(out / "x.png")
    assert np.array_equal(pixels[None], pixels["1"])  # the default is DBIM's, eta = 1
    assert not np.array_equal(pixels["0"], pixels["1"])
    out = tmp_path / "refused"
    assert_one_error_line(
        invoke("sample", "--model", releases["vp"], "--sampler", "heun", "--eta", 0, "--output", out),
        "--eta applies to the dbim sampler only",
    )
    assert_one_error_line(
        invoke("sample", "--model", releases["teacher"], "--eta", 0, "--output", out),
        "--eta applies to the dbim sampler only",
        "i2sb",
    )
    assert_one_error_line(
        invoke("sample", "--model", releases["generator"], "--eta", 0, "--output", out),
        "--eta applies to teachers only",
    )
    assert_one_error_line(invoke("sample", "--model", releases["vp"], "--eta", 1.5, "--output", out), "1.5")
    assert_one_error_line(
        invoke("eval", "--teacher", releases["teacher"], "--student", "none", "--eta", 0.5, "--run-dir", out),
        "--eta applies to the dbim sampler only",
    )
    assert not out.exists()


def test_restore_functions_are_seeded_and_batch_independent_in_shape(releases):
    teacher = load_model(releases["teacher"], expect="teacher").model
    generator = load_model(releases["generator"], expect="generator").model
    xT = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    a = restore_with_teacher(teacher, xT, nfe=2, seed=5, batch_size=2)
    b = restore_with_teacher(teacher, xT, nfe=2, seed=5, batch_size=2)
    assert a.shape == xT.shape and torch.equal(a, b) and a.abs().max() <= 1
    g = restore_with_generator(generator, xT, seed=1, batch_size=3)
    # At initialization the student is the teacher's one-step prediction (zero-initialized z input).
    torch.testing.assert_close(g, restore_with_teacher(teacher, xT, nfe=1, seed=1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Bad input: one `Error:` line, exit != 0, earlier outputs untouched


@pytest.fixture()
def earlier_output(tmp_path):
    """An output folder holding the result of an earlier run."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("skimage-000.png", "a.png", "eval.json"):
        (out / name).write_bytes(b"earlier result " + name.encode())
    return out


def _untouched(out):
    for name in ("skimage-000.png", "a.png", "eval.json"):
        assert (out / name).read_bytes() == b"earlier result " + name.encode()


def test_sample_bad_inputs(releases, tmp_path, earlier_output, monkeypatch):
    out = earlier_output
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG truncated")
    odd = _png(tmp_path / "odd.png", size=(SIZE + 1, SIZE))
    cases = [
        (("--model", tmp_path / "missing.safetensors"), ("not found", "missing.safetensors")),
        (("--model", releases["text"]), ("not a readable safetensors file",)),
        (("--model", releases["random"]), ("not an ibmd-fast release",)),
        (("--model", releases["checkpoint"]), ("not a readable safetensors file",)),
        (("--model", releases["other_arch"]), ("weights do not match",)),
        (("--model", releases["root"]), ("is a folder",)),
        (("--model", releases["teacher"], "--input", tmp_path / "nope"), ("input not found",)),
        (("--model", releases["teacher"], "--input", empty), ("contains no images",)),
        (("--model", releases["teacher"], "--input", broken), ("no readable input image", "a.png")),
        (("--model", releases["teacher"], "--input", odd), ("17x16", "multiples of 2")),
        (("--model", releases["teacher"], "--mask", odd), ("--mask is for inpainting",)),
        (("--model", releases["generator"], "--sampler", "dbim"), ("teachers only",)),
        (("--model", releases["teacher"], "--input", broken / "a.png"), ("no readable input image",)),
        (("--model", releases["teacher"], "--input", out / "a.png"), ("is the input folder",)),
        (("--model", releases["teacher"], "--input", out), ("is the input folder",)),
    ]
    for args, fragments in cases:
        assert_one_error_line(invoke("sample", *args, "--output", out), *fragments)
        _untouched(out)
    # The default model is the default distill's output; without it, say how to get one.
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(invoke("sample", "--output", out), "runs/distill/generator.safetensors", "ibmd-fast distill")
    _untouched(out)


def test_eval_bad_inputs(releases, tmp_path, earlier_output, monkeypatch):
    out = earlier_output
    base = ("eval", "--run-dir", out, "--num-images", 2)
    cases = [
        (("--teacher", releases["generator"], "--student", "none"), ("holds a generator, not a teacher",)),
        (("--teacher", "none", "--student", releases["teacher"]), ("holds a teacher, not a generator",)),
        (("--teacher", "none", "--student", releases["random"]), ("not an ibmd-fast release",)),
        (("--teacher", "none", "--student", "none"), ("nothing to evaluate",)),
        (
            (
                "--teacher",
                releases["teacher"],
                "--student",
                releases["generator"],
                "--classifier",
                tmp_path / "none.safetensors",
            ),
            ("classifier file not found",),
        ),
        (
            ("--teacher", releases["teacher"], "--student", "none", "--classifier", releases["teacher"]),
            ("not a classifier",),
        ),
        (
            ("--teacher", releases["teacher"], "--student", "none", "--data", f"folder:{tmp_path / 'nope'}"),
            ("does not exist",),
        ),
        (("--teacher", releases["teacher"], "--student", "none", "--image-size", 17), ("multiples of 2",)),
        (
            ("--teacher", releases["teacher"], "--student", releases["generator"], "--degradation", "blur-3"),
            ("unknown degradation",),
        ),
    ]
    for args, fragments in cases:
        assert_one_error_line(invoke(*base, *args), *fragments)
        _untouched(out)
    # Defaults: the embedded teacher and the default distill's output.
    monkeypatch.setattr(cli_module, "DEFAULT_TEACHER", str(tmp_path / "assets" / "teacher-inpaint.safetensors"))
    assert_one_error_line(invoke(*base, "--student", releases["generator"]), "embedded teacher", "--teacher")
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(invoke(*base, "--teacher", releases["teacher"]), "runs/distill/generator.safetensors")
    _untouched(out)


def test_eval_with_mismatched_releases(releases, tmp_path):
    result = invoke(
        "eval",
        "--teacher",
        releases["inpaint"],
        "--student",
        releases["generator"],
        "--run-dir",
        tmp_path,
        "--num-images",
        2,
    )
    assert_one_error_line(result, "inpaint-center", "sr4x-bicubic")


def test_training_errors_are_one_line(releases, tmp_path, monkeypatch):
    from ibmd_fast.train import TrainingDivergedError

    def diverge(cfg):
        raise TrainingDivergedError("training diverged: 20 consecutive non-finite losses; lower --lr")

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_teacher", diverge)
        assert_one_error_line(
            invoke("train-teacher", "--run-dir", tmp_path / "t", "--lr", "1e30"), "training diverged", "lower --lr"
        )
    # Real distiller, bad teachers: a generator, a text file, a missing file.
    for teacher, fragment in (
        (releases["generator"], "not a teacher"),
        (releases["text"], "not a readable"),
        (tmp_path / "none.safetensors", "none.safetensors"),
    ):
        assert_one_error_line(
            invoke("distill", "--teacher", teacher, "--run-dir", tmp_path / "d", "--steps", 1), fragment
        )
    assert_one_error_line(
        invoke("train-teacher", "--run-dir", tmp_path / "t", "--data", tmp_path / "nowhere", "--steps", 1), "nowhere"
    )


# ----------------------------------------------------------------------------
# eval, train-classifier


def test_eval_writes_json_table_and_grid(releases, tmp_path):
    run_dir = tmp_path / "eval"
    result = invoke(
        "eval",
        "--teacher",
        releases["teacher"],
        "--student",
        releases["generator"],
        "--teacher-nfe",
        "1,2",
        "--num-images",
        4,
        "--classifier-epochs",
        1,
        "--classifier-items",
        16,
        "--run-dir",
        run_dir,
        "--batch-size",
        4,
    )
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.stdout and "FID" in result.stdout and "student" in result.stdout
    for line in ("teacher, NFE 1: PSNR", "teacher, NFE 2: PSNR", "student, NFE 1: PSNR"):
        assert line in result.stderr, result.stderr  # a line per evaluated NFE, terminal or not
    payload = json.loads((run_dir / "eval.json").read_text())
    rows = {(r["model"], r["nfe"]): r for r in payload["results"]}
    assert set(rows) == {("corrupted", 0), ("teacher", 1), ("teacher", 2), ("student", 1)}
    for row in rows.values():
        for key in ("psnr", "ssim", "fid", "sec_per_image"):
            assert isinstance(row[key], float), (row, key)
        assert "ca" not in row  # the crops have no class labels: no CA
    assert payload["classifier"]["config"]["label_source"] == "photo" and payload["num_images"] == 4
    assert payload["classifier"]["origin"] == "trained"  # the embedded one is for 32 px crops only
    described = payload["classifier"]["description"]
    assert described.startswith("photo classifier (which of 6 photographs") and "% accuracy on" in described
    assert described in result.stdout and "task labels" not in result.stdout  # the words match the classifier
    assert payload["sampler"] == "i2sb" and payload["eta"] is None  # eta is DBIM's only
    assert payload["grid_columns"] == ["corrupted", "teacher NFE 2", "student NFE 1", "clean"]
    # FID intervals (MATH.md 7): 4 images of the classifier's features are cheap, so on by default
    assert payload["bootstrap"]["resamples"] == 1000 and "FID 95% CI" in result.stdout
    for row in rows.values():
        low, high = row["fid_ci"]
        assert low <= row["fid"] <= high, row
    diffs = {d["b"]: d for d in payload["fid_differences"]}
    assert set(diffs) == {"teacher NFE 1", "teacher NFE 2"}
    for nfe in (1, 2):
        d = diffs[f"teacher NFE {nfe}"]
        fids = rows[("student", 1)]["fid"], rows[("teacher", nfe)]["fid"]
        # two float64 routes to each FID agree to about 1e-8 of the FIDs, not of their (smaller) difference
        assert d["diff"] == pytest.approx(fids[0] - fids[1], abs=1e-6 * max(abs(f) for f in fids) + 1e-9)
        assert d["ci"][0] <= d["diff"] <= d["ci"][1]
        assert f"FID student NFE 1 - teacher NFE {nfe}: " in result.stdout
    cell = imageio.grid_zoom(SIZE, SIZE) * SIZE  # small crops enlarged to about 96 px
    band = imageio.LINE_HEIGHT + 2 * imageio.LABEL_PAD  # the column titles
    with Image.open(run_dir / "eval-grid.png") as grid:
        assert grid.size == (4 * cell + 5 * 2, band + 4 * cell + 5 * 2)
    assert (run_dir / "classifier.safetensors").is_file()
    assert load_classifier(run_dir / "classifier.safetensors").config["image_size"] == SIZE


def test_eval_on_paired_folders(releases, tmp_path):
    for side in ("clean", "corrupted"):
        (tmp_path / side).mkdir()
        for i in range(3):
            _png(tmp_path / side / f"{i}.png", seed=i + (10 if side == "corrupted" else 0))
    run_dir = tmp_path / "eval"
    result = invoke(
        "eval",
        "--teacher",
        releases["teacher"],
        "--student",
        "none",
        "--teacher-nfe",
        1,
        "--data",
        f"paired:{tmp_path / 'clean'},{tmp_path / 'corrupted'}",
        "--run-dir",
        run_dir,
        "--classifier-epochs",
        1,
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((run_dir / "eval.json").read_text())
    assert payload["num_images"] == 3 and payload["grid_columns"] == ["corrupted", "teacher NFE 1", "clean"]
    assert {r["model"] for r in payload["results"]} == {"corrupted", "teacher"}


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}")
def test_eval_fashion_mnist_reports_ca(tmp_path):
    teacher = make_teacher_release(tmp_path / "fm.safetensors", channels=1, degradation="sr4x-pool")
    result = invoke(
        "eval",
        "--teacher",
        teacher,
        "--student",
        "none",
        "--teacher-nfe",
        1,
        "--data",
        "fashion-mnist",
        "--num-images",
        4,
        "--classifier-epochs",
        1,
        "--classifier-items",
        32,
        "--run-dir",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "eval.json").read_text())
    assert payload["classifier"]["task"] == "labels" and payload["channels"] == 1
    assert all(0.0 <= row["ca"] <= 100.0 for row in payload["results"])
    assert "CA %" in result.stdout


def test_eval_caps_teacher_nfe_at_the_bridge_steps(releases):
    logs = []
    result = evaluate(
        teacher=releases["teacher"],
        student=None,
        teacher_nfe=(1, 500),
        num_images=2,
        device="cpu",
        classifier=Classifier(3, 4, SIZE, width=8, task="rotation"),
        run_dir=None,
        log=logs.append,
    )
    assert [row["nfe"] for row in result["results"]] == [0, 1, 99]
    assert any("capped at 99" in line for line in logs)


def test_eval_reuses_the_teacher_restorations_only_for_the_same_teacher_inputs_and_settings(
    releases, tmp_path, monkeypatch
):
    """The teacher rows' restorations are cached in RUN_DIR/teacher-restorations: a second eval with the
    same teacher, test images and sampling settings samples nothing and reports the same figures; any
    change (NFE, seed, teacher) samples again; a damaged file is recomputed, never trusted."""
    import ibmd_fast.evaluate as evaluate_module

    calls = []
    real = evaluate_module.timed_restore

    def counting(loaded, xT, nfe, *args, **kwargs):
        calls.append((loaded.kind, nfe))
        return real(loaded, xT, nfe, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "timed_restore", counting)
    classifier = Classifier(3, 4, SIZE, width=8, task="rotation")
    run_dir = tmp_path / "eval"

    def run(teacher=releases["teacher"], **overrides):
        kwargs = dict(
            teacher=teacher,
            student=releases["generator"],
            teacher_nfe=(1, 3),
            num_images=4,
            batch_size=4,
            device="cpu",
            classifier=classifier,
            run_dir=str(run_dir),
            bootstrap=0,
        )
        kwargs.update(overrides)
        calls.clear()
        logs = []
        result = evaluate(log=logs.append, **kwargs)
        return {(r["model"], r["nfe"]): r for r in result["results"]}, list(calls), logs

    first, sampled, _ = run()
    assert sampled == [("teacher", 1), ("teacher", 3), ("generator", None)]
    assert len(list((run_dir / "teacher-restorations").glob("*.safetensors"))) == 2
    again, sampled, logs = run()
    assert sampled == [("generator", None)]  # the student is always measured afresh
    for key in (("teacher", 1), ("teacher", 3)):
        assert again[key]["cached"] is True and "cached" not in first[key]
        for metric in ("psnr", "ssim", "fid", "sec_per_image"):
            assert again[key][metric] == first[key][metric], (key, metric)
    assert any("teacher, NFE 3: the restorations cached in" in line for line in logs)
    assert "cached" in format_table(list(again.values()))
    assert run(teacher_nfe=(2,))[1][0] == ("teacher", 2)  # another NFE
    assert run(seed=1)[1][:2] == [("teacher", 1), ("teacher", 3)]  # other noise and test crops
    other = make_teacher_release(tmp_path / "other.safetensors", seed=5)
    assert run(teacher=other)[1][:2] == [("teacher", 1), ("teacher", 3)]  # another teacher
    assert run(reuse_teacher=False)[1][:2] == [("teacher", 1), ("teacher", 3)]  # --resample-teacher
    for path in (run_dir / "teacher-restorations").glob("*.safetensors"):
        path.write_bytes(b"damaged")
    redone, sampled, logs = run()
    assert sampled[:2] == [("teacher", 1), ("teacher", 3)]
    assert any("ignoring the unreadable cached restorations" in line for line in logs)
    assert redone[("teacher", 3)]["psnr"] == first[("teacher", 3)]["psnr"]


class _LabeledPairs(torch.utils.data.Dataset):
    """Tiny labeled data: class k is a flat image of brightness k, corrupted by 4x pooling."""

    def __init__(self, n=8):
        gen = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 4
        self.x0 = (self.labels.view(-1, 1, 1, 1) / 2.0 - 0.75) + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
        self.x0 = self.x0.clamp(-1, 1)
        self.xT = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(self.x0, 4), scale_factor=4.0)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x0": self.x0[i], "xT": self.xT[i], "label": int(self.labels[i])}


def test_evaluate_reports_ca_with_labels(releases, tmp_path):
    data = _LabeledPairs()
    classifier = fit_classifier(data, task=None, epochs=1, batch_size=8)
    assert classifier.task == "labels" and classifier.num_classes == 4
    result = evaluate(
        teacher=releases["teacher"],
        student=releases["generator"],
        data=data,
        teacher_nfe=(1,),
        classifier=classifier,
        num_images=8,
        run_dir=str(tmp_path),
        device="cpu",
    )
    for row in result["results"]:
        assert 0.0 <= row["ca"] <= 100.0 and row["fid"] >= -1e-6
    assert json.loads((tmp_path / "eval.json").read_text())["results"][1]["ca"] == result["results"][1]["ca"]
    with pytest.raises(ValueError, match="trained on 1-channel"):
        evaluate(
            teacher=releases["teacher"],
            student=None,
            data=data,
            teacher_nfe=(1,),
            num_images=2,
            classifier=Classifier(1, 4, SIZE, width=8),
            run_dir=None,
            device="cpu",
        )


def test_classifier_of_the_skimage_crops_learns_their_photographs(tmp_path):
    """Unlabeled scikit-image crops get the proxy label of the photograph each comes from (item i of
    photo i % n): a 6-way task a small network learns, unlike rotation of nearly flat crops."""
    from ibmd_fast.data import DATASET_PHOTOS, make_source

    source = make_source("skimage", size=SIZE, channels=3, split="train", seed=0)
    _, photos = classifier_training_data("skimage", SIZE, 3, max_items=14, labels_from="photo")
    assert [source.photo_names[j] for j in photos.tolist()] == [source.crop_params(i)[0] for i in range(14)]
    assert sorted(set(photos.tolist())) == list(range(len(DATASET_PHOTOS)))
    assert classifier_training_data("skimage", SIZE, 3, max_items=4)[1] is None  # no labels of its own
    model = fit_classifier("skimage", SIZE, 3, task=None, epochs=1, max_items=12, batch_size=12, device="cpu")
    assert (model.task, model.num_classes, model.config["label_source"]) == ("labels", len(DATASET_PHOTOS), "photo")
    save_classifier(model, tmp_path / "clf.safetensors")
    assert load_classifier(tmp_path / "clf.safetensors").config == model.config
    unlabeled = [torch.zeros(3, SIZE, SIZE)] * 4  # a data set that does not know its photographs
    assert fit_classifier(unlabeled, task=None, epochs=1, batch_size=4).task == "rotation"
    with pytest.raises(ValueError, match="does not say which photograph"):
        fit_classifier(unlabeled, task="photo", epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="does not say which photograph"):  # class labels are no photographs
        fit_classifier(_LabeledPairs(), task="photo", epochs=1, batch_size=8)


def test_classifier_cache_is_reused_only_for_the_same_data(tmp_path, monkeypatch):
    calls = []
    real = fit_classifier

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("ibmd_fast.evaluate.fit_classifier", counting)
    kwargs = dict(task="rotation", epochs=1, max_items=4, batch_size=4, device="cpu")
    get_classifier(None, str(tmp_path), "skimage", SIZE, 3, **kwargs)
    get_classifier(None, str(tmp_path), "skimage", SIZE, 3, **kwargs)
    assert len(calls) == 1
    get_classifier(None, str(tmp_path), "skimage", SIZE, 1, **kwargs)  # other channels: a new one
    assert len(calls) == 2


def test_eval_on_the_embedded_default_uses_the_shipped_classifier(tmp_path, monkeypatch):
    """The embedded default's data (scikit-image crops, 32 px, RGB) has a classifier in the package:
    nothing is trained, and it says what it is and how accurate it was on held-out crops."""
    from ibmd_fast.paths import EMBEDDED_CLASSIFIER

    def no_training(*args, **kwargs):
        raise AssertionError("the embedded default's classifier was trained instead of loaded")

    monkeypatch.setattr("ibmd_fast.evaluate.fit_classifier", no_training)
    model = get_classifier(None, str(tmp_path), "skimage", 32, 3)
    assert (model.origin, model.path) == ("embedded", EMBEDDED_CLASSIFIER)
    assert model.config["label_source"] == "photo" and model.info["data"] == "skimage"
    assert model.info["test_accuracy"] > 0.5 and model.info["test_items"] >= 256
    assert f"{100 * model.info['test_accuracy']:.2f}% accuracy" in classifier_line(model)
    assert "embedded" in classifier_line(model)
    with pytest.raises(AssertionError, match="trained instead"):  # another task is trained (and cached)
        get_classifier(None, str(tmp_path), "skimage", 32, 3, task="rotation")


def test_train_classifier_command(tmp_path):
    out = tmp_path / "clf.safetensors"
    result = invoke(
        "train-classifier",
        "--data",
        "skimage",
        "--image-size",
        SIZE,
        "--epochs",
        1,
        "--max-items",
        8,
        "--batch-size",
        8,
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    model = load_classifier(out)
    assert model.config["label_source"] == "photo" and model.config["image_size"] == SIZE  # the default here
    assert "photo classifier (which of 6 photographs" in result.output and "held-out test images" in result.output
    assert 0.0 <= model.info["test_accuracy"] <= 1.0 and model.info["test_items"] == 512
    rotation = tmp_path / "rotation.safetensors"
    assert (
        invoke(
            "train-classifier",
            "--data",
            "skimage",
            "--task",
            "rotation",
            "--image-size",
            SIZE,
            "--epochs",
            1,
            "--max-items",
            8,
            "--batch-size",
            8,
            "--output",
            rotation,
        ).exit_code
        == 0
    )
    assert load_classifier(rotation).task == "rotation"
    assert_one_error_line(
        invoke(
            "train-classifier",
            "--data",
            "skimage",
            "--task",
            "labels",
            "--image-size",
            SIZE,
            "--max-items",
            4,
            "--output",
            out,
            "--overwrite",
        ),
        "no labels",
    )
    assert load_classifier(out).config == model.config  # the earlier file is intact


def test_format_table():
    table = format_table(
        [
            {"model": "teacher", "nfe": 10, "psnr": 25.123, "ssim": 0.7, "sec_per_image": 0.5},
            {"model": "student", "nfe": 1, "psnr": 26.0, "ssim": 0.8, "fid": 1.5, "sec_per_image": 0.01},
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["model", "NFE", "PSNR", "SSIM", "FID", "s/image"]
    assert "25.12" in lines[2] and "-" in lines[2].split() and "1.500" in lines[3]


# ----------------------------------------------------------------------------
# train-teacher, distill, export: the real modules, a few steps


def test_defaults_point_at_the_same_files():
    assert os.path.abspath(DEFAULT_TEACHER) == os.path.abspath(train_module.DEFAULT_TEACHER)
    assert DEFAULT_GENERATOR == os.path.join(DistillConfig.run_dir, "generator.safetensors")


def test_train_teacher_then_distill_then_sample(tmp_path):
    teacher_dir, distill_dir = tmp_path / "teacher", tmp_path / "distill"
    result = invoke(
        "train-teacher",
        "--run-dir",
        teacher_dir,
        "--image-size",
        SIZE,
        "--steps",
        2,
        "--batch-size",
        2,
        "--n-steps",
        100,
        "--sample-nfe",
        2,
        "--log-every",
        1,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    release = teacher_dir / "teacher.safetensors"
    assert release.is_file() and f"release: {release}" in result.stdout
    assert json.loads((teacher_dir / "config.json").read_text())["image_size"] == SIZE

    result = invoke(
        "distill",
        "--teacher",
        release,
        "--run-dir",
        distill_dir,
        "--steps",
        2,
        "--inner-steps",
        1,
        "--batch-size",
        2,
        "--eval-items",
        2,
        "--eval-teacher-nfe",
        "1,2",
        "--log-every",
        1,
    )
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].split()[:4] == ["model", "NFE", "PSNR", "SSIM"]
    assert [line.split()[:2] for line in table[2:6]] == [
        ["corrupted", "0"],
        ["teacher", "1"],
        ["teacher", "2"],
        ["student", "1"],
    ]
    assert "higher is better" in table[6] and f"files in {distill_dir}/" in table[6]  # how to read it
    generator = distill_dir / "generator.safetensors"
    assert generator.is_file()

    out = tmp_path / "samples"
    result = invoke("sample", "--model", generator, "--output", out, "--num-images", 2)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 2


def test_export_onnx(releases, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    result = invoke("export", "--onnx", "--model", releases["generator"], "--output", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out}" in result.stdout and "parity [" in result.stdout

    assert_one_error_line(
        invoke("export", "--onnx", "--model", releases["teacher"], "--output", out, "--overwrite"), "holds a teacher"
    )
    result = invoke("export", "--model", releases["generator"])
    assert result.exit_code == 2 and "--onnx" in result.stderr

    def failing(*args, **kwargs):
        raise onnx_module.OnnxParityError(
            "ONNX parity check failed: max |ORT - PyTorch| = 0.5 > 0.0001 at shape [1, 3, 18, 20]", []
        )

    monkeypatch.setattr(onnx_module, "export_onnx", failing)
    before = out.read_bytes()
    result = invoke("export", "--onnx", "--model", releases["generator"], "--output", out, "--overwrite")
    assert result.exit_code == 1
    assert_one_error_line(result, "parity check failed", "0.5 > 0.0001")
    assert out.read_bytes() == before
