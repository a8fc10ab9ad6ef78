"""What the exported ONNX graph computes (see ``ibmd_fast.onnx`` for the graph's contract).

- ``StudentProgram``: ``restore.student_chain`` with every random draw a graph input; the module
  the exporter traces. ``reference_sample``: PyTorch's answer to the same inputs (the parity check).
- ``input_names`` / ``input_channels`` / ``graph_inputs`` / ``downsampling_factor`` /
  ``size_multiple``: the graph's inputs and the sizes it takes; ``upsampling``: the srKx
  degradation whose upsampling the graph does first; ``onnx_metadata``: its ``metadata_props``.
- ``precision_copy``: the float16 (exported) and float64 (reference) copies of a generator.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Optional

import torch
from torch import nn

from ibmd_fast import __version__
from ibmd_fast.data.degradations import SuperResolution, get_degradation
from ibmd_fast.models.blocks import AttentionBlock, ResBlock
from ibmd_fast.models import unet
from ibmd_fast.models.wrappers import Generator
from ibmd_fast.restore import GivenNoise, student_grid, student_chain
from ibmd_fast.known_pixels import impose_known

__all__ = [
    "ONNX_FORMAT",
    "StudentProgram",
    "reference_sample",
    "input_names",
    "input_channels",
    "graph_inputs",
    "upsampling",
    "downsampling_factor",
    "size_multiple",
    "onnx_metadata",
    "precision_copy",
]

ONNX_FORMAT = "ibmd_fast.generator.onnx"


# ----------------------------------------------------------------------------
# What the graph computes


def downsampling_factor(generator: Generator) -> int:
    """Heights and widths the generator's U-Net takes are multiples of this (``models.unet.size_multiple``)."""
    return unet.size_multiple(generator.net.config["channel_mult"])


def upsampling(degradation: Optional[str]) -> Optional[SuperResolution]:
    """The srKx degradation whose upsampling the graph does before the chain, else None.

    Its ``upsample`` is the data's own: nearest for I2SB's ``sr4x-bicubic`` and ``sr4x-pool``,
    torch's bicubic (align_corners=False, clamped to [-1, 1]) for ``sr4x-bicubic-aa``.
    """
    name = str(degradation or "").strip().lower()
    if not name.startswith("sr"):
        return None
    found = get_degradation(name)
    return found if isinstance(found, SuperResolution) else None


def size_multiple(generator: Generator, upsample_factor: int = 1) -> int:
    """Full-size heights and widths are multiples of this: the U-Net's downsampling factor and,
    for an srKx graph that takes the low-resolution image, K (``lcm`` of the two)."""
    return math.lcm(downsampling_factor(generator), int(upsample_factor))


def input_names(z_channels: int, inpainting: bool, nfe: int, class_conditional: bool = False) -> list[str]:
    """The graph's inputs in order (see the module docstring); a class-conditional
    student's ``class_label`` [B] (int64) comes last."""
    names = ["xT"]
    if z_channels:
        names.append("z")
    if inpainting:
        names += ["mask", "hole_noise"]
    names += [f"noise_{n}" for n in range(1, nfe)]
    if class_conditional:
        names.append("class_label")
    return names


def input_channels(name: str, image_channels: int, z_channels: int) -> int:
    """The channels of an image-shaped input ``[B, C, H, W]`` (``class_label`` is ``[B]``: 0)."""
    return {"z": z_channels, "mask": 1, "class_label": 0}.get(name, image_channels)


def graph_inputs(generator: Generator, inpainting: bool, nfe: int, upsample_factor: int = 1) -> list[dict]:
    """The graph's inputs in order, as the model's ``graph_inputs`` metadata states them.

    Each is ``{"name", "kind", "dtype", "channels", "size_divisor"}``: ``kind`` says what a runner
    feeds ("image": the corrupted image as stored, "mask": 1 in the hole, "noise": standard normal
    draws, all float [B, C, H, W]; "label": a class-conditional student's class per image, int64
    [B], with ``channels`` 0), ``size_divisor`` how much smaller than the output the input's height
    and width are (K for the image of an srKx graph, which takes the low-resolution image; 1 for
    the others). A new input is one more entry in `input_names` and a kind in `_input_kind`.
    """
    names = input_names(generator.z_channels, inpainting, nfe, generator.num_classes is not None)
    return [
        {
            "name": name,
            "kind": _input_kind(name),
            "dtype": "int64" if name == "class_label" else "float",
            "channels": input_channels(name, generator.image_channels, generator.z_channels),
            "size_divisor": int(upsample_factor) if name == "xT" else 1,
        }
        for name in names
    ]


