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

This file assembles the network and holds the named configurations (`CONFIGS`,
`build_unet`); the layers are in models/blocks.py, and reading checkpoints (a checked
state-dict loader, a reader that never unpickles) in models/checkpoints.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .blocks import (
    conv_nd,
    zero_module,
    normalization,
    timestep_embedding,
    TimestepEmbedSequential,
    Upsample,
    Downsample,
    ResBlock,
    AttentionBlock,
)

__all__ = [
    "UNet",
    "CONFIGS",
    "build_unet",
    "size_multiple",
    "check_image_size",
    "attention_rates",
    "count_parameters",
]


# ----------------------------------------------------------------------------
# The U-Net


def size_multiple(channel_mult: Iterable) -> int:
    """Heights and widths the U-Net takes are multiples of this: 2 per downsampling, ``2**(len(channel_mult) - 1)``."""
    return 2 ** max(0, len(tuple(channel_mult)) - 1)


def check_image_size(channel_mult: Iterable, height: int, width: int, what: str, network: str = "the U-Net") -> None:
    """One-line ValueError when ``network``, a U-Net with ``channel_mult``, cannot take a ``height x
    width`` image (``what``, e.g. "--image-size 30" or "input a.png"); it names the nearest sizes it can take."""
    m, height, width = size_multiple(channel_mult), int(height), int(width)
    if height % m == 0 and width % m == 0 and height >= m and width >= m:
        return
    lower = (max(m, width // m * m), max(m, height // m * m))
    upper = (-(-width // m) * m, -(-height // m) * m)
    if height == width:
        size, near = f"{width}x{height}", " or ".join(dict.fromkeys(str(s[0]) for s in (lower, upper)))
    else:
        size, near = (
            f"{width}x{height} (width x height)",
            " or ".join(dict.fromkeys(f"{w}x{h}" for w, h in (lower, upper))),
        )
    raise ValueError(
        f"{what} is {size}, but {network} halves the image {len(tuple(channel_mult)) - 1} time(s) and "
        f"takes widths and heights that are multiples of {m} (nearest: {near})"
    )


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
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                up=up,
                down=down,
            )

        def attn_block(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
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
        # float32 embedding; a float64 network (the gradient tests) takes it in float64
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
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
