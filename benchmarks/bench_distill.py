"""Distillation speed: IBMD iterations per second, fused ops against the pure-PyTorch reference.

One iteration is Algorithm 1's unit (MATH.md 5): L fake-model steps (``IBMD.fake_step``) and one
generator step (``IBMD.generator_step``), on the same model and batch in every variant. Each
variant runs in a process of its own, because the op backend is chosen when ``ibmd_fast.ops`` is
imported:

- ``fused``: the compiled ops of ``ibmd_fast._C`` (bridge step with in-kernel noise, fused losses);
- ``reference``: the same run with ``IBMD_FAST_DISABLE_EXT=1`` (``ibmd_fast.reference``);
- on CUDA, each of those with bf16 autocast (``+bf16``), then also NHWC memory (``+cl``), then
  also ``torch.compile`` of the three networks (``+compile``).

The teacher is a random-weight I2SB release of ``--arch`` written to a temporary folder, so the
script runs anywhere (random weights cost the same time as trained ones); the batches are random
images already on the device, so data loading is not timed. Each variant runs ``--warmup``
untimed iterations (compilation happens there), then ``--steps`` timed ones; with ``--rounds N``
the variants run N times, interleaved, and the best round counts (on a shared machine the
slower rounds measure the neighbours).

    python benchmarks/bench_distill.py                         # CPU: fused vs reference
    python benchmarks/bench_distill.py --device cuda --machine h100
    python benchmarks/bench_distill.py --variants fused,reference+bf16 --steps 10

Prints a table and writes ``benchmarks/results/distill-<machine>.json`` with every variant and the
fused / reference ratio of iterations per second for each setting.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import torch  # noqa: E402

from _common import RESULTS, Stopwatch, environment, machine_name, resolve_device, write_json  # noqa: E402

# The settings each variant adds, in order: every rung of the CUDA ladder keeps the ones before it.
CUDA_LADDER = ("", "+bf16", "+bf16+cl", "+bf16+cl+compile")
DEFAULTS = {  # per device: a size that takes seconds per variant
    "cpu": {"arch": "tiny", "image_size": 32, "batch_size": 4, "steps": 5, "warmup": 1, "rounds": 3},
    "cuda": {"arch": "small", "image_size": 32, "batch_size": 64, "steps": 10, "warmup": 2, "rounds": 1},
}


def parse_variant(name: str) -> dict:
    """``fused+bf16+cl+compile`` -> its settings; raises ValueError for unknown parts."""
    ops, *extras = name.split("+")
    if ops not in ("fused", "reference"):
        raise ValueError(f"variant {name!r} must start with 'fused' or 'reference'")
    unknown = set(extras) - {"bf16", "cl", "compile"}
    if unknown:
        raise ValueError(f"variant {name!r}: unknown part(s) {sorted(unknown)}; use +bf16, +cl, +compile")
    return {"variant": name, "ops": ops, "precision": "bf16" if "bf16" in extras else "fp32",
            "channels_last": "cl" in extras, "compile": "compile" in extras}


def setting_of(variant: dict) -> str:
    """The variant's name without its ops part: the key fused and reference rows are paired by."""
    parts = [variant["precision"]] + (["channels_last"] if variant["channels_last"] else []) \
        + (["compile"] if variant["compile"] else [])
    return "+".join(parts)


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
    save_release(path, teacher.net, TEACHER_FORMAT, {
        "unet": net.config, "conditional": False, "bridge": teacher.bridge.config(), "nfe": 100,
        "degradation": "sr4x-bicubic", "image_size": size, "channels": channels, "data": "synthetic"})
    return path


# ----------------------------------------------------------------------------
# One variant (runs in a subprocess)


