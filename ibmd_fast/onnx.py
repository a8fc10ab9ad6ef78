"""ONNX export of a generator release, checked against PyTorch (used by `ibmd-fast export --onnx`).

`export_onnx(release, "model.onnx")` writes ONE graph that is the whole student
sampler, `restore.student_chain` (MATH.md 5) with every random draw made an
input, so the model is deterministic and the deployment side
(`export/run_onnx.py`) needs nothing but onnxruntime and numpy.

Graph inputs, in this order (float32, ``[B, ., H, W]``; B, H, W dynamic, H and W
multiples of the U-Net's downsampling factor ``2**(len(channel_mult) - 1)``, and of K for
srKx models):

    xT          [B, C, H, W]   the corrupted image in [-1, 1] as stored; for an srKx model the
                [B, C, H/K, W/K] low-resolution image, which the graph upsamples first with the
                degradation's own ``SuperResolution.upsample`` (nearest for I2SB's sr4x-bicubic
                and sr4x-pool; torch's bicubic, align_corners=False, clamped, for sr4x-bicubic-aa:
                ONNX ``Resize`` mode cubic, cubic_coeff_a -0.75, half-pixel coordinates)
    z           [B, Cz, H, W]  the generator's noise (absent when z_channels == 0)
    mask        [B, 1, H, W]   inpainting students only: 1 in the hole, 0 on known pixels
    hole_noise  [B, C, H, W]   inpainting students only: the Gaussian noise that fills the hole of
                               xT before sampling (`restore.fill_hole`, MATH.md 3)
    noise_1 ... noise_{k-1}    multi-step students (nfe = k > 1): noise_n, [B, C, H, W], is the fresh
                               noise of the posterior step after the n-th generator call
    class_label [B] int64      class-conditional students only (``num_classes`` in the metadata): the
                               class of each image, in [0, num_classes), as the teacher took it

Output ``x0`` [B, C, H, W] float32: the last generator prediction, known pixels
copied from xT for inpainting students (as `student_chain` returns; what xT holds in the
hole is never read). The metadata's ``graph_inputs`` lists the inputs with what each is
(`onnx_program.graph_inputs`), so a runner feeds them without knowing the model's kind. The
posterior steps between calls are plain arithmetic (``reference.bridge_step``)
with their coefficients computed by the bridge in float64 and baked in as
float32 constants, the network's time inputs (t, preconditioning) are constants
the exporter folds, and no ``torch.ops.ibmd.*`` op enters the graph: the model
holds standard ONNX operators only (domain "" = ai.onnx), opset >= 17.

Model metadata (``metadata_props``; strings, JSON where not plain text): see
`onnx_metadata`, and export/README.md for what each key means. What the graph computes
(`StudentProgram`, `reference_sample`, `precision_copy`, the input names and metadata) is
`ibmd_fast.onnx_program`; this module exports it and checks it.

Float16 (``fp16=True``): the U-Net's convolutions, activations and skip paths
run in float16; GroupNorm (statistics and affine), the timestep-embedding MLPs
and attention (scores, softmax) stay float32, as do the inputs, the outputs,
the x0 parametrization and the posterior steps. Checked against a float64
PyTorch run: ``err(ORT fp16) <= 3 * err(PyTorch fp16) + 2**-10`` (max abs
errors; 2**-10 is one float16 ulp at 1.0), the low-precision rule of
flash-attention's tests. PyTorch fp16 is the same float16 module run eagerly.

Large models (``model.ByteSize()`` over protobuf's 2 GiB, e.g. an ADM-256 student in float32):
the weights go to ONE external data file beside the model, ``model.onnx.data`` (its location in
the model is that bare name, relative), so the two files are moved together and onnxruntime,
given the path of ``model.onnx``, reads the weights from its folder. Smaller models are one file.

Parity (``check=True``, the default): onnxruntime (CPUExecutionProvider) against
PyTorch on fresh random inputs at two shapes that differ from the export's
example in batch, height and width; float32 models must agree within 1e-4
(max abs), or `OnnxParityError` is raised with the numbers and nothing is
written. The PyTorch side is `restore.student_chain` itself (with the given
noises in place of its seeded ones), so the check also holds the exported loop
to the sampler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ibmd_fast import __version__
from ibmd_fast.models.wrappers import Generator
from ibmd_fast.onnx_program import (
    StudentProgram,
    downsampling_factor,
    graph_inputs,
    onnx_metadata,
    precision_copy,
    reference_sample,
    size_multiple,
    upsampling,
)
from ibmd_fast.release import ReleaseError, load_generator

__all__ = [
    "FP32_TOLERANCE",
    "FP16_ERROR_RATIO",
    "FP16_SLACK",
    "OnnxExportError",
    "OnnxParityError",
    "export_onnx",
    "external_data_name",
]

MIN_OPSET = 17
FP32_TOLERANCE = 1e-4  # max |ORT - PyTorch| for float32 models
FP16_ERROR_RATIO = 3.0  # err(ORT fp16 vs fp64) <= ratio * err(PyTorch fp16 vs fp64) + slack
FP16_SLACK = 2.0**-10  # one float16 ulp at 1.0 (images are in [-1, 1])
STANDARD_DOMAINS = ("", "ai.onnx")
PROTOBUF_LIMIT = 2**31 - 1  # one serialized protobuf message (an ONNX file without external data)
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data
EXAMPLE_BATCH = 2

log = logging.getLogger(__name__)


class OnnxExportError(RuntimeError):
    """The export itself failed (both exporters, or a graph that is not plain ONNX)."""


def max_opset(exporter: str = "auto") -> int:
    """The newest opset the installed onnx knows (the TorchScript exporter stops earlier)."""
    try:
        import onnx
    except ImportError:
        raise OnnxExportError(
            "ibmd-fast export needs the onnx package, which is not installed: pip install onnx onnxscript"
        ) from None

    top = int(onnx.defs.onnx_opset_version())
    if exporter == "torchscript":
        from torch.onnx import _constants

        top = min(top, int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", top)))
    return top


def check_opset(opset: int, exporter: str = "auto") -> None:
    """``ValueError`` naming the supported range, before anything is exported."""
    top = max_opset(exporter)
    if not MIN_OPSET <= int(opset) <= top:
        raise ValueError(f"--opset {opset} is outside what the exporter supports ({MIN_OPSET}..{top})")


def require_runtime() -> None:
    """The parity check needs onnxruntime: say what to install when it is missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise OnnxExportError(
            "the parity check needs onnxruntime, which is not installed: pip install onnxruntime "
            "(onnxruntime-gpu on CUDA machines), or pass --no-check"
        ) from None


