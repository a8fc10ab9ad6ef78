"""ADM U-Net, state-dict compatible with OpenAI guided-diffusion's `UNetModel`.

The module tree (and so every `state_dict` key and shape, and the parameter
order that `torch_ema` shadow lists rely on) is that of guided-diffusion's
`guided_diffusion/unet.py`, so released ADM, I2SB and DDBM weights load as they
are. Differences, none of which changes the math:

- attention runs through `F.scaled_dot_product_attention` (flash / memory
  efficient kernels on GPU, exports to ONNX, compiles); the head split of the
  legacy (`QKVAttentionLegacy`) and new (`QKVAttention`) orders is kept;
- `use_fp16` does not convert weights: they stay float32 and the caller runs
  the model under `torch.autocast`; GroupNorm still computes in float32;
- `use_checkpoint` uses `torch.utils.checkpoint` (non-reentrant) whenever autograd records
  (`UNet.set_activation_checkpointing` switches it at run time).

Also: named configurations (`CONFIGS`, `build_unet`), a checked state-dict
loader that explains mismatches, and a checkpoint-file reader that never
unpickles arbitrary objects.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "UNet",
    "CONFIGS",
    "build_unet",
    "timestep_embedding",
    "attention_rates",
    "count_parameters",
    "load_state_dict_checked",
    "load_checkpoint_file",
    "extract_state_dict",
]


# ----------------------------------------------------------------------------
# Building blocks (names follow guided_diffusion/nn.py and unet.py)

def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dims: {dims} (expected 1, 2 or 3)")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dims: {dims} (expected 1, 2 or 3)")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (output convolutions start as identity maps of the skip path)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [N] -> [N, dim].

    As guided-diffusion: frequencies exp(-log(max_period) * k / half), cosines
    first then sines, a zero column appended when `dim` is odd.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 convolution (`conv`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:  # 3D: upsample the inner two dimensions only
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or average pooling (`op`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (optionally up/downsampling).

    Children are registered in guided-diffusion's order: in_layers, h_upd,
    x_upd, emb_layers, out_layers, skip_connection.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():  # also a frozen net differentiated through
            return torch.utils.checkpoint.checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # resample between the activation and the convolution, as ADM does
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.dim() - emb_out.dim()))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention on qkv [N, H*3*C, T]: split heads first, then q, k, v (ADM's default order)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, self.n_heads, 3 * ch, length).split(ch, dim=2)
        return _sdpa_heads(q, k, v, bs, length)


class QKVAttention(nn.Module):
    """Attention on qkv [N, 3*H*C, T]: split q, k, v first, then heads (the "new" order)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs, self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _sdpa_heads(q, k, v, bs, length)


def _sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bs: int, length: int) -> torch.Tensor:
    """q, k, v: [N, H, C, T] -> [N, H*C, T]; softmax(q^T k / sqrt(C)) v as in ADM."""
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention channels {channels} are not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():  # also a frozen net differentiated through
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


# ----------------------------------------------------------------------------
# The U-Net