def _input_kind(name: str) -> str:
    kinds = {"xT": "image", "mask": "mask", "z": "noise", "hole_noise": "noise", "class_label": "label"}
    if name in kinds:
        return kinds[name]
    if name.startswith("noise_"):
        return "noise"
    raise ValueError(f"graph input {name!r} has no kind (image, mask, noise or label): add it to _input_kind")


class StudentProgram(nn.Module):
    """`restore.student_chain` with its random draws as inputs: the module that is exported.

    ``forward(*inputs)`` takes the tensors named by ``self.input_names`` in that order and
    returns x0: the very chain inference and the distiller run, traced. With ``upsample`` (an
    srKx `SuperResolution`, see `upsampling`) the image input is the low-resolution one and
    the graph brings it to size first with the degradation's own ``upsample``. Generator calls see
    ``t`` as a ``[1]`` tensor (``time_batch=1``: a constant the exporter folds; it broadcasts
    over the batch exactly as a ``[B]`` one). Posterior steps are ``GivenNoise``'s plain
    arithmetic (``reference.bridge_step``) with the coefficients of ``bridge.posterior``
    computed here once, as Python floats.
    """

    def __init__(
        self, generator: Generator, nfe: int = 1, inpainting: bool = False, upsample: Optional[SuperResolution] = None
    ):
        super().__init__()
        if nfe < 1:
            raise ValueError(f"nfe must be at least 1, got {nfe}")
        self.generator = generator
        self.nfe = int(nfe)
        self.inpainting = bool(inpainting)
        self.upsample = upsample
        self.input_names = input_names(
            generator.z_channels, self.inpainting, self.nfe, generator.num_classes is not None
        )
        bridge = generator.bridge
        self.grid = student_grid(bridge, self.nfe).tolist()  # t_1 < ... < t_k = T
        call_times = self.grid[::-1]  # the generator is called at t_k, ..., t_1
        self.step_coefs: list[tuple[float, float, float]] = []
        for t, s in zip(call_times[:-1], call_times[1:]):
            coef_x0, coef_xt, std = bridge.posterior(bridge.times(s, 1), bridge.times(t, 1))
            self.step_coefs.append((float(coef_xt), float(coef_x0), float(std)))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        named = dict(zip(self.input_names, inputs))
        noises = [named[f"noise_{n}"] for n in range(1, self.nfe)]
        return _chain(
            self.generator,
            named,
            self.nfe,
            GivenNoise(noises, self.step_coefs),
            self.grid,
            time_batch=1,
            upsample=self.upsample,
        )


def _chain(
    generator: Generator,
    named: dict[str, torch.Tensor],
    nfe: int,
    noise: GivenNoise,
    grid=None,
    time_batch=None,
    upsample: Optional[SuperResolution] = None,
) -> torch.Tensor:
    """`restore.student_chain` on the graph's inputs: the low-resolution image brought to size
    (srKx graphs: ``upsample.upsample``, the degradation's), the hole of xT filled with
    ``hole_noise`` (`restore.fill_hole`'s fill, MATH.md 3; what the hole held is not read),
    then the chain with the given noises."""
    xT, z, mask = named["xT"], named.get("z"), named.get("mask")
    if upsample is not None:
        xT = upsample.upsample(xT)
    if mask is not None:
        xT = impose_known(named["hole_noise"], xT, mask)
    return student_chain(
        generator, xT, z, nfe, mask=mask, noise=noise, grid=grid, time_batch=time_batch, y=named.get("class_label")
    )


@torch.no_grad()
def reference_sample(
    generator: Generator, inputs: dict[str, torch.Tensor], nfe: int, upsample: Optional[SuperResolution] = None
) -> torch.Tensor:
    """PyTorch's answer to the ONNX model's inputs: `restore.student_chain` with the given z and noises
    (the low-resolution xT upsampled first by ``upsample``, as the graph does).

    ``inputs`` are named as the graph's (`input_names`); their dtype is the computation's
    (float64 for a float64 copy of the generator, see `precision_copy`). Unlike the exported
    program, the posterior coefficients come from the bridge at run time and the times have
    the batch's size.
    """
    return _chain(generator, inputs, nfe, GivenNoise([inputs[f"noise_{n}"] for n in range(1, nfe)]), upsample=upsample)