class OnnxParityError(OnnxExportError):
    """onnxruntime and PyTorch disagree beyond the tolerance; the message has the numbers."""

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results


# ----------------------------------------------------------------------------
# Export


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[ibmd-fast export] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' chatter (missing torchvision ops, pytree deprecations, axis renames) is noise here."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for pattern in (
            r".*LeafSpec.*",
            r".*axis name.*",
            r".*TorchScript-based ONNX export.*",
            r".*torch\.onnx\.dynamo_export.*",
            r".*legacy TorchScript.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*feature will be removed.*", category=DeprecationWarning)
        try:
            yield
        finally:
            logger.setLevel(level)


def _example_inputs(
    inputs: list[dict],
    batch: int,
    height: int,
    width: int,
    seed: int,
    dtype=torch.float32,
    num_classes: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Random inputs as the ONNX model takes them (``inputs``: `graph_inputs`; height and width of
    the output): the image uniform in [-1, 1], a centered square hole, normals, class labels
    uniform in [0, num_classes) (int64)."""
    rng = torch.Generator().manual_seed(seed)
    out = {}
    labels = {}
    for item in inputs:
        name, divisor = item["name"], item["size_divisor"]
        shape = (batch, item["channels"], height // divisor, width // divisor)
        if item["kind"] == "label":
            labels[name] = torch.randint(0, int(num_classes), (batch,), generator=rng, dtype=torch.long)
        elif item["kind"] == "image":
            out[name] = torch.rand(shape, generator=rng, dtype=torch.float64) * 2 - 1
        elif item["kind"] == "mask":
            mask = torch.zeros(shape, dtype=torch.float64)
            mask[..., height // 4 : height // 4 + max(1, height // 2), width // 4 : width // 4 + max(1, width // 2)] = 1
            out[name] = mask
        else:
            out[name] = torch.randn(shape, generator=rng, dtype=torch.float64)
    return {**{k: v.to(dtype) for k, v in out.items()}, **labels}


def _as_float64(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float inputs in float64 (the reference's dtype); class labels stay int64."""
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def _export_dynamo(
    program: StudentProgram, args: tuple, inputs: list[dict], multiple: int, opset: int, path: str, progress: bool
) -> None:
    """Dynamic batch, height and width: full sizes ``multiple * d``, an input ``size_divisor`` times
    smaller ``multiple / size_divisor * d`` (derived from the same ``d``, so the two stay tied)."""
    batch = torch.export.Dim("batch", min=1)
    h, w = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)

    def spec(divisor: int) -> dict:
        step = multiple // divisor
        return {0: batch, 2: step * h if step > 1 else h, 3: step * w if step > 1 else w}

    names = [i["name"] for i in inputs]
    onnx_program = torch.onnx.export(
        program,
        args,
        dynamo=True,
        opset_version=opset,
        input_names=names,
        output_names=["x0"],
        dynamic_shapes={
            "inputs": tuple({0: batch} if i["kind"] == "label" else spec(i["size_divisor"]) for i in inputs)
        },
        optimize=True,
        verbose=progress,
    )
    onnx_program.save(path)