def run_variant(spec: dict) -> dict:
    """Time ``spec["steps"]`` Algorithm-1 iterations after ``spec["warmup"]`` untimed ones."""
    from ibmd_fast import ops
    from ibmd_fast.release import load_teacher
    from ibmd_fast.train import IBMD, DistillConfig
    from ibmd_fast.train import distributed
    from ibmd_fast.train.common import Precision

    device = spec["device"]
    env = distributed.init(device)
    teacher, tconf = load_teacher(spec["teacher"], device=env.device)
    cfg = DistillConfig(teacher=spec["teacher"], nfe=1, inner_steps=spec["inner_steps"],
                        batch_size=spec["batch_size"], precision=spec["precision"],
                        channels_last=spec["channels_last"], compile=spec["compile"], device=device, seed=0)
    ibmd = IBMD(teacher, cfg, env, Precision(cfg.precision, env.device), inpainting=False)
    ibmd.prepare()
    gen = torch.Generator().manual_seed(0)
    shape = (spec["batch_size"], int(tconf["channels"]), spec["image_size"], spec["image_size"])
    # L + 1 fixed batches on the device: the timing covers the algorithm, not data loading
    batches = [{"xT": (torch.rand(shape, generator=gen) * 2 - 1).to(env.device)}
               for _ in range(spec["inner_steps"] + 1)]

    def iteration() -> tuple[float, float]:
        with Stopwatch(device) as fake:
            for batch in batches[:-1]:
                ibmd.fake_step(batch)
        with Stopwatch(device) as generator:
            ibmd.generator_step(batches[-1])
        return fake.seconds, generator.seconds

    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Stopwatch(device) as first:
        iteration()
    for _ in range(spec["warmup"] - 1):
        iteration()
    fake_s = gen_s = 0.0
    with Stopwatch(device) as timed:
        for _ in range(spec["steps"]):
            f, g = iteration()
            fake_s, gen_s = fake_s + f, gen_s + g
    steps = spec["steps"]
    return {
        "backend": ops.backend(),
        "torch_threads": torch.get_num_threads(),
        "it_per_s": steps / timed.seconds,
        "sec_per_iteration": timed.seconds / steps,
        "fake_step_ms": 1e3 * fake_s / (steps * spec["inner_steps"]),
        "generator_step_ms": 1e3 * gen_s / steps,
        "first_iteration_s": first.seconds,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if env.device.type == "cuda" else None,
        "generator_skipped": ibmd.gen_guard.skipped,
    }


def spawn(spec: dict, timeout: float) -> dict:
    """Run one variant in a fresh interpreter (reference: with IBMD_FAST_DISABLE_EXT=1)."""
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
            return {**json.loads(line[len("RESULT "):]), "process_s": time.perf_counter() - started}
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:300]}"}