def attention_rates(image_size: int, resolutions: str | Iterable[int]) -> list[int]:
    """guided-diffusion's script convention: "32,16,8" (resolutions) -> downsampling rates.

    `attention_rates(256, "32,16,8") == [8, 16, 32]`.
    """
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r.strip()]
    return sorted(image_size // int(r) for r in resolutions)


class UNet(nn.Module):
    """guided-diffusion `UNetModel`: same keyword arguments, state_dict and forward.

    `attention_resolutions` holds downsampling RATES (attention where the
    feature map is image_size / rate); use `attention_rates` to convert
    guided-diffusion's "32,16,8" script strings. `config` records the keyword
    arguments (JSON-serializable) so a checkpoint can rebuild the network.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Iterable[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if isinstance(attention_resolutions, str):
            raise TypeError(
                "attention_resolutions must be downsampling rates (ints); "
                "convert a guided-diffusion string with attention_rates(image_size, '32,16,8')"
            )
        attention_resolutions = sorted({int(r) for r in attention_resolutions})
        channel_mult = tuple(channel_mult)
        self.config: dict[str, Any] = dict(
            image_size=int(image_size),
            in_channels=int(in_channels),
            model_channels=int(model_channels),
            out_channels=int(out_channels),
            num_res_blocks=int(num_res_blocks),
            attention_resolutions=list(attention_resolutions),
            dropout=float(dropout),
            channel_mult=[m if isinstance(m, int) else float(m) for m in channel_mult],
            conv_resample=bool(conv_resample),
            dims=int(dims),
            num_classes=None if num_classes is None else int(num_classes),
            use_checkpoint=bool(use_checkpoint),
            use_fp16=bool(use_fp16),
            num_heads=int(num_heads),
            num_head_channels=int(num_head_channels),
            num_heads_upsample=int(num_heads_upsample),
            use_scale_shift_norm=bool(use_scale_shift_norm),
            resblock_updown=bool(resblock_updown),
            use_new_attention_order=bool(use_new_attention_order),
        )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16  # weights stay float32; run under torch.autocast for half precision
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        def res_block(ch_in: int, ch_out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, up=up, down=down,
            )

        def attn_block(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, num_heads=heads, num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # encoder
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res_block(ch, ch, down=True)
                        if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                )
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch), attn_block(ch, num_heads), res_block(ch))

        # decoder: each block consumes one skip connection
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def set_activation_checkpointing(self, enabled: bool) -> "UNet":
        """Recompute every ResBlock's and AttentionBlock's activations in backward instead of keeping
        them (``torch.utils.checkpoint``): less memory, about one more forward of time. The weights
        and ``config`` (what a release records) are unchanged."""
        for module in self.modules():
            if isinstance(module, (ResBlock, AttentionBlock)):
                module.use_checkpoint = bool(enabled)
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, in_channels, *spatial], timesteps [N] (float or int), y [N] labels -> [N, out_channels, *spatial]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)

        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------
# Named configurations

CONFIGS: dict[str, dict[str, Any]] = {
    # unit tests: ~0.6M parameters, exercises every block type of adm256
    "tiny": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
    ),
    # benchmarks and the bundled teacher at 32-64 px: ~11M parameters
    "small": dict(
        model_channels=64,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(4, 8),
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
    ),
    # I2SB's 256px backbone = guided-diffusion 256x256 unconditional ADM
    # (attention "32,16,8" -> rates 8,16,32); out_channels 6 with learn_sigma, 3 in I2SB
    "adm256": dict(
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(8, 16, 32),
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        dropout=0.0,
    ),
}


def build_unet(name: str, image_size: int, in_channels: int, out_channels: int, **overrides) -> UNet:
    """Build a named configuration (`CONFIGS`), with keyword overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown U-Net config {name!r}; choose from {sorted(CONFIGS)}")
    kwargs = dict(CONFIGS[name])
    kwargs.update(overrides)
    return UNet(image_size=image_size, in_channels=in_channels, out_channels=out_channels, **kwargs)


# ----------------------------------------------------------------------------
# Loading weights

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def _strip_prefixes(state_dict: Mapping[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    sd = dict(state_dict)
    prefixes = _WRAPPER_PREFIXES + extra
    changed = True
    while changed and sd:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(
    model: nn.Module, checkpoint: Mapping[str, Any], prefer: str = "ema"
) -> dict[str, torch.Tensor]:
    """Find the network weights inside a checkpoint.

    Accepts a plain state dict, or a dict holding one under "ema" / "net" /
    "model" / "state_dict" (`prefer` first). The I2SB form, where "ema" is a
    `torch_ema` state ({"shadow_params": [...]}, a list in `model.parameters()`
    order), is laid over the "net" state dict by position. Wrapper prefixes
    (`module.`, `_orig_mod.`, I2SB's `diffusion_model.`) are stripped.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint is a {type(checkpoint).__name__}, expected a dict of tensors")
    if _is_tensor_dict(checkpoint):
        return _strip_prefixes(checkpoint, ("diffusion_model.",))

    if prefer not in ("ema", "net"):
        raise ValueError(f"prefer must be 'ema' or 'net', got {prefer!r}")
    order = [prefer] + [k for k in ("ema", "net", "model", "state_dict") if k != prefer]
    net_sd = None
    for key in ("net", "model", "state_dict"):
        if _is_tensor_dict(checkpoint.get(key)):
            net_sd = _strip_prefixes(checkpoint[key], ("diffusion_model.",))
            break
    for key in order:
        entry = checkpoint.get(key)
        if _is_tensor_dict(entry):
            return _strip_prefixes(entry, ("diffusion_model.",))
        if key == "ema" and isinstance(entry, Mapping) and isinstance(entry.get("shadow_params"), (list, tuple)):
            return _shadow_params_to_state_dict(model, entry["shadow_params"], net_sd)
    raise ValueError(
        f"no state dict found in checkpoint with keys {sorted(map(str, checkpoint))[:10]}; "
        "expected a dict of tensors or one under 'ema', 'net', 'model' or 'state_dict'"
    )


def _shadow_params_to_state_dict(
    model: nn.Module, shadow: list, net_sd: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    if len(shadow) != len(names):
        raise ValueError(
            f"EMA checkpoint holds {len(shadow)} shadow parameters, the model has {len(names)} parameters"
        )
    sd = dict(net_sd) if net_sd is not None else dict(model.state_dict())
    sd.update(zip(names, shadow))
    return sd


def _format_keys(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, Any], prefer: str = "ema", strict: bool = True
) -> nn.Module:
    """Load weights into `model`, explaining any mismatch in one ValueError.

    `state_dict` may be a plain state dict or a checkpoint dict (see
    `extract_state_dict`; `prefer` picks "ema" or "net" when both are there).
    With `strict`, missing and unexpected keys are errors; mis-shaped keys
    always are. Returns `model`.
    """
    sd = extract_state_dict(model, state_dict, prefer=prefer)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if misshaped or (strict and (missing or unexpected)):
        lines = [f"state dict does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys: {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_format_keys(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys: {_format_keys(misshaped, 3)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects.

    `.safetensors` files go through safetensors; anything else through
    `torch.load(weights_only=True)` (tensors, dicts, lists, numbers only).
    Raises FileNotFoundError / ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors checkpoint {path}: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {path} (corrupt, or holds objects other than tensors and "
            f"plain containers, which are refused for safety): {type(e).__name__}: {e}"
        ) from e