def _export_torchscript(program: StudentProgram, args: tuple, inputs: list[dict], opset: int, path: str) -> None:
    axes = {i["name"]: {0: "batch"} if i["kind"] == "label" else _dim_names(i["size_divisor"]) for i in inputs}
    torch.onnx.export(
        program,
        args,
        path,
        dynamo=False,
        opset_version=opset,
        input_names=list(axes),
        output_names=["x0"],
        dynamic_axes={**axes, "x0": _dim_names(1)},
        do_constant_folding=True,
    )


def _dim_names(divisor: int) -> dict[int, str]:
    """The names of an input's dynamic axes: ``height``/``width`` at full size, else ``height/K``."""
    suffix = f"/{divisor}" if divisor > 1 else ""
    return {0: "batch", 2: "height" + suffix, 3: "width" + suffix}


def _nonstandard_nodes(model) -> list[str]:
    """``domain::op`` of every node (graph, subgraphs, functions) outside the standard ONNX domain."""
    import onnx

    found = []

    def visit(nodes):
        for node in nodes:
            if node.domain not in STANDARD_DOMAINS:
                found.append(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return sorted(set(found))


def _finish_model(path: str, metadata: dict[str, str]) -> None:
    """Name the dynamic axes (`_dim_names`), inline local functions, check the ops, add metadata."""
    import json

    import onnx

    model = onnx.load(path, load_external_data=False)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    bad = _nonstandard_nodes(model)
    if bad:
        raise OnnxExportError(f"the exported graph uses non-standard operators: {', '.join(bad)}")
    rename = {}
    described = {i["name"]: i for i in json.loads(metadata["graph_inputs"])}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        item = described.get(value.name, {"kind": "image", "size_divisor": 1})  # the output x0: full size
        names = {0: "batch"} if item["kind"] == "label" else _dim_names(item["size_divisor"])
        rename.update({dims[i].dim_param: new for i, new in names.items() if i < len(dims) and dims[i].dim_param})
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "ibmd_fast", __version__
    if _external_locations(model) or model.ByteSize() > PROTOBUF_LIMIT:
        _save_with_external_data(model, path)
    else:
        onnx.save(model, path)


def _external_locations(model) -> list[str]:
    """The files (relative to the model) that hold ``model``'s external initializer data."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return sorted({ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)})


def _save_with_external_data(model, path: str) -> None:
    """``model.onnx`` + ONE external data file ``model.onnx.data`` beside it (relative location).

    A model over protobuf's 2 GiB limit (ADM-256's 552.8M float32 weights are 2.06 GiB) cannot be
    one file. The exporters spread its weights differently (the dynamo exporter into one
    ``<name>.data``, the TorchScript one into a file per tensor), so the weights are read back and
    written again as one file: the model and its data move together as two files, and onnxruntime
    finds the data from the model's folder.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    folder = os.path.dirname(path)
    old = _external_locations(model)
    load_external_data_for_model(model, folder)
    for name in old:  # onnx appends to an existing data file: start from none
        os.remove(os.path.join(folder, name))
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=external_data_name(path),
        size_threshold=1024,
    )


def external_data_name(path: str) -> str:
    """The name of the external data file of a model exported to ``path``: ``<model file name>.data``."""
    return os.path.basename(path) + EXTERNAL_DATA_SUFFIX


def _ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _parity_shapes(height: int, width: int, factor: int) -> list[tuple[int, int, int]]:
    # factor: `size_multiple`, so the low-resolution image of an srKx model has whole sizes too
    """Two (batch, H, W) unlike the example (batch 2, height, width) in batch, height and width."""
    smaller_h = height - factor if height > factor else height + 3 * factor
    return [(1, height + factor, width + 2 * factor), (3, smaller_h, width + factor)]


