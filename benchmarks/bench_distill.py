"""The whole IBMD step, fast: a ladder of speed levers on one model, batch and data.

One iteration is Algorithm 1's unit (MATH.md 5): L fake-model steps (``IBMD.fake_step``) and one
generator step (``IBMD.generator_step``), three U-Nets in all. Every rung keeps the levers of the
rungs before it, and each rung runs in a process of its own (the op backend is chosen when
``ibmd_fast.ops`` is imported; compiled graphs and allocator state must not leak between rows):

    1 naive           fp32, TF32 off, eager, the reference ops (IBMD_FAST_DISABLE_EXT=1), torch's
                      default (unfused) AdamW: how the paper's code runs
    2 +fused-ops      the compiled ops of ibmd_fast._C (bridge step with in-kernel noise, fused losses)
    3 +bf16           bf16 autocast, TF32 for what stays fp32                        (CUDA only)
    4 +channels-last  NHWC memory format
    5 +compile        torch.compile of the three networks
    6 +fused-adamw    AdamW(fused=True), whose step OptimizerStep guards on the device: no host sync
                      inside an iteration
    7 +cuda-graphs    torch.compile(mode="reduce-overhead"): the networks' forward and backward replay
                      as CUDA graphs (their shapes are static); the bridge steps and optimizer steps
                      between them stay eager, since the in-kernel noise takes its seed as a host
                      scalar (csrc/cuda/bridge_step.cu), which a captured graph would freeze  (CUDA only)

Sizes (``--size``): ``tiny`` (the unit-test U-Net, 32 px, batch 4: CPU), ``small`` (64 px, batch
64), ``adm256`` (the 552M-parameter ADM-256 teacher configuration at 256 px; ``--batch-size`` and
``--checkpoint-activations`` set how it fits, ``--memory-cap-gb 80`` holds an H200 to an 80 GB
card's memory). The teacher is a random-weight I2SB release written to a temporary folder
(random weights cost the same time as trained ones); the batches are random images already on
the device, so data loading is not timed.

Timing: after ``--warmup`` untimed iterations (compilation and graph capture happen there),
``--steps`` timed ones, each timed by CUDA events on the GPU (recorded without waiting, read once
at the end) or by the wall clock on CPU; a row reports the median. On CUDA one more iteration
runs under ``torch.cuda.set_sync_debug_mode("warn")`` and the row records how many host
synchronisations it made. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak resident set on CPU. With ``--rounds N`` all rows run N times, interleaved (on a shared
machine a neighbour's burst then hits one round of every row, not all rounds of one row), and a
row's figure is the median over rounds.

    python benchmarks/bench_distill.py                                   # CPU, tiny: rungs 1 2 4 5 6
    python benchmarks/bench_distill.py --device cuda --size small
    python benchmarks/bench_distill.py --device cuda --size adm256 --batch-size 8 --checkpoint-activations
    python benchmarks/bench_distill.py --rungs 1,2 --steps 3 --rounds 1  # a quick look

Model-FLOP utilisation: one more iteration of an eager row without activation checkpointing runs
under ``torch.utils.flop_counter.FlopCounterMode`` (the three networks' forward and backward), and
every row reports that count times its iterations per second, as TFLOP/s and as a fraction of
``--peak-tflops`` (790 on an H200: its measured dense bf16 matrix rate).

Prints a table and writes (merging with the sizes already there) ``benchmarks/results/
distill-<machine>.json``: for each size its settings and rows, and ``speedup_best_over_naive``
(the best row's iterations per second over rung 1's) per size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import torch  # noqa: E402

from _common import RESULTS, environment, machine_name, resolve_device, write_json  # noqa: E402

# rung -> (name, the levers it adds, whether it runs on CPU); every rung keeps the ones before it
LADDER = {
    1: ("naive", {}, True),
    2: ("+fused-ops", {"ops": "fused"}, True),
    3: ("+bf16", {"precision": "bf16", "tf32": True}, False),
    4: ("+channels-last", {"channels_last": True}, True),
    5: ("+compile", {"compile": "default"}, True),
    6: ("+fused-adamw", {"fused_adam": True}, True),
    7: ("+cuda-graphs", {"compile": "reduce-overhead"}, False),
}
NAIVE = {
    "ops": "reference",
    "precision": "fp32",
    "tf32": False,
    "channels_last": False,
    "compile": None,
    "fused_adam": False,
}
SIZES = {  # size -> U-Net config, image side, batch, timed / warm-up iterations
    "tiny": {"arch": "tiny", "image_size": 32, "batch_size": 4, "steps": 5, "warmup": 1},
    "small": {"arch": "small", "image_size": 64, "batch_size": 64, "steps": 10, "warmup": 3},
    "adm256": {"arch": "adm256", "image_size": 256, "batch_size": 8, "steps": 5, "warmup": 2},
}


def rung_settings(rung: int, rungs: list[int]) -> dict:
    """The levers of ``rung``: the naive baseline plus every rung in ``rungs`` up to and including it."""
    settings = dict(NAIVE)
    for r in sorted(rungs):
        if r <= rung:
            settings.update(LADDER[r][1])
    return settings


def parse_rungs(text: str, cuda: bool) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; ValueError naming an unknown rung or one CPU cannot run."""
    rungs = sorted({int(r) for r in text.replace(" ", "").split(",") if r})
    for r in rungs:
        if r not in LADDER:
            raise ValueError(f"unknown rung {r}; the ladder has {sorted(LADDER)}")
        if not cuda and not LADDER[r][2]:
            raise ValueError(f"rung {r} ({LADDER[r][0]}) needs CUDA")
    if not rungs:
        raise ValueError("no rungs given")
    return rungs