class _Float32(nn.Module):
    """Runs the wrapped module in float32 and returns the input dtype (attention in a float16 net)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


def precision_copy(generator: Generator, dtype: torch.dtype) -> Generator:
    """A copy of the generator whose U-Net computes in ``dtype`` (float16 or float64).

    float16: convolutions and activations in half; GroupNorm (statistics, affine), the
    time-embedding MLPs and attention stay float32; the network takes and returns float32, so
    the x0 parametrization and everything around it stay float32. float64: everything in
    float64 but the sinusoidal time features (float32 in every variant), the reference for
    float16 tolerances; the inputs must be float64 too.
    """
    if dtype not in (torch.float16, torch.float64):
        raise ValueError(f"dtype must be torch.float16 or torch.float64, got {dtype}")
    gen = copy.deepcopy(generator).eval()
    net = gen.net.to(dtype)
    if dtype == torch.float64:
        # timestep_embedding makes float32 sinusoids; the MLP takes them in its own dtype
        net.time_embed.register_forward_pre_hook(lambda module, args: (args[0].to(dtype),) + args[1:])
        for module in net.modules():
            if isinstance(module, nn.GroupNorm):
                module.__class__ = nn.GroupNorm  # GroupNorm32 would compute in float32
        return gen
    net.time_embed.float()
    for module in net.modules():
        if isinstance(module, nn.GroupNorm):
            module.float()  # GroupNorm32 computes in float32 and returns the input dtype
        elif isinstance(module, ResBlock):
            module.emb_layers.float()  # its output is cast to the activations' dtype
        elif isinstance(module, AttentionBlock):
            module.attention = _Float32(module.attention)  # q k^T and softmax in float32
    net.register_forward_pre_hook(lambda module, args: (args[0].to(torch.float16),) + args[1:])
    net.register_forward_hook(lambda module, args, output: output.float())
    return gen


# ----------------------------------------------------------------------------
# Metadata


def onnx_metadata(
    generator: Generator, config: dict[str, Any], nfe: int, inpainting: bool, precision: str
) -> dict[str, str]:
    """The model's ``metadata_props``: plain strings for names, JSON for everything else."""
    upsample = upsampling(config.get("degradation"))
    factor = upsample.factor if upsample is not None else 1
    inputs = graph_inputs(generator, inpainting, nfe, factor)
    names = [i["name"] for i in inputs]
    channels = {i["name"]: i["channels"] for i in inputs if i["kind"] != "label"}
    noise_inputs = [{"name": i["name"], "channels": i["channels"]} for i in inputs if i["kind"] == "noise"]
    upsample_meta = {"factor": factor, "mode": upsample.upsample_mode} if upsample is not None else None
    classes = {} if generator.num_classes is None else {"num_classes": json.dumps(int(generator.num_classes))}
    return {
        "format": ONNX_FORMAT,
        "version": __version__,
        "bridge": json.dumps(generator.bridge.config()),
        "nfe": json.dumps(int(nfe)),
        "student_times": json.dumps(student_grid(generator.bridge, nfe).tolist()[::-1]),
        "normalization": str(config.get("normalization", "[-1,1]")),
        "image_channels": json.dumps(int(generator.image_channels)),
        "z_channels": json.dumps(int(generator.z_channels)),
        "inpainting": json.dumps(bool(inpainting)),
        "conditional": json.dumps(bool(generator.conditional)),
        "downsampling_factor": json.dumps(downsampling_factor(generator)),
        "size_multiple": json.dumps(size_multiple(generator, factor)),
        "upsample": json.dumps(upsample_meta),
        "image_size": json.dumps(config.get("image_size")),
        "degradation": str(config.get("degradation", "")),
        "precision": precision,
        "inputs": json.dumps(names),
        "graph_inputs": json.dumps(inputs),
        "input_channels": json.dumps(channels),
        "noise_inputs": json.dumps(noise_inputs),
        "outputs": json.dumps(["x0"]),
        **classes,
    }