def _check_parity(
    session,
    generator: Generator,
    generator16: Optional[Generator],
    graph_inputs: list[dict],
    shapes,
    nfe: int,
    progress: bool,
    upsample=None,
) -> list[dict]:
    results, failures = [], []
    generator64 = precision_copy(generator, torch.float64) if generator16 is not None else None
    for i, (batch, height, width) in enumerate(shapes):
        inputs = _example_inputs(graph_inputs, batch, height, width, seed=1000 + i, num_classes=generator.num_classes)
        feed = {k: v.numpy() for k, v in inputs.items()}
        ort_out = session.run(["x0"], feed)[0].astype(np.float64)
        shape = [batch, generator.image_channels, height, width]
        if generator16 is None:
            torch_out = reference_sample(generator, inputs, nfe, upsample).double().numpy()
            err = float(np.abs(ort_out - torch_out).max())
            ok = err <= FP32_TOLERANCE
            res = {"shape": shape, "max_abs_err": err, "tolerance": FP32_TOLERANCE, "ok": ok}
            _say(progress, f"parity at {shape}: max |ORT - PyTorch| = {err:.3g} (tolerance {FP32_TOLERANCE:g})")
        else:
            ref64 = reference_sample(generator64, _as_float64(inputs), nfe, upsample).numpy()
            torch16 = reference_sample(generator16, inputs, nfe, upsample).double().numpy()
            err_ort = float(np.abs(ort_out - ref64).max())
            err_torch = float(np.abs(torch16 - ref64).max())
            bound = FP16_ERROR_RATIO * err_torch + FP16_SLACK
            ok = err_ort <= bound
            res = {
                "shape": shape,
                "max_abs_err": err_ort,
                "torch_fp16_max_abs_err": err_torch,
                "ort_vs_torch_fp16_max_abs_err": float(np.abs(ort_out - torch16).max()),
                "tolerance": bound,
                "ok": ok,
            }
            _say(
                progress,
                f"fp16 parity at {shape}: max |ORT - fp64| = {err_ort:.3g}, "
                f"max |PyTorch fp16 - fp64| = {err_torch:.3g}, bound {bound:.3g}",
            )
        results.append(res)
        if not ok:
            failures.append(res)
    if failures:
        what = "|ORT fp16 - PyTorch fp64|" if generator16 is not None else "|ORT - PyTorch|"
        detail = "; ".join(
            f"max {what} = {r['max_abs_err']:.3g} > {r['tolerance']:.3g} at shape {r['shape']}" for r in failures
        )
        raise OnnxParityError(f"ONNX parity check failed: {detail}", results)
    return results


