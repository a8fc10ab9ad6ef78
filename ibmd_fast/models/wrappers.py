"""Teacher, generator and fake model: a U-Net plus a bridge's x0 parametrization.

- `Teacher(net, bridge, conditional)`: `predict_x0(x_t, t, xT)` (MATH.md 2a, 2b).
- `Generator(teacher, z_channels)`: the IBMD student G(xT, z [, x_t, t])
  (MATH.md 5), a copy of the teacher whose first convolution takes the noise z
  as extra ZERO-initialized input channels, so at initialization it is the
  teacher's one-step prediction at t = T for every z.
- `make_fake_model(teacher)`: the fake bridge model phi, a trainable copy.

The bridge object (ibmd_fast.bridges) is used through `config()["type"]`,
`T`, `times(value, batch, device)`, `net_time(t)`, and `std_fwd` (I2SB) or `precond(t)` (VP, VE; DDBM's
preconditioning with the bridge's own `sigma_data` and `cov_xy`).

Class-conditional networks (`net.num_classes`, e.g. DBIM's ImageNet inpainting
teacher) take labels `y` [B] (int64, through the U-Net's label embedding); without `y`
the model's `class_label` (one label for every image, set from the release) is used.
The generator and the fake model are copies of the teacher's network, so they keep its
`num_classes` and label embedding and take `y` the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .unet import UNet

__all__ = ["BridgeModel", "Teacher", "Generator", "make_fake_model"]


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficients -> [B, 1, ..., 1] on `like`'s device and dtype."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


def _bridge_type(bridge) -> str:
    kind = bridge.config()["type"]
    if kind not in ("i2sb", "vp", "ve"):
        raise ValueError(f"unsupported bridge type {kind!r}; expected 'i2sb', 'vp' or 've'")
    return kind


class BridgeModel(nn.Module):
    """A bridge model: network + x0 parametrization. `forward = predict_x0`.

    I2SB (eps-like output, MATH.md 2a): `x0_hat = x_t - std_fwd[t] * net(x_t [, xT], net_time(t))`.
    VP and VE (DDBM preconditioning, MATH.md 2b):
    `x0_hat = c_skip x_t + c_out * net(c_in x_t [, xT], c_noise)`.
    Conditional bridges concatenate `xT` to the network input on channels.
    """

    def __init__(self, net: nn.Module, bridge, conditional: bool = False):
        super().__init__()
        self.net = net
        self.bridge = bridge
        self.conditional = bool(conditional)
        self.bridge_type = _bridge_type(bridge)
        self.class_label: int | None = None  # the label used when a class-conditional net gets no y
        if self.bridge_type == "i2sb":
            # non-persistent: follows .to(device) without entering the state dict
            std_fwd = torch.as_tensor(bridge.std_fwd, dtype=torch.float64).detach().cpu()
            self.register_buffer("std_fwd", std_fwd, persistent=False)

    @property
    def T(self):
        """The corrupted end of the time axis: a step index (I2SB) or a float (VP)."""
        return self.bridge.T

    @property
    def image_channels(self) -> int:
        return int(self.net.out_channels)

    def full_time(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """t = T for every sample, as the bridge takes times (``Bridge.times``)."""
        return self.bridge.times(self.T, batch, device)

    def predict_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        xT: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0_hat(x_t, t [, xT]). `extra`: channels appended last to the network input (the generator's z);
        `y`: class labels [B] of a class-conditional network (default: `class_label`)."""
        if self.conditional and xT is None:
            raise ValueError("a conditional bridge model needs xT")
        y = self._labels(y, x_t)
        if self.bridge_type == "i2sb":
            inp = x_t
            c_noise = self.bridge.net_time(t)
        else:
            c_skip, c_out, c_in, c_noise = self.bridge.precond(t)
            inp = _per_sample(c_in, x_t) * x_t
        parts = [inp]
        if self.conditional:
            parts.append(xT.to(inp.dtype))
        if extra is not None:
            parts.append(extra.to(inp.dtype))
        inp = torch.cat(parts, dim=1) if len(parts) > 1 else inp
        out = self.net(inp, c_noise.to(x_t.device)) if y is None else self.net(inp, c_noise.to(x_t.device), y)
        if self.bridge_type == "i2sb":
            std = self.std_fwd.to(x_t.device)[t.to(x_t.device)]
            return x_t - _per_sample(std, out) * out
        return _per_sample(c_skip, out) * x_t + _per_sample(c_out, out) * out

    def _labels(self, y: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor | None:
        num_classes = getattr(self.net, "num_classes", None)
        if num_classes is None:
            if y is not None:
                raise ValueError("class labels given to a network that is not class-conditional")
            return None
        if y is None:
            if self.class_label is None:
                raise ValueError(
                    f"this model is class-conditional ({num_classes} classes) and needs a class label per image "
                    "(labelled data, e.g. classes:DIR; a teacher import takes one default with --label N)"
                )
            y = torch.full((x_t.shape[0],), int(self.class_label), dtype=torch.long)
        y = torch.as_tensor(y, dtype=torch.long, device=x_t.device).reshape(-1)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return y  # an exported graph takes the labels as an input: no data-dependent check in it
        if y.shape[0] != x_t.shape[0] or bool(((y < 0) | (y >= num_classes)).any()):
            raise ValueError(f"need one class label in [0, {num_classes}) per image, got {y.tolist()[:8]}")
        return y

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional network, else None."""
        return getattr(self.net, "num_classes", None)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, xT: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.predict_x0(x_t, t, xT, y=y)


class Teacher(BridgeModel):
    """The (frozen, by the caller) teacher x0_hat*(x_t, t [, xT]); also the type of the fake model."""


class Generator(BridgeModel):
    """The IBMD student G(xT, z) (one-step) or G(x_t, z, t) (multi-step).

    Built from a teacher: its network is deep-copied and the first
    convolution (`net.input_blocks[0][0]`) gets `z_channels` extra input
    channels (appended after x_t [and xT]) whose weights start at zero.
    """

    def __init__(self, teacher: BridgeModel, z_channels: int | None = None, multistep: bool = False):
        net = copy.deepcopy(teacher.net)
        image_channels = int(net.out_channels)
        z_channels = image_channels if z_channels is None else int(z_channels)
        if z_channels < 0:
            raise ValueError(f"z_channels must be >= 0, got {z_channels}")
        _widen_first_conv(net, z_channels)
        net.requires_grad_(True)  # the teacher is usually frozen; its copy is trained
        super().__init__(net, teacher.bridge, teacher.conditional)
        self.z_channels = z_channels
        self.multistep = bool(multistep)

    @classmethod
    def from_config(cls, config: dict[str, Any], bridge) -> "Generator":
        """Rebuild an (untrained) generator from `generator.config()`, to load saved weights into."""
        net = UNet(**config["unet"])
        gen = cls.__new__(cls)
        BridgeModel.__init__(gen, net, bridge, config["conditional"])
        gen.z_channels = int(config["z_channels"])
        gen.multistep = bool(config["multistep"])
        return gen

    def arch_config(self) -> dict[str, Any]:
        """UNet keyword arguments of the generator's network (in_channels includes z)."""
        return copy.deepcopy(self.net.config)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the generator with `Generator.from_config` (JSON-serializable)."""
        return {
            "unet": self.arch_config(),
            "image_channels": self.image_channels,
            "z_channels": self.z_channels,
            "conditional": self.conditional,
            "multistep": self.multistep,
            "num_classes": self.num_classes,  # class-conditional: takes labels y (also in "unet")
            "bridge": self.bridge.config(),
        }

    def forward(
        self,
        xT: torch.Tensor,
        z: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        x_t: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0 = G(xT, z [, y]) at t = T (x_t = xT), or G(x_t, z, t [, y]) when `t` is given;
        `y`: the class labels [B] of a class-conditional generator, as its teacher takes them.

        The network's prediction over the whole image: inpainting (known pixels
        from xT, the hole of xT filled with noise beforehand) is the chain's job,
        `known_pixels.impose_known` in `restore.student_chain`. With
        `z_channels == 0`, `z` is ignored.
        """
        if t is None:
            t = self.full_time(xT.shape[0], xT.device)
            x_t = xT
        elif x_t is None:
            raise ValueError("a multi-step generator call with t needs x_t")
        if self.z_channels and z is None:
            raise ValueError(f"the generator takes noise z with {self.z_channels} channels")
        return self.predict_x0(x_t, t, xT, extra=z if self.z_channels else None, y=y)


def _widen_first_conv(net: nn.Module, extra_channels: int) -> None:
    """Append `extra_channels` zero-weight input channels to `net.input_blocks[0][0]`."""
    if extra_channels == 0:
        return
    conv = net.input_blocks[0][0]
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups != 1:
        raise TypeError("the first layer of the network must be an ungrouped convolution")
    weight = conv.weight
    new_conv = type(conv)(
        conv.in_channels + extra_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new_conv.weight.zero_()
        new_conv.weight[:, : conv.in_channels].copy_(weight)
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias)
    net.input_blocks[0][0] = new_conv
    if hasattr(net, "in_channels"):
        net.in_channels = new_conv.in_channels
    if isinstance(getattr(net, "config", None), dict):
        net.config["in_channels"] = new_conv.in_channels


def make_fake_model(teacher: Teacher) -> Teacher:
    """The fake bridge model phi: a trainable copy of the teacher (sharing its bridge object)."""
    fake = copy.deepcopy(teacher, memo={id(teacher.bridge): teacher.bridge})
    fake.requires_grad_(True)
    fake.train()
    return fake
