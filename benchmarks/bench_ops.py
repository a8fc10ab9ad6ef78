"""Time the fused ops against plain PyTorch (eager) and torch.compile of it.

For each device and dtype: ``bridge_step`` with in-kernel noise (vs
``coef_a*a + coef_b*b + std*randn_like(a)``), and the forward+backward of
``bridge_loss`` and ``ibmd_loss`` (vs the same formulas in PyTorch autograd).
Effective bandwidth is the bytes floor over the time: bridge_step reads a and b
and writes out; a loss forward+backward reads its inputs once and writes one
gradient per input. On CUDA the device's copy bandwidth (bytes read + written
by a large device-to-device copy) is measured in the same run.

    python benchmarks/bench_ops.py                      # CPU (and CUDA when present)
    python benchmarks/bench_ops.py --device cuda --machine h100

On CUDA the table shows device time: each variant is captured in a CUDA graph
and its replays are timed (the JSON also has the plain per-call times, which
include Python and launch overhead). Prints a table and writes
benchmarks/results/ops-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_name  # noqa: E402
from ibmd_fast import ops  # noqa: E402
from ibmd_fast.timing import capture_cuda_graph, measure  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timer(fn, device: str, warmup: int, repeats: int) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    return measure(fn, device, warmup, repeats)[0]


def graph_timer(fn, warmup: int, repeats: int) -> float:
    """Median seconds per replay of ``fn`` captured in a CUDA graph: device time without
    Python and launch overhead."""
    graph, _ = capture_cuda_graph(fn)
    return timer(graph.replay, "cuda", warmup, repeats)


def copy_bandwidth(device: str) -> float | None:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = timer(lambda: dst.copy_(src), device, 5, 30)
    return 2 * src.numel() * 4 / sec


def _bcast(c, like):
    return c.view(-1, *([1] * (like.dim() - 1)))


def eager_bridge_step(a, b, ca, cb, sd):
    return _bcast(ca, a) * a + _bcast(cb, a) * b + _bcast(sd, a) * torch.randn_like(a)


def eager_bridge_loss(p, t, w):
    d = p.float() - t.float()
    return w * (d * d).flatten(1).mean(1)


def eager_ibmd_loss(t, f, x, w):
    t, f, x = t.float(), f.float(), x.float()
    return w * ((t - x) ** 2 - (f - x) ** 2).flatten(1).mean(1)


def fwd_bwd(loss_fn, inputs, w):
    def run():
        loss = loss_fn(*inputs, w)
        return torch.autograd.grad(loss.sum(), inputs)

    return run


def bench_device(device, dtypes, shapes, warmup, repeats, use_compile):
    rows = []
    bw = copy_bandwidth(device)
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            g = torch.Generator(device="cpu").manual_seed(0)
            mk = lambda: torch.randn(shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
            a, b, c = mk(), mk(), mk()
            n, es = a.numel(), a.element_size()
            B = shape[0]
            ca, cb, sd, w = (torch.rand(B, device=device) for _ in range(4))
            # coefficients in the input dtype for plain PyTorch (what a user would write)
            cad, cbd, sdd = (x.to(dtype) for x in (ca, cb, sd))

            cases = {
                "bridge_step": (
                    3 * n * es,
                    {
                        "fused": lambda: ops.bridge_step(a, b, ca, cb, sd, seed=1234),
                        "eager": lambda: eager_bridge_step(a, b, cad, cbd, sdd),
                        "compile": (eager_bridge_step, (a, b, cad, cbd, sdd)),
                    },
                ),
            }
            p, t = (x.clone().requires_grad_() for x in (a, b))
            tf, ff, xf = (x.clone().requires_grad_() for x in (a, b, c))
            cases["bridge_loss fwd+bwd"] = (
                4 * n * es,
                {
                    "fused": fwd_bwd(ops.bridge_loss, (p, t), w),
                    "eager": fwd_bwd(eager_bridge_loss, (p, t), w),
                    "compile": ("loss2", (p, t)),
                },
            )
            cases["ibmd_loss fwd+bwd"] = (
                6 * n * es,
                {
                    "fused": fwd_bwd(ops.ibmd_loss, (tf, ff, xf), w),
                    "eager": fwd_bwd(eager_ibmd_loss, (tf, ff, xf), w),
                    "compile": ("loss3", (tf, ff, xf)),
                },
            )
            for op_name, (floor_bytes, variants) in cases.items():
                result = {
                    "device": device,
                    "dtype": dtype_name,
                    "shape": list(shape),
                    "op": op_name,
                    "floor_bytes": floor_bytes,
                }
                for variant, fn in variants.items():
                    if variant == "compile":
                        if not use_compile:
                            continue
                        kind, args = fn
                        torch._dynamo.reset()
                        if kind == "loss2":
                            fn = fwd_bwd(torch.compile(eager_bridge_loss), args, w)
                        elif kind == "loss3":
                            fn = fwd_bwd(torch.compile(eager_ibmd_loss), args, w)
                        else:
                            compiled = torch.compile(kind)
                            fn = (lambda c_, a_: lambda: c_(*a_))(compiled, args)
                    sec = timer(fn, device, warmup, repeats)
                    result[f"{variant}_ms"] = sec * 1e3
                    if device == "cuda":  # device time: replay of a CUDA graph of the same call
                        sec = graph_timer(fn, warmup, repeats)
                        result[f"{variant}_graph_ms"] = sec * 1e3
                    result[f"{variant}_GBps"] = floor_bytes / sec / 1e9
                key = "graph_ms" if device == "cuda" else "ms"
                result["speedup_vs_eager"] = result[f"eager_{key}"] / result[f"fused_{key}"]
                if f"compile_{key}" in result:
                    result["speedup_vs_compile"] = result[f"compile_{key}"] / result[f"fused_{key}"]
                if bw:
                    result["fused_pct_of_copy_bw"] = 100 * result["fused_GBps"] * 1e9 / bw
                rows.append(result)
                print_row(result)
    return rows, bw


def print_row(r):
    key = "graph_ms" if "fused_graph_ms" in r else "ms"
    cmp = f"{r['compile_' + key]:9.3f}" if "compile_" + key in r else "        -"
    vs_c = f"{r['speedup_vs_compile']:6.2f}x" if "speedup_vs_compile" in r else "      -"
    pct = f"{r['fused_pct_of_copy_bw']:5.1f}%" if "fused_pct_of_copy_bw" in r else "    -"
    shape = "x".join(map(str, r["shape"]))
    print(
        f"{r['device']:5s} {r['dtype']:9s} {shape:15s} {r['op']:20s} {r['fused_' + key]:9.3f} {r['eager_' + key]:9.3f} "
        f"{cmp} {r['speedup_vs_eager']:6.2f}x {vs_c} {r['fused_GBps']:8.1f} {pct}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per variant (0: 30 CPU / 100 CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--machine", default=None, help="name for the results file (default: from the device)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops-<machine>.json)")
    args = parser.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtypes.split(",")
    if device == "cuda":
        shapes = [(64, 3, 256, 256), (256, 3, 256, 256)]
        warmup, repeats = 10, args.repeats or 100
    else:
        shapes = [(16, 3, 128, 128)]
        warmup, repeats = 3, args.repeats or 30
    machine = args.machine or machine_name(device)
    print(
        f"ibmd-fast ops benchmark on {machine} ({device}), backend {ops.backend()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'dev':5s} {'dtype':9s} {'shape':15s} {'op':20s} {'fused ms':>9s} {'eager ms':>9s} {'compile':>9s} "
        f"{'vs eag':>7s} {'vs cmp':>7s} {'GB/s':>8s} {'%copy':>6s}"
    )
    rows, bw = bench_device(device, dtypes, shapes, warmup, repeats, not args.no_compile)
    if bw:
        print(f"device copy bandwidth (read + write): {bw / 1e9:.1f} GB/s")
    report = {
        "machine": machine,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backend": ops.backend(),
        "copy_bandwidth_GBps": bw / 1e9 if bw else None,
        "eager_baseline": "plain PyTorch: coef*a + coef*b + std*randn_like(a); losses as formulas under autograd",
        "rows": rows,
    }
    out = args.out or os.path.join(RESULTS, f"ops-{machine}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