# ----------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=None, help="U-Net config (default: tiny on CPU, small on CUDA)")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default 32)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 64 on CUDA")
    parser.add_argument("--inner-steps", type=int, default=5, help="L: fake-model steps per iteration")
    parser.add_argument("--steps", type=int, default=None, help="timed iterations (default: 5 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first, at least 1 "
                        "(default: 1 CPU, 2 CUDA)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of every variant, interleaved; the best "
                        "counts (default: 3 CPU, 1 CUDA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--note", default=None, help="a remark stored in the JSON (e.g. what else ran meanwhile)")
    parser.add_argument("--variants", default=None, metavar="LIST",
                        help="comma-separated, e.g. fused,reference,fused+bf16+cl+compile (default: fused and "
                        "reference on CPU; on CUDA both at each rung of fp32, +bf16, +bf16+cl, +bf16+cl+compile)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant at most")
    parser.add_argument("--machine", default=None, help="results name (default: GPU name or cpu-<n>core)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distill-<machine>.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print("RESULT " + json.dumps(run_variant(json.loads(args.worker))), flush=True)
        return 0

    device = resolve_device(args.device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    settings = {**DEFAULTS[kind], **{k: v for k, v in (("arch", args.arch), ("image_size", args.image_size),
                                                          ("batch_size", args.batch_size), ("steps", args.steps),
                                                          ("warmup", args.warmup), ("rounds", args.rounds))
                                   if v is not None}}
    if min(settings["steps"], settings["warmup"], settings["rounds"]) < 1:
        parser.error("--steps, --warmup and --rounds must be at least 1")
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
    elif kind == "cuda":
        names = [f"{ops}{rung}" for rung in CUDA_LADDER for ops in ("fused", "reference")]
    else:
        names = ["fused", "reference"]
    if args.no_compile:
        names = [n for n in names if "compile" not in n]
    try:
        variants = [parse_variant(n) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    machine = args.machine or machine_name(device)
    env = environment(device, machine)
    print(f"IBMD distillation speed on {machine} ({device}): arch {settings['arch']}, "
          f"{args.channels}x{settings['image_size']}x{settings['image_size']}, batch {settings['batch_size']}, "
          f"L = {args.inner_steps}, {settings['warmup']} warm-up + {settings['steps']} timed iterations, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}", flush=True)

    from ibmd_fast.models import build_unet

    params = sum(p.numel() for p in build_unet(settings["arch"], settings["image_size"], args.channels,
                                               args.channels).parameters())
    out = args.out or os.path.join(RESULTS, f"distill-{machine}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runs: dict[str, list[dict]] = {v["variant"]: [] for v in variants}

    def report() -> dict:
        """Rows (each variant's best round so far) and ratios; written after every run, so an outer
        timeout (e.g. benchmarks/gpu_check.sh's) keeps the variants already measured."""
        rows = []
        for variant in variants:
            tried = runs[variant["variant"]]
            if not tried:
                continue
            done = [r for r in tried if "error" not in r]
            best = max(done, key=lambda r: r["it_per_s"]) if done else tried[-1]
            rows.append({**variant, "setting": setting_of(variant), **best,
                         "it_per_s_rounds": [r.get("it_per_s") for r in tried]})
        ratios = {}  # fused / reference iterations per second, per setting
        for setting in dict.fromkeys(r["setting"] for r in rows):
            pair = {r["ops"]: r for r in rows if r["setting"] == setting and "error" not in r}
            if "fused" in pair and "reference" in pair:
                ratios[setting] = pair["fused"]["it_per_s"] / pair["reference"]["it_per_s"]
        payload = {
            **env,
            "what": "IBMD Algorithm-1 iterations per second (L fake-model steps + 1 generator step), one process "
                    "per variant; random-weight I2SB teacher; fixed random batches already on the device",
            "settings": {**settings, "channels": args.channels, "inner_steps": args.inner_steps,
                         "unet_parameters": params, "student_nfe": 1,
                         "best_of_rounds": "each row is its best round; it_per_s_rounds lists them all"},
            "note": args.note,
            "rows": rows,
            "ratio_fused_over_reference": ratios,
        }
        write_json(out, payload)
        return payload

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        teacher = synthetic_teacher(scratch, settings["arch"], settings["image_size"], args.channels)
        print(f"{'variant':28s} {'round':>5s} {'backend':18s} {'it/s':>8s} {'ms/it':>9s} {'fake ms':>9s} "
              f"{'gen ms':>9s} {'1st it s':>9s}", flush=True)
        for round_ in range(settings["rounds"]):
            for variant in variants:
                spec = {**variant, "teacher": teacher, "device": device, "inner_steps": args.inner_steps,
                        **{k: settings[k] for k in ("image_size", "batch_size", "steps", "warmup")}}
                run = spawn(spec, args.timeout)
                runs[variant["variant"]].append(run)
                if "error" in run:
                    print(f"{variant['variant']:28s} {round_ + 1:5d} failed: {run['error']}", flush=True)
                else:
                    print(f"{variant['variant']:28s} {round_ + 1:5d} {run['backend']:18s} {run['it_per_s']:8.3f} "
                          f"{1e3 * run['sec_per_iteration']:9.1f} {run['fake_step_ms']:9.1f} "
                          f"{run['generator_step_ms']:9.1f} {run['first_iteration_s']:9.2f}", flush=True)
                final = report()
    for setting, ratio in final["ratio_fused_over_reference"].items():
        print(f"fused / reference, {setting}: {ratio:.3f}x iterations per second")
    print(f"wrote {out}")
    rows = final["rows"]
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