def synthetic_teacher(folder: str, arch: str, size: int, channels: int) -> str:
    """A random-weight I2SB teacher release of ``arch`` (unconditional, 1000 steps, beta_max 0.3)."""
    from ibmd_fast.bridges import I2SBBridge
    from ibmd_fast.models import Teacher, build_unet
    from ibmd_fast.release import TEACHER_FORMAT, save_release

    torch.manual_seed(0)
    net = build_unet(arch, size, channels, channels)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized output layers would make trivial work
    teacher = Teacher(net, I2SBBridge(n_steps=1000, beta_max=0.3))
    path = os.path.join(folder, "teacher.safetensors")
    save_release(
        path,
        teacher.net,
        TEACHER_FORMAT,
        {
            "unet": net.config,
            "conditional": False,
            "bridge": teacher.bridge.config(),
            "nfe": 100,
            "degradation": "sr4x-bicubic",
            "image_size": size,
            "channels": channels,
            "data": "synthetic",
        },
    )
    return path


# ----------------------------------------------------------------------------
# One row (runs in a subprocess)


class _Timer:
    """Per-iteration times: CUDA events recorded without waiting (read at the end), or the wall clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_row(spec: dict) -> dict:
    """Time ``spec["steps"]`` Algorithm-1 iterations after ``spec["warmup"]`` untimed ones."""
    from ibmd_fast import ops
    from ibmd_fast.release import load_teacher
    from ibmd_fast.timing import Stopwatch
    from ibmd_fast.train import IBMD, DistillConfig
    from ibmd_fast.train import distributed
    from ibmd_fast.train.common import Precision

    cuda = spec["device"].startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(spec["tf32"])
    torch.set_float32_matmul_precision("high" if spec["tf32"] else "highest")
    env = distributed.init(spec["device"])
    if cuda and spec.get("memory_cap_gb"):
        total = torch.cuda.get_device_properties(env.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gb"] * 2**30 / total), env.device)
    teacher, tconf = load_teacher(spec["teacher"], device=env.device)
    cfg = DistillConfig(
        teacher=spec["teacher"],
        nfe=1,
        inner_steps=spec["inner_steps"],
        batch_size=spec["batch_size"],
        precision=spec["precision"],
        channels_last=spec["channels_last"],
        compile=spec["compile"] == "default",
        fused_adam=spec["fused_adam"],
        checkpoint_activations=spec["checkpoint_activations"],
        device=spec["device"],
        seed=0,
    )
    ibmd = IBMD(teacher, cfg, env, Precision(cfg.precision, env.device), inpainting=False)
    ibmd.prepare()
    if spec["compile"] == "reduce-overhead":  # CUDA graphs of each network's forward and backward
        for m in (ibmd.teacher, ibmd.fake, ibmd.generator):
            m.net.compile(mode="reduce-overhead")
    rng = torch.Generator().manual_seed(0)
    shape = (spec["batch_size"], int(tconf["channels"]), spec["image_size"], spec["image_size"])
    # L + 1 fixed batches on the device: the timing covers the algorithm, not data loading
    batches = [
        {"xT": (torch.rand(shape, generator=rng) * 2 - 1).to(env.device)} for _ in range(spec["inner_steps"] + 1)
    ]
    step_begin = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    graphs = spec["compile"] == "reduce-overhead" and step_begin is not None

    def iteration() -> None:
        for batch in batches[:-1]:
            if graphs:
                step_begin()
            ibmd.fake_step(batch)
        if graphs:
            step_begin()
        ibmd.generator_step(batches[-1])

    with Stopwatch(env.device) as first:
        iteration()
    first_s = first.seconds
    for _ in range(spec["warmup"] - 1):
        iteration()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = _Timer(cuda)
    timer.mark()
    for _ in range(spec["steps"]):
        iteration()
        timer.mark()
    times = timer.seconds()
    syncs = None
    if cuda:  # one more iteration, untimed, counting what waits for the GPU
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                iteration()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    flops = None
    if spec["compile"] is None and not spec["checkpoint_activations"]:
        # one more iteration, untimed, under torch's FLOP counter: the three networks' forward and
        # backward matrix work (convolutions, matmuls, attention) of one Algorithm-1 iteration. Counted
        # on eager rows only (a compiled graph hides its operators) and without activation
        # checkpointing (its recomputation is not model work).
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            iteration()
        flops = int(counter.get_total_flops())
    median = statistics.median(times)
    return {
        "backend": ops.backend(),
        "torch_threads": torch.get_num_threads(),
        "it_per_s": 1.0 / median,
        "ms_per_iteration": 1e3 * median,
        "ms_per_iteration_each": [round(1e3 * t, 3) for t in times],
        "first_iteration_s": first_s,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated(env.device) / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "host_syncs_per_iteration": syncs,
        "generator_skipped": ibmd.gen_guard.skipped,
        "flops_per_iteration": flops,
    }


def spawn(spec: dict, timeout: float) -> dict:
    """Run one row in a fresh interpreter (the reference ops: with IBMD_FAST_DISABLE_EXT=1)."""
    env = dict(os.environ)
    env.pop("IBMD_FAST_DISABLE_EXT", None)
    if spec["ops"] == "reference":
        env["IBMD_FAST_DISABLE_EXT"] = "1"
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "process_s": time.perf_counter() - started}
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["(no output)"]
    oom = next((ln for ln in lines if "OutOfMemoryError" in ln or "out of memory" in ln), None)
    return {"error": f"exit {proc.returncode}: {(oom or lines[-1])[:300]}"}


def summarize(rungs: list[int], runs: dict[int, list[dict]], settings: dict) -> dict:
    """Rows (median over rounds) and the best row's speed-up over rung 1, for one size."""
    rows = []
    for rung in rungs:
        tried = runs.get(rung, [])
        if not tried:
            continue
        done = [r for r in tried if "error" not in r]
        row = {
            "rung": rung,
            "name": LADDER[rung][0],
            "levers": rung_settings(rung, rungs),
            "rounds": len(tried),
            "errors": [r["error"] for r in tried if "error" in r],
        }
        if done:
            order = sorted(done, key=lambda r: r["it_per_s"])
            middle = order[(len(order) - 1) // 2]  # the lower median: a real round's record (its details)
            row.update({k: v for k, v in middle.items() if k != "it_per_s"})
            row["it_per_s"] = statistics.median(r["it_per_s"] for r in done)
            row["ms_per_iteration"] = 1e3 / row["it_per_s"]  # the same median, as time
            row["it_per_s_rounds"] = [r["it_per_s"] for r in done]
        rows.append(row)
    naive = next((r for r in rows if r["rung"] == 1 and "it_per_s" in r), None)
    timed = [r for r in rows if "it_per_s" in r]
    best = max(timed, key=lambda r: r["it_per_s"]) if timed else None
    counted = [r["flops_per_iteration"] for r in timed if r.get("flops_per_iteration")]
    flops = max(counted) if counted else None  # the same model work on every rung (fp32 or bf16 alike)
    peak = settings.get("peak_tflops")
    for row in timed:
        row["speedup_over_naive"] = row["it_per_s"] / naive["it_per_s"] if naive else None
        row["model_tflops_per_s"] = flops * row["it_per_s"] / 1e12 if flops else None
        row["model_flop_utilisation"] = (flops * row["it_per_s"] / (peak * 1e12)) if (flops and peak) else None
    return {
        "settings": settings,
        "rows": rows,
        "best_rung": best["rung"] if best else None,
        "flops_per_iteration": flops,
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode, one eager iteration" if flops else None,
        "speedup_best_over_naive": best["it_per_s"] / naive["it_per_s"] if (best and naive) else None,
        "best_model_flop_utilisation": best.get("model_flop_utilisation") if best else None,
    }


def merge(out: str, machine: str, size: str, section: dict, env: dict, note) -> dict:
    """The JSON at ``out`` with this size's section replaced (other sizes kept when the file is ours)."""
    payload = {}
    if os.path.exists(out):
        try:
            with open(out, encoding="utf-8") as fh:
                payload = json.load(fh)
        except (OSError, ValueError):
            payload = {}
    if payload.get("machine") != machine or "sizes" not in payload:
        payload = {}
    sizes = {**payload.get("sizes", {}), size: {**section, "environment": env, "note": note}}
    return {
        **env,
        "what": "IBMD Algorithm-1 iterations per second (L fake-model steps + 1 generator step, three U-Nets), "
        "a ladder of speed levers, one process per row; random-weight I2SB teacher; fixed random "
        "batches already on the device; per-iteration median (CUDA events on GPU, wall clock on CPU), "
        "median over interleaved rounds",
        "ladder": {str(r): LADDER[r][0] for r in LADDER},
        "sizes": sizes,
        "speedup_best_over_naive": {k: v.get("speedup_best_over_naive") for k, v in sizes.items()},
    }


def print_table(section: dict) -> None:
    print(
        f"{'rung':>4s} {'row':16s} {'backend':14s} {'it/s':>9s} {'ms/it':>10s} {'x naive':>8s} "
        f"{'peak MB':>9s} {'syncs':>6s} {'1st it s':>9s} {'TFLOP/s':>8s} {'MFU':>6s}"
    )
    for row in section["rows"]:
        if "it_per_s" not in row:
            print(f"{row['rung']:4d} {row['name']:16s} failed: {row['errors'][-1]}")
            continue
        syncs = "-" if row["host_syncs_per_iteration"] is None else str(row["host_syncs_per_iteration"])
        speedup = row.get("speedup_over_naive")
        print(
            f"{row['rung']:4d} {row['name']:16s} {row['backend']:14s} {row['it_per_s']:9.3f} "
            f"{row['ms_per_iteration']:10.1f} {'-' if speedup is None else f'{speedup:.2f}x':>8s} "
            f"{row['peak_memory_mb']:9.0f} {syncs:>6s} {row['first_iteration_s']:9.1f} "
            f"{'-' if row.get('model_tflops_per_s') is None else format(row['model_tflops_per_s'], '8.1f'):>8s} "
            f"{'-' if row.get('model_flop_utilisation') is None else format(row['model_flop_utilisation'], '6.1%'):>6s}"
        )
    if section.get("flops_per_iteration"):
        peak = section["settings"].get("peak_tflops")
        print(
            f"model FLOPs per iteration: {section['flops_per_iteration'] / 1e12:.3f} TFLOP (counted once, eager)"
            + (f"; MFU against {peak:g} TFLOP/s" if peak else "")
        )


# ----------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: tiny on CPU, small on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="override the size's batch")
    parser.add_argument("--image-size", type=int, default=None, help="override the size's image side")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--inner-steps", type=int, default=5, help="L: fake-model steps per iteration")
    parser.add_argument("--steps", type=int, default=None, help="timed iterations per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first, at least 1")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="runs of every row, interleaved; the median counts (default: 3 on CPU, 1 on CUDA)",
    )
    parser.add_argument(
        "--rungs",
        default=None,
        metavar="LIST",
        help="comma-separated rungs (default: all that the device can run: 1,2,4,5,6 on CPU, 1-7 on CUDA)",
    )
    parser.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="activation checkpointing in the U-Nets (the distiller's option), every row",
    )
    parser.add_argument(
        "--memory-cap-gb",
        type=float,
        default=None,
        help="cap this process's GPU memory (e.g. 80: an 80 GB card's budget on an H200)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's measured dense bf16 matrix rate, for model-FLOP utilisation "
        "(default: 790 on an H200, as measured there; none elsewhere)",
    )
    parser.add_argument("--note", default=None, help="a remark stored in the JSON (e.g. what else ran meanwhile)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per row at most")
    parser.add_argument("--machine", default=None, help="results name (default: GPU name or cpu-<n>core)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distill-<machine>.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print("RESULT " + json.dumps(run_row(json.loads(args.worker))), flush=True)
        return 0

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    size = args.size or ("small" if cuda else "tiny")
    settings = dict(SIZES[size])
    for key in ("batch_size", "image_size", "steps", "warmup"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    rounds = args.rounds if args.rounds is not None else (1 if cuda else 3)
    if min(settings["steps"], settings["warmup"], rounds, settings["batch_size"], args.inner_steps) < 1:
        parser.error("--steps, --warmup, --rounds, --batch-size and --inner-steps must be at least 1")
    try:
        rungs = parse_rungs(args.rungs or ",".join(str(r) for r in LADDER if cuda or LADDER[r][2]), cuda)
    except ValueError as exc:
        parser.error(str(exc))
    machine = args.machine or machine_name(device)
    env = environment(device, machine)

    from ibmd_fast.models import build_unet

    params = sum(
        p.numel()
        for p in build_unet(settings["arch"], settings["image_size"], args.channels, args.channels).parameters()
    )
    peak = args.peak_tflops
    if peak is None and cuda and "h200" in torch.cuda.get_device_name().lower():
        peak = 790.0  # 8192^3 bf16 products on random data, measured on this workplace's H200s
    settings["peak_tflops"] = peak
    settings.update(
        {
            "size": size,
            "channels": args.channels,
            "inner_steps": args.inner_steps,
            "rounds": rounds,
            "unet_parameters": params,
            "student_nfe": 1,
            "checkpoint_activations": args.checkpoint_activations,
            "memory_cap_gb": args.memory_cap_gb,
        }
    )
    print(
        f"IBMD iteration ladder on {machine} ({device}): {size} ({settings['arch']}, {params / 1e6:.1f}M "
        f"parameters per U-Net), {args.channels}x{settings['image_size']}x{settings['image_size']}, batch "
        f"{settings['batch_size']}, L = {args.inner_steps}, {settings['warmup']} warm-up + {settings['steps']} "
        f"timed iterations, {rounds} round(s), rungs {rungs}"
        + (", activation checkpointing" if args.checkpoint_activations else "")
        + (f", GPU memory capped at {args.memory_cap_gb:g} GB" if args.memory_cap_gb else ""),
        flush=True,
    )
    out = args.out or os.path.join(RESULTS, f"distill-{machine}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runs: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        teacher = synthetic_teacher(scratch, settings["arch"], settings["image_size"], args.channels)
        for round_ in range(rounds):
            for rung in rungs:
                spec = {
                    **rung_settings(rung, rungs),
                    "teacher": teacher,
                    "device": device,
                    "inner_steps": args.inner_steps,
                    "checkpoint_activations": args.checkpoint_activations,
                    "memory_cap_gb": args.memory_cap_gb,
                    **{k: settings[k] for k in ("image_size", "batch_size", "steps", "warmup")},
                }
                run = spawn(spec, args.timeout)
                runs.setdefault(rung, []).append(run)
                shown = (
                    f"failed: {run['error']}"
                    if "error" in run
                    else f"{run['it_per_s']:.3f} it/s, {run['ms_per_iteration']:.1f} ms/it, "
                    f"first iteration {run['first_iteration_s']:.1f} s"
                )
                print(f"round {round_ + 1} rung {rung} {LADDER[rung][0]:16s} {shown}", flush=True)
                # written after every row, so an outer timeout keeps the rows already measured
                section = summarize(rungs, runs, settings)
                write_json(out, merge(out, machine, size, section, env, args.note))
    print_table(section)
    if section["speedup_best_over_naive"] is not None:
        print(
            f"best (rung {section['best_rung']}) over naive: {section['speedup_best_over_naive']:.2f}x "
            "iterations per second"
        )
    print(f"wrote {out}")
    return 0 if all("it_per_s" in r and not r["errors"] for r in section["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
