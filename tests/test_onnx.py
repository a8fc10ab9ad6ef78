"""ONNX export (ibmd_fast.onnx) and the torch-free runner (export/run_onnx.py).

Tiny 16-px generators with random (perturbed) weights: a one-step I2SB student (float32 and
float16), a two-step VP student, a two-step inpainting student and a one-step sr4x-bicubic-aa
student whose graph upsamples the low-resolution image itself. Each export runs its own
parity check at two shapes unlike the example (in batch, height and width); the tests also hold
the numbers to the tolerances, check the graph, and run the runner in a subprocess where torch
and ibmd_fast cannot be imported.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import onnxruntime as ort  # noqa: E402  (a dependency of the package)

import ibmd_fast
import ibmd_fast.onnx as ionnx
import ibmd_fast.onnx_program as onnx_program
from ibmd_fast.bridges import I2SBBridge, VPBridge
from ibmd_fast.models import Generator, Teacher, build_unet
from ibmd_fast.onnx import FP16_ERROR_RATIO, FP16_SLACK, FP32_TOLERANCE, OnnxParityError, export_onnx
from ibmd_fast.release import GENERATOR_FORMAT, TEACHER_FORMAT, ReleaseError, load_generator, save_release

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "export" / "run_onnx.py"
SIZE = 16


# tiny convolutions on shared cores: one thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _make_release(path, bridge, nfe=1, inpainting=False, seed=0, degradation="jpeg-10"):
    """A tiny generator release with random weights (every weight perturbed: the z convolution is not zero)."""
    torch.manual_seed(seed)
    net = build_unet("tiny", SIZE, 3, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = Teacher(net, bridge)
    generator = Generator(teacher, multistep=nfe > 1)
    with torch.no_grad():
        for p in generator.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert generator.net.input_blocks[0][0].weight[:, 3:].abs().sum() > 0
    config = {
        **generator.config(),
        "nfe": nfe,
        "degradation": "inpaint-center" if inpainting else degradation,
        "image_size": SIZE,
        "channels": 3,
        "inpainting": inpainting,
    }
    save_release(str(path), generator.net, GENERATOR_FORMAT, config)
    return str(path), teacher


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def one_step(folder):
    release, teacher = _make_release(folder / "one.safetensors", I2SBBridge())
    report = export_onnx(release, str(folder / "one" / "model.onnx"), progress=False)
    return release, report, teacher


@pytest.fixture(scope="module")
def two_step_vp(folder):
    release, _ = _make_release(folder / "vp2.safetensors", VPBridge(), nfe=2, seed=1)
    return release, export_onnx(release, str(folder / "vp2.onnx"), progress=False)


@pytest.fixture(scope="module")
def inpainting(folder):
    release, _ = _make_release(folder / "inpaint.safetensors", I2SBBridge(beta_max=1.0), nfe=2, inpainting=True, seed=2)
    return release, export_onnx(release, str(folder / "inpaint.onnx"), progress=False)


@pytest.fixture(scope="module")
def super_resolution(folder):
    release, _ = _make_release(folder / "sr.safetensors", I2SBBridge(), seed=3, degradation="sr4x-bicubic-aa")
    return release, export_onnx(release, str(folder / "sr" / "model.onnx"), progress=False)


def _check_report(report, inputs):
    assert report["exporter"] == "dynamo" and report["fallback_reason"] is None
    assert report["inputs"] == inputs and report["outputs"] == ["x0"] and report["opset"] >= 17
    example = report["example_shape"]
    assert len(report["parity"]) == 2
    for res in report["parity"]:
        batch, _, height, width = res["shape"]
        assert batch != example[0] and height != example[2] and width != example[3]
        assert res["ok"]
    return example


def _check_graph(path, inputs, divisors=None):
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "only standard ONNX operators"
    assert not model.functions
    assert all(op.version >= 17 for op in model.opset_import if op.domain in ("", "ai.onnx"))
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == ["x0"]
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        suffix = f"/{divisors[value.name]}" if divisors and divisors.get(value.name, 1) > 1 else ""
        assert [dims[i].dim_param for i in (0, 2, 3)] == ["batch", "height" + suffix, "width" + suffix]
    return model, {p.key: p.value for p in model.metadata_props}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------
# Export


def test_one_step_export(one_step):
    release, report, _ = one_step
    _check_report(report, ["xT", "z"])
    assert all(r["max_abs_err"] <= FP32_TOLERANCE for r in report["parity"])
    _, meta = _check_graph(report["onnx"], ["xT", "z"])
    assert meta["format"] == "ibmd_fast.generator.onnx" and meta["version"] == ibmd_fast.__version__
    assert json.loads(meta["bridge"]) == I2SBBridge().config()
    assert json.loads(meta["nfe"]) == 1 and meta["normalization"] == "[-1,1]"
    assert json.loads(meta["image_channels"]) == 3 and json.loads(meta["z_channels"]) == 3
    assert json.loads(meta["inpainting"]) is False and json.loads(meta["downsampling_factor"]) == 2
    assert json.loads(meta["image_size"]) == SIZE and meta["degradation"] == "jpeg-10"
    assert meta["precision"] == "float32"
    assert json.loads(meta["noise_inputs"]) == [{"name": "z", "channels": 3}]
    assert json.loads(meta["graph_inputs"]) == [
        {"name": "xT", "kind": "image", "dtype": "float", "channels": 3, "size_divisor": 1},
        {"name": "z", "kind": "noise", "dtype": "float", "channels": 3, "size_divisor": 1},
    ]
    assert json.loads(meta["upsample"]) is None and json.loads(meta["size_multiple"]) == 2

    # The plain generator call G(xT, z), at yet another shape.
    generator, _ = load_generator(release)
    gen = torch.Generator().manual_seed(5)
    xT, z = torch.rand(2, 3, 12, 28, generator=gen) * 2 - 1, torch.randn(2, 3, 12, 28, generator=gen)
    with torch.no_grad():
        expected = generator(xT, z).numpy()
    out = _session(report["onnx"]).run(None, {"xT": xT.numpy(), "z": z.numpy()})[0]
    assert np.abs(out - expected).max() <= FP32_TOLERANCE


def test_two_step_vp_export(two_step_vp):
    release, report = two_step_vp
    _check_report(report, ["xT", "z", "noise_1"])
    assert all(r["max_abs_err"] <= FP32_TOLERANCE for r in report["parity"])
    _, meta = _check_graph(report["onnx"], ["xT", "z", "noise_1"])
    assert json.loads(meta["nfe"]) == 2 and json.loads(meta["bridge"])["type"] == "vp"

    # The k-step loop written out by hand (MATH.md 5): G at T, posterior step to t_1, G at t_1.
    generator, _ = load_generator(release)
    bridge = generator.bridge
    t_1, T = (float(t) for t in bridge.sampling_grid(2)[1:])
    gen = torch.Generator().manual_seed(6)
    xT = torch.rand(3, 3, 8, 12, generator=gen) * 2 - 1
    z, noise = torch.randn(3, 3, 8, 12, generator=gen), torch.randn(3, 3, 8, 12, generator=gen)
    times = lambda v: torch.full((3,), v, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        x0 = generator(xT, z, t=times(T), x_t=xT)
        coef_x0, coef_xt, std = (float(c[0]) for c in bridge.posterior(times(t_1), times(T)))
        x = coef_xt * xT + coef_x0 * x0 + std * noise
        expected = generator(xT, z, t=times(t_1), x_t=x).numpy()
    out = _session(report["onnx"]).run(None, {"xT": xT.numpy(), "z": z.numpy(), "noise_1": noise.numpy()})[0]
    assert np.abs(out - expected).max() <= FP32_TOLERANCE


def test_inpainting_export(inpainting):
    release, report = inpainting
    names = ["xT", "z", "mask", "hole_noise", "noise_1"]
    _check_report(report, names)
    assert all(r["max_abs_err"] <= FP32_TOLERANCE for r in report["parity"])
    _, meta = _check_graph(report["onnx"], names)
    assert json.loads(meta["inpainting"]) is True and meta["degradation"] == "inpaint-center"
    assert [n["name"] for n in json.loads(meta["noise_inputs"])] == ["z", "hole_noise", "noise_1"]
    # known pixels are copied from xT, exactly
    gen = torch.Generator().manual_seed(7)
    feed = {n: torch.randn(2, 1 if n == "mask" else 3, 16, 20, generator=gen).numpy() for n in names}
    feed["mask"] = np.zeros((2, 1, 16, 20), np.float32)
    feed["mask"][..., 4:12, 5:15] = 1
    out = _session(report["onnx"]).run(None, feed)[0]
    known = np.broadcast_to(feed["mask"] == 0, out.shape)
    assert np.array_equal(out[known], feed["xT"][known])
    assert not np.allclose(out[~known], feed["xT"][~known])
    # the graph fills the hole itself: what xT holds there is never read
    feed["xT"] = np.where(feed["mask"] == 1, np.float32(7.0), feed["xT"])
    assert np.array_equal(_session(report["onnx"]).run(None, feed)[0], out)
    assert [i["kind"] for i in json.loads(meta["graph_inputs"])] == ["image", "noise", "mask", "noise", "noise"]


def _cubic_resize(model):
    """The Resize node of the torch-bicubic upsampling (the U-Net's own upsampling is nearest)."""
    found = [
        n for n in model.graph.node if n.op_type == "Resize" and onnx.helper.get_node_attr_value(n, "mode") == b"cubic"
    ]
    assert len(found) == 1
    return found[0]


def test_super_resolution_export_upsamples_inside(super_resolution, folder, blocked_env):
    """An sr4x-bicubic-aa graph takes the low-resolution image and upsamples it as the degradation
    does: ONNX Resize, cubic, a = -0.75, half-pixel coordinates, equal to torch's bicubic to 1e-6
    everywhere, borders included; the runner writes 4x larger images that match PyTorch."""
    from ibmd_fast.data.degradations import SuperResolution

    release, report = super_resolution
    _check_report(report, ["xT", "z"])
    assert all(r["max_abs_err"] <= FP32_TOLERANCE for r in report["parity"])
    assert all(r["shape"][2] % 4 == 0 and r["shape"][3] % 4 == 0 for r in report["parity"])
    model, meta = _check_graph(report["onnx"], ["xT", "z"], {"xT": 4})
    assert json.loads(meta["graph_inputs"])[0] == {
        "name": "xT",
        "kind": "image",
        "dtype": "float",
        "channels": 3,
        "size_divisor": 4,
    }
    assert json.loads(meta["upsample"]) == {"factor": 4, "mode": "bicubic"}
    assert json.loads(meta["size_multiple"]) == 4
    resize = _cubic_resize(model)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs["cubic_coeff_a"] == pytest.approx(-0.75) and attrs["coordinate_transformation_mode"] == b"half_pixel"
    assert attrs.get("exclude_outside", 0) == 0 and attrs.get("antialias", 0) == 0

    # The Resize output itself against F.interpolate, on an image with +-1 stripes at its borders.
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(resize.output[0]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(9)
    low = torch.rand(2, 3, 5, 7, generator=gen) * 2 - 1
    low[..., 0, :], low[..., -1, :], low[..., :, 0] = 1.0, -1.0, 1.0
    z = torch.randn(2, 3, 20, 28, generator=gen)
    upsampled = session.run([resize.output[0]], {"xT": low.numpy(), "z": z.numpy()})[0]
    expected = torch.nn.functional.interpolate(low, scale_factor=4, mode="bicubic", align_corners=False).numpy()
    assert upsampled.shape == expected.shape == (2, 3, 20, 28)
    error = np.abs(upsampled - expected)
    assert (
        error.max() <= 1e-6
        and max(error[..., :2, :].max(), error[..., -2:, :].max(), error[..., :, :2].max(), error[..., :, -2:].max())
        <= 1e-6
    )
    assert np.abs(expected).max() > 1.0  # bicubic overshoots at the stripes: the clamp after it matters

    # The runner: low-resolution images in, 4x larger restorations out, as PyTorch makes them.
    images = folder / "low-res"
    sizes = {"a.png": (4, 4), "b.png": (5, 6)}
    _write_images(images, sizes, seed=8)
    out = folder / "upsampled"
    result = _run(["--model", report["onnx"], "--input", images, "--output", out, "--seed", 2, "--quiet"], blocked_env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    generator, _ = load_generator(release)
    rng = np.random.default_rng(2)
    expected = {}
    for name in sorted(sizes):
        height, width = (4 * n for n in sizes[name])
        xT = SuperResolution(4, "bicubic-aa").upsample(_as_tensor(images / name)[None])
        z = torch.from_numpy(rng.standard_normal((3, height, width), dtype=np.float32))[None]
        with torch.no_grad():
            expected[name] = _uint8(generator(xT, z)[0])
    _compare_outputs(out, expected)


def test_nearest_upsampling_of_i2sb_super_resolution(folder):
    """I2SB's sr4x-bicubic brings the low-resolution image to size with nearest (as its data does):
    so does the graph (the parity check holds it to `SuperResolution.upsample`)."""
    release, _ = _make_release(folder / "sr-i2sb.safetensors", I2SBBridge(), seed=4, degradation="sr4x-bicubic")
    report = export_onnx(release, str(folder / "sr-i2sb.onnx"), exporter="torchscript", progress=False)
    assert all(r["ok"] and r["max_abs_err"] <= FP32_TOLERANCE for r in report["parity"])
    model, meta = _check_graph(report["onnx"], ["xT", "z"], {"xT": 4})
    assert json.loads(meta["upsample"]) == {"factor": 4, "mode": "nearest"}
    assert not [
        n
        for n in model.graph.node
        if n.op_type == "Resize" and onnx.helper.get_node_attr_value(n, "mode") != b"nearest"
    ]


def test_fp16_export(one_step, folder):
    release, _, _ = one_step
    report = export_onnx(release, str(folder / "fp16.onnx"), fp16=True, progress=False)
    _check_report(report, ["xT", "z"])
    assert report["precision"] == "float16"
    for res in report["parity"]:
        # ORT fp16 vs PyTorch float64 within 3x PyTorch fp16's own error (+ one fp16 ulp at 1)
        assert res["max_abs_err"] <= FP16_ERROR_RATIO * res["torch_fp16_max_abs_err"] + FP16_SLACK
        assert res["torch_fp16_max_abs_err"] > 1e-5  # the network really computes in float16
    model, meta = _check_graph(report["onnx"], ["xT", "z"])
    assert meta["precision"] == "float16"
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dtypes = {i.data_type for i in model.graph.initializer if i.name in conv_weights}
    assert dtypes == {onnx.TensorProto.FLOAT16}


def test_torchscript_fallback(one_step, folder, monkeypatch, caplog):
    release, _, _ = one_step

    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable in this test")

    monkeypatch.setattr(ionnx, "_export_dynamo", broken)
    with caplog.at_level("WARNING", logger="ibmd_fast.onnx"):
        report = export_onnx(release, str(folder / "ts.onnx"), progress=False)
    assert report["exporter"] == "torchscript"
    assert "dynamo exporter unavailable" in report["fallback_reason"]
    assert any("falling back to the TorchScript exporter" in r.getMessage() for r in caplog.records)
    assert all(r["ok"] and r["max_abs_err"] <= FP32_TOLERANCE for r in report["parity"])
    _check_graph(report["onnx"], ["xT", "z"])
    with pytest.raises(ionnx.OnnxExportError, match="dynamo ONNX exporter failed"):
        export_onnx(release, str(folder / "ts2.onnx"), exporter="dynamo", progress=False)


def test_parity_failure_raises_and_writes_nothing(one_step, folder, monkeypatch):
    release, _, _ = one_step
    monkeypatch.setattr(ionnx, "FP32_TOLERANCE", 0.0)
    out = folder / "fails" / "model.onnx"
    with pytest.raises(OnnxParityError, match=r"max \|ORT - PyTorch\| = .* > 0 at shape \[1, 3, 18, 20\]") as info:
        export_onnx(release, str(out), exporter="torchscript", progress=False)
    assert len(info.value.results) == 2
    assert not out.exists() and os.listdir(out.parent) == []


def test_bad_release_inputs(one_step, folder):
    _, _, teacher = one_step
    with pytest.raises(ReleaseError, match="not found"):
        export_onnx(str(folder / "missing.safetensors"), str(folder / "x.onnx"), progress=False)
    teacher_release = folder / "teacher.safetensors"
    save_release(
        str(teacher_release),
        teacher.net,
        TEACHER_FORMAT,
        {"unet": teacher.net.config, "conditional": False, "bridge": teacher.bridge.config()},
    )
    with pytest.raises(ReleaseError, match="teacher, not a generator"):
        export_onnx(str(teacher_release), str(folder / "x.onnx"), progress=False)
    junk = folder / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ReleaseError, match="not a readable safetensors file"):
        export_onnx(str(junk), str(folder / "x.onnx"), progress=False)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(str(junk), str(folder / "x.onnx"), opset=13, progress=False)
    assert not (folder / "x.onnx").exists()


# ----------------------------------------------------------------------------
# The torch-free runner


def _runner_module():
    spec = importlib.util.spec_from_file_location("run_onnx", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """An environment in which `import torch` and `import ibmd_fast` fail."""
    block = tmp_path_factory.mktemp("block")
    for name in ("torch", "ibmd_fast"):
        (block / name).mkdir()
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(block)
    return env


def _run(args, env):
    return subprocess.run(
        [sys.executable, str(RUNNER), *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )


def _write_images(root, sizes, seed):
    rng = np.random.default_rng(seed)
    for name, (height, width) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)


def _as_tensor(path):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1) / 127.5 - 1.0)


def _uint8(x):
    return np.clip(np.round((x.numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _compare_outputs(out_dir, expected):
    diffs = []
    for name, pixels in expected.items():
        written = np.asarray(Image.open(out_dir / Path(name).with_suffix(".png")))
        assert written.shape == pixels.shape
        diffs.append(np.abs(written.astype(np.int16) - pixels.astype(np.int16)).ravel())
    diffs = np.concatenate(diffs)
    assert diffs.max() <= 1 and (diffs > 0).mean() < 0.01, (diffs.max(), (diffs > 0).mean())


def test_runner_matches_pytorch_without_torch(one_step, folder, blocked_env):
    release, report, _ = one_step
    images = folder / "images"
    sizes = {"b.png": (16, 16), "a.png": (16, 16), "c.png": (16, 16), "sub/d.png": (20, 24)}
    _write_images(images, sizes, seed=3)
    out = folder / "restored"
    result = _run(
        [
            "--model",
            report["onnx"],
            "--input",
            images,
            "--output",
            out,
            "--batch",
            2,
            "--seed",
            11,
            "--provider",
            "cpu",
        ],
        blocked_env,
    )
    assert result.returncode == 0, result.stderr

    # z as the runner documents it: one default_rng(seed), image by image in sorted order.
    generator, _ = load_generator(release)
    rng = np.random.default_rng(11)
    expected = {}
    for name in sorted(sizes):
        xT = _as_tensor(images / name)[None]
        z = torch.from_numpy(rng.standard_normal((3, *sizes[name]), dtype=np.float32))[None]
        with torch.no_grad():
            expected[name] = _uint8(generator(xT, z)[0])
    _compare_outputs(out, expected)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_external_data_moves_with_the_model(one_step, folder, blocked_env, monkeypatch, exporter):
    """Over protobuf's 2 GiB (forced here by a limit of 0 bytes) the export is model.onnx plus ONE
    external data file beside it, whichever exporter ran; the two files moved to another folder
    load and run in the torch-free runner, and the model alone says which file is missing."""
    import shutil

    release, report_one, _ = one_step
    monkeypatch.setattr(ionnx, "PROTOBUF_LIMIT", 0)
    out = folder / f"external-{exporter}" / "model.onnx"
    report = export_onnx(release, str(out), exporter=exporter, progress=False)
    assert report["exporter"] == exporter and all(r["ok"] for r in report["parity"])
    assert sorted(os.listdir(out.parent)) == ["model.onnx", "model.onnx.data"]
    assert report["external_data"] == str(out.parent / "model.onnx.data")
    model = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # relative: the pair can move
    assert out.stat().st_size < (out.parent / "model.onnx.data").stat().st_size

    moved = folder / f"moved-{exporter}"
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.move(str(out.parent / name), str(moved / name))
    images = folder / f"external-images-{exporter}"
    _write_images(images, {"a.png": (16, 16)}, seed=6)
    runs = {}
    for name, path in (("external", moved / "model.onnx"), ("single", report_one["onnx"])):
        result = _run(
            [
                "--model",
                path,
                "--input",
                images,
                "--output",
                folder / f"ext-out-{exporter}-{name}",
                "--seed",
                3,
                "--provider",
                "cpu",
                "--quiet",
            ],
            blocked_env,
        )
        assert result.returncode == 0, result.stderr
        runs[name] = np.asarray(Image.open(folder / f"ext-out-{exporter}-{name}" / "a.png"))
    assert np.array_equal(runs["external"], runs["single"])  # the same weights, read from the data file

    os.remove(moved / "model.onnx.data")
    result = _run(
        [
            "--model",
            moved / "model.onnx",
            "--input",
            images,
            "--output",
            folder / f"ext-none-{exporter}",
            "--provider",
            "cpu",
        ],
        blocked_env,
    )
    assert result.returncode == 1
    assert "model.onnx.data, which must sit beside it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_runner_inpainting_multistep(inpainting, folder, blocked_env):
    release, report = inpainting
    images = folder / "holes"
    sizes = {"x.png": (16, 16), "y.png": (16, 16), "z.png": (24, 16)}
    _write_images(images, sizes, seed=4)
    out = folder / "filled"
    result = _run(["--model", report["onnx"], "--input", images, "--output", out, "--seed", 5, "--quiet"], blocked_env)
    assert result.returncode == 0 and result.stderr == "", result.stderr

    runner = _runner_module()
    generator, _ = load_generator(release)
    noise_inputs = [
        {"name": "z", "channels": 3},
        {"name": "hole_noise", "channels": 3},
        {"name": "noise_1", "channels": 3},
    ]
    rng = np.random.default_rng(5)
    expected = {}
    for name in sorted(sizes):
        height, width = sizes[name]
        mask = torch.from_numpy(runner.center_mask(height, width))[None]
        inputs = {"xT": _as_tensor(images / name)[None], "mask": mask}  # the runner leaves the hole as it is
        inputs.update(
            {k: torch.from_numpy(v)[None] for k, v in runner.draw_noises(rng, noise_inputs, height, width).items()}
        )
        expected[name] = _uint8(onnx_program.reference_sample(generator, inputs, nfe=2)[0])
    _compare_outputs(out, expected)


def test_runner_bad_inputs(one_step, folder, blocked_env):
    _, report, _ = one_step
    model = report["onnx"]
    bad = folder / "bad"
    bad.mkdir()
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "plain",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.save(plain, bad / "plain.onnx")
    Image.fromarray(np.zeros((15, 16, 3), np.uint8)).save(bad / "odd.png")
    np.save(bad / "four.npy", np.zeros((4, 16, 16), np.float32))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad / "ok.png")
    cases = [
        (["--model", bad / "plain.onnx", "--input", bad / "ok.png"], "is not an ibmd-fast generator"),
        (["--model", model, "--input", bad / "odd.png"], "multiples of 2"),
        (["--model", model, "--input", bad / "four.npy"], "has 4 channels, the model takes 3"),
        (["--model", model, "--input", bad / "missing"], "input not found"),
    ]
    for args, message in cases:
        result = _run([*args, "--output", bad / "out"], blocked_env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert lines[0].startswith("run_onnx: error:") and message in lines[0], lines[0]
    assert not (bad / "out").exists()
