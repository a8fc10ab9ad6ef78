"""The U-Net's attention: SDPA on strided views (the math path on CPU) against contiguous operands.

``ibmd_fast.models.blocks._sdpa_heads`` hands ``F.scaled_dot_product_attention`` contiguous [N, H, T, C]
operands. With the transposed views of [N, H, C, T] it used before, CPU SDPA falls back to its math
path (bmm, softmax and -inf checks); with contiguous ones it takes the fused flash kernel. This script
measures both side by side in one process: the bare attention at the `tiny` U-Net's 16x16 (256 tokens,
heads of 16 channels) and the whole `tiny` U-Net at 32x32, forward (inference, batch 64) and
forward+backward (training, batch 16), and writes ``benchmarks/results/attention-<machine>.json``.

    python benchmarks/bench_attention.py                 # about a minute on 2 CPU cores
    python benchmarks/bench_attention.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ibmd_fast.models.blocks as blocks  # noqa: E402
from _common import RESULTS, environment, machine_name, resolve_device, write_json  # noqa: E402
from ibmd_fast.timing import Stopwatch  # noqa: E402
from ibmd_fast.models import build_unet  # noqa: E402


def strided_sdpa_heads(q, k, v, bs, length):
    """The earlier ``_sdpa_heads``: SDPA on transposed (non-contiguous) views."""
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(bs, -1, length)


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    with Stopwatch(device) as watch:
        for _ in range(repeats):
            fn()
    return watch.seconds / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    machine = args.machine or machine_name(device)
    fused = blocks._sdpa_heads
    variants = {"strided (math path)": strided_sdpa_heads, "contiguous (current)": fused}
    rows = []

    q, k, v = (torch.randn(64, 4, 16, 256, device=device) for _ in range(3))
    for name, heads in variants.items():
        with torch.inference_mode():
            seconds = timed(lambda: heads(q, k, v, 64, 256), device, args.repeats)
        rows.append({"what": "attention 64x4 heads x 256 tokens x 16 ch", "variant": name, "ms": seconds * 1e3})

    net = build_unet("tiny", 32, 2, 1).to(device)
    x_inf, t_inf = torch.randn(64, 2, 32, 32, device=device), torch.rand(64, device=device) * 999
    x_tr, t_tr = torch.randn(16, 2, 32, 32, device=device), torch.rand(16, device=device) * 999

    def train_step():
        net.zero_grad(set_to_none=True)
        net(x_tr, t_tr).square().mean().backward()

    try:
        for name, heads in variants.items():
            blocks._sdpa_heads = heads
            with torch.inference_mode():
                seconds = timed(lambda: net(x_inf, t_inf), device, args.repeats)
            rows.append(
                {
                    "what": "tiny U-Net forward, 64x2x32x32",
                    "variant": name,
                    "ms": seconds * 1e3,
                    "ms_per_image": seconds * 1e3 / 64,
                }
            )
            seconds = timed(train_step, device, args.repeats)
            rows.append(
                {
                    "what": "tiny U-Net forward+backward, 16x2x32x32",
                    "variant": name,
                    "ms": seconds * 1e3,
                    "ms_per_image": seconds * 1e3 / 16,
                }
            )
    finally:
        blocks._sdpa_heads = fused

    speedups = {}
    for what in dict.fromkeys(r["what"] for r in rows):
        pair = {r["variant"]: r["ms"] for r in rows if r["what"] == what}
        speedups[what] = pair["strided (math path)"] / pair["contiguous (current)"]
    print(f"{'what':42s} {'variant':22s} {'ms':>9s}")
    for r in rows:
        print(f"{r['what']:42s} {r['variant']:22s} {r['ms']:9.2f}")
    for what, ratio in speedups.items():
        print(f"speedup, {what}: {ratio:.2f}x")
    out = os.path.join(args.out_dir, f"attention-{machine}.json")
    write_json(
        out,
        {
            "benchmark": "attention",
            "machine": machine,
            "repeats": args.repeats,
            "rows": rows,
            "speedup_contiguous_over_strided": speedups,
            "environment": environment(device, machine),
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