def export_onnx(
    release_path: str,
    out_path: str,
    fp16: bool = False,
    opset: int = 18,
    example_size: Union[int, tuple[int, int], None] = None,
    check: bool = True,
    progress: bool = True,
    *,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Export a generator release to ``out_path`` (model.onnx) and check it; return a report.

    - ``fp16``: a float16 model with float32 inputs and outputs (module docstring).
    - ``opset``: ONNX opset, at least 17.
    - ``example_size``: H (or (H, W)) of the example the exporter traces (the output's size);
      default the release's image_size. Must be a multiple of the downsampling factor (and of K
      for an srKx model, whose graph takes the low-resolution image). The batch of the example is 2.
    - ``check``: run onnxruntime against PyTorch at two other shapes (module docstring);
      `OnnxParityError` when they disagree, and then nothing is written.
    - ``exporter``: "auto" (torch.export-based "dynamo" exporter, falling back to the TorchScript
      one with a logged reason), "dynamo" or "torchscript".

    Raises `ReleaseError` for a missing or non-generator file, `OnnxExportError` when the
    export fails, `OnnxParityError` when the check fails. The report holds the paths, the
    exporter used (and the fallback reason), the opset, the inputs and the parity numbers.
    """
    started = time.perf_counter()
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    check_opset(opset, exporter)
    if check:
        require_runtime()
    try:
        generator, config = load_generator(release_path)
    except ReleaseError as exc:
        raise ReleaseError(
            f"{exc} (export --onnx takes a generator release, as written by `ibmd-fast distill`)"
        ) from None
    nfe = int(config.get("nfe", 1))
    inpainting = bool(config.get("inpainting", str(config.get("degradation", "")).startswith("inpaint")))
    upsample = upsampling(config.get("degradation"))
    factor = size_multiple(generator, upsample.factor if upsample is not None else 1)
    if example_size is None:
        size = int(config.get("image_size") or generator.net.config["image_size"])
        size = -(-size // factor) * factor  # round up to a multiple of the factor
        example_size = (size, size)
    elif isinstance(example_size, int):
        example_size = (example_size, example_size)
    height, width = (int(s) for s in example_size)
    if height % factor or width % factor or min(height, width) < factor:
        raise ValueError(
            f"example_size {height}x{width} must be positive multiples of {factor} (the U-Net's "
            f"downsampling factor{', and the super-resolution factor' if upsample else ''})"
        )

    precision = "float16" if fp16 else "float32"
    generator16 = precision_copy(generator, torch.float16) if fp16 else None
    program = StudentProgram(
        generator16 if fp16 else generator, nfe=nfe, inpainting=inpainting, upsample=upsample
    ).eval()
    inputs = graph_inputs(generator, inpainting, nfe, upsample.factor if upsample is not None else 1)
    names = [i["name"] for i in inputs]
    example = _example_inputs(inputs, EXAMPLE_BATCH, height, width, seed=0, num_classes=generator.num_classes)
    args = tuple(example[n] for n in names)
    metadata = onnx_metadata(generator, config, nfe, inpainting, precision)

    out_path = os.path.abspath(out_path)
    out_dir = os.path.dirname(out_path)
    for parent in [out_dir, *map(str, Path(out_dir).parents)]:
        if os.path.exists(parent):
            if not os.path.isdir(parent):
                raise ValueError(f"--output {out_path}: {parent} is a file, not a folder")
            break
    os.makedirs(out_dir, exist_ok=True)
    # Exported and checked in a scratch folder beside the target; moved into place only when it passes.
    scratch = tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir)
    try:
        tmp_path = os.path.join(scratch, os.path.basename(out_path))
        used, fallback_reason = _export(
            program, args, inputs, factor, int(opset), tmp_path, exporter, metadata, progress
        )
        _say(progress, f"exported with the {used} exporter, opset {opset}, {precision}; onnx.checker passed")

        parity: list[dict] = []
        if check:
            session = _ort_session(tmp_path)
            parity = _check_parity(
                session, generator, generator16, inputs, _parity_shapes(height, width, factor), nfe, progress, upsample
            )
        files = []
        for name in sorted(os.listdir(scratch), key=lambda n: n == os.path.basename(out_path)):
            os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))  # the model last
            files.append(os.path.join(out_dir, name))
        data_path = os.path.join(out_dir, external_data_name(out_path))
        if data_path not in files and os.path.isfile(data_path):
            os.remove(data_path)  # an earlier export's weights: this model.onnx does not read them
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    return {
        "onnx": out_path,
        "files": files,
        "external_data": data_path if data_path in files else None,
        "release": os.path.abspath(release_path),
        "exporter": used,
        "fallback_reason": fallback_reason,
        "opset": int(opset),
        "precision": precision,
        "nfe": nfe,
        "inpainting": inpainting,
        "inputs": names,
        "outputs": ["x0"],
        "downsampling_factor": downsampling_factor(generator),
        "size_multiple": factor,
        "example_shape": [EXAMPLE_BATCH, generator.image_channels, height, width],
        "parity": parity,
        "metadata": metadata,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _export(program, args, inputs, factor, opset, path, exporter, metadata, progress) -> tuple[str, Optional[str]]:
    """Run the chosen exporter, finish the model (`_finish_model`) and pass it through onnx.checker.

    Returns (exporter used, why the dynamo exporter was given up, or None). Under "auto" a
    failure of the dynamo exporter, or a dynamo model the checker rejects (e.g. its opset-17
    conversion), falls back to the TorchScript exporter with a logged reason.
    """
    import onnx

    def attempt(run):
        with torch.no_grad(), _quiet_exporter():
            run()
        _finish_model(path, metadata)
        onnx.checker.check_model(path, full_check=True)

    errors = []
    if exporter in ("auto", "dynamo"):
        _say(progress, "exporting with torch.onnx.export(dynamo=True) ...")
        try:
            attempt(lambda: _export_dynamo(program, args, inputs, factor, opset, path, progress))
            return "dynamo", None
        except Exception as exc:  # the exporters raise many types; all mean "this exporter failed"
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            if exporter == "dynamo":
                raise OnnxExportError(f"the dynamo ONNX exporter failed: {reason}") from exc
            errors.append(reason)
            log.warning("the dynamo ONNX exporter failed (%s); falling back to the TorchScript exporter", reason)
            folder = os.path.dirname(path)
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
    _say(progress, "exporting with torch.onnx.export(dynamo=False) (TorchScript) ...")
    try:
        attempt(lambda: _export_torchscript(program, args, inputs, opset, path))
        return "torchscript", errors[0] if errors else None
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
        tried = ("dynamo", "torchscript")[-len(errors) :]
        raise OnnxExportError("ONNX export failed: " + "; ".join(f"{n}: {e}" for n, e in zip(tried, errors))) from exc


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the dynamo exporter colours its messages
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return line[:limit]
