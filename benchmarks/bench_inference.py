"""Per-image latency and throughput of restoration: teacher vs IBMD student, PyTorch vs onnxruntime.

Rows, each at batch 1 and 16 (``--batches``):

- teacher, its natural sampler through ``restore.restore`` (I2SB posterior sampler; DBIM with eta = 1, the same
  posterior step, for a VP teacher) at NFE 100 and 10 (``--teacher-nfe``);
- student (its own NFE, usually 1);
- each of the two in every mode of ``--modes``: ``eager`` (PyTorch as it comes), ``compile``
  (the network under ``torch.compile``, inductor with ``freezing``, its inference setting) and,
  on CUDA, ``graph``: the network's forward captured once per batch size as a CUDA graph
  (``torch.cuda.CUDAGraph``) and replayed at every call, inputs copied into its static buffers.
  The sampler's loop, its noise draws and its bridge steps stay outside the graph: the fused
  bridge step takes its noise seed as a host scalar, which a captured graph would freeze;
- the student in onnxruntime (the model ``ibmd_fast.onnx.export_onnx`` writes,
  CPUExecutionProvider; also CUDAExecutionProvider with IO binding when onnxruntime-gpu and a
  GPU are there; onnxruntime-gpu does not reach the lent GPU machine of this project, so its
  CUDA provider has no figure in benchmarks/results). The synthetic releases are sr4x-bicubic, so
  the ONNX model takes the low-resolution image and its time includes the (nearest) upsampling
  that the PyTorch rows get done before them.

Each number is the median of ``--repeats`` timed runs after warm-up runs (fewer repeats when one
run takes longer than ``--budget`` seconds / repeats); noise is drawn outside the timed region
for onnxruntime and inside the sampler for PyTorch (as a user would run them).

    python benchmarks/bench_inference.py                              # default releases, else synthetic
    python benchmarks/bench_inference.py --teacher T.safetensors --generator G.safetensors
    python benchmarks/bench_inference.py --synthetic --size 32 --machine laptop
    python benchmarks/bench_inference.py --threads 1      # a CPU shared with other jobs (see below)

Inputs: ``--teacher`` (default the bundled ``ibmd_fast/assets/teacher-inpaint.safetensors``) and
``--generator`` (default ``runs/distill/generator.safetensors``). When either is missing, or with
``--synthetic``, a random-weight ``small`` U-Net teacher (I2SB) and its one-step generator are
built, so the script always runs (random weights time the same as trained ones). Prints a table
and writes ``benchmarks/results/inference-<machine>.json`` with every row, the speedup of the
student over the teacher at NFE 100, and the onnxruntime / eager time ratio, per batch size.

On a CPU that other jobs also use, pass ``--threads 1``: with several threads each OpenMP barrier
waits for a thread that may be descheduled, which slows torch.compile's generated kernels by up to
100x and makes every row noisy. The JSON records the thread counts and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
import ibmd_fast  # noqa: E402
from _common import machine_name  # noqa: E402
from ibmd_fast.bridges import I2SBBridge  # noqa: E402
from ibmd_fast.models import Generator, Teacher, build_unet  # noqa: E402
from ibmd_fast.release import GENERATOR_FORMAT, TEACHER_FORMAT, load_generator, load_teacher, save_release  # noqa: E402
from ibmd_fast.paths import DEFAULT_GENERATOR, DEFAULT_TEACHER
from ibmd_fast.restore import natural_sampler, restore, sample_student  # noqa: E402
from ibmd_fast.timing import Stopwatch, capture_cuda_graph, measure as _measure  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def synthetic_releases(folder: str, size: int, channels: int = 3) -> tuple[str, str]:
    """A random-weight `small` I2SB teacher and its one-step generator, written as releases."""
    torch.manual_seed(0)
    net = build_unet("small", size, channels, channels)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized output layers would make trivial work
    teacher = Teacher(net, I2SBBridge())
    generator = Generator(teacher)
    with torch.no_grad():
        for p in generator.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    common = {"degradation": "sr4x-bicubic", "image_size": size, "channels": channels, "inpainting": False}
    teacher_path, generator_path = os.path.join(folder, "teacher.safetensors"), os.path.join(folder, "rng.safetensors")
    save_release(
        teacher_path,
        teacher.net,
        TEACHER_FORMAT,
        {"unet": net.config, "conditional": False, "bridge": teacher.bridge.config(), "nfe": 100, **common},
    )
    save_release(generator_path, generator.net, GENERATOR_FORMAT, {**generator.config(), "nfe": 1, **common})
    return teacher_path, generator_path


class CalledAs:
    """``model`` (a Teacher or Generator) with its calls made through ``call`` (itself, compiled or
    CUDA-graph replayed), so that ``restore.restore`` and ``restore.sample_student``, the chains every
    other caller uses, run it: attributes (bridge, z_channels, ...) come from ``model``."""

    def __init__(self, model, call):
        self._model, self._call = model, call

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict_x0(self, x_t, t, xT=None):
        return self._call(x_t, t, xT)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


class GraphReplay:
    """A module's forward as CUDA-graph replay: captured on the first call for each set of input shapes
    (after warm-up calls on a side stream, as ``torch.cuda.graphs`` asks), then replayed with the
    inputs copied into the graph's static buffers. The result is the graph's static output, overwritten
    by the next replay: callers that keep it must clone it (the samplers consume it at once)."""

    def __init__(self, module):
        self.module = module
        self.graphs: dict = {}

    def __call__(self, *args, **kwargs):
        names = list(kwargs)
        tensors = list(args) + [kwargs[k] for k in names]
        key = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in tensors)
        if key not in self.graphs:
            static = [t.clone() if isinstance(t, torch.Tensor) else t for t in tensors]

            def call():
                return self.module(*static[: len(args)], **dict(zip(names, static[len(args) :])))

            graph, out = capture_cuda_graph(call)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buffer, t in zip(static, tensors):
            if isinstance(t, torch.Tensor):
                buffer.copy_(t)
        graph.replay()
        return out


def measure(fn, device: str, warmup: int, repeats: int, budget: float, warm=None) -> tuple[float, int]:
    """Median wall-clock seconds of ``fn()`` (synchronized; onnxruntime's GPU work is not on torch's
    stream, so no CUDA events) and the number of timed runs, about ``budget`` seconds of them."""
    return _measure(fn, device, warmup, repeats, budget=budget, warm=warm, events=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, metavar="PATH", help="teacher release")
    parser.add_argument("--generator", default=DEFAULT_GENERATOR, metavar="PATH", help="generator release")
    parser.add_argument("--synthetic", action="store_true", help="random-weight small teacher + generator")
    parser.add_argument(
        "--size", type=int, default=None, help="image side (default: the generator's image_size; 32 for --synthetic)"
    )
    parser.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    parser.add_argument("--teacher-nfe", default="100,10", help="teacher NFEs (default 100,10)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per row")
    parser.add_argument("--budget", type=float, default=30.0, help="about this many timed seconds per row at most")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (default: their own choice)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--modes",
        default=None,
        metavar="LIST",
        help="eager,compile,graph (default: all three on CUDA, eager,compile on CPU)",
    )
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    parser.add_argument("--machine", default=None, help="results name (default: GPU name or cpu-<n>core)")
    parser.add_argument("--out-dir", default=RESULTS)
    args = parser.parse_args(argv)

    load_at_start = os.getloadavg()[0]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    machine = args.machine or machine_name(device)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    modes = [
        m.strip()
        for m in (args.modes or ("eager,compile,graph" if device == "cuda" else "eager,compile")).split(",")
        if m.strip()
    ]
    if args.no_compile:
        modes = [m for m in modes if m != "compile"]
    unknown = set(modes) - {"eager", "compile", "graph"}
    if unknown or not modes:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from eager, compile, graph")
    if "graph" in modes and device != "cuda":
        parser.error("--modes graph needs --device cuda (CUDA graphs)")
    teacher_nfes = [int(n) for n in args.teacher_nfe.split(",") if n.strip()]
    scratch = tempfile.TemporaryDirectory(prefix="bench-inference-")

    synthetic = args.synthetic or not (os.path.isfile(args.teacher) and os.path.isfile(args.generator))
    if synthetic:
        if not args.synthetic:
            print(
                f"note: {args.teacher if not os.path.isfile(args.teacher) else args.generator} not found; "
                "using a random-weight `small` teacher and generator (--synthetic)",
                file=sys.stderr,
            )
        teacher_path, generator_path = synthetic_releases(scratch.name, args.size or 32)
    else:
        teacher_path, generator_path = args.teacher, args.generator
    teacher, teacher_config = load_teacher(teacher_path, device=device)
    generator, generator_config = load_generator(generator_path, device=device)
    nfe = int(generator_config.get("nfe", 1))
    factor = 2 ** (len(generator.net.config["channel_mult"]) - 1)
    size = args.size or int(generator_config.get("image_size") or 32)
    size = -(-size // factor) * factor
    channels = generator.image_channels
    inpainting = bool(generator_config.get("inpainting", False))
    print(
        f"device {device} ({machine}), image {channels}x{size}x{size}, student NFE {nfe}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads",
        file=sys.stderr,
    )

    rows = []

    def add(method: str, row_nfe: int, batch: int, seconds: float, runs: int, **extra):
        rows.append(
            {
                "method": method,
                "nfe": row_nfe,
                "batch": batch,
                "seconds_per_batch": seconds,
                "ms_per_image": seconds / batch * 1e3,
                "images_per_s": batch / seconds,
                "runs": runs,
                **extra,
            }
        )
        print(
            f"  {method:<26} nfe {row_nfe:>3}  batch {batch:>3}: {seconds / batch * 1e3:9.2f} ms/image  "
            f"{batch / seconds:8.2f} images/s",
            file=sys.stderr,
        )

    def images(batch: int, seed: int = 0) -> torch.Tensor:
        rng = torch.Generator().manual_seed(seed)
        return (torch.rand(batch, channels, size, size, generator=rng) * 2 - 1).to(device)

    def mask_for(batch: int):
        if not inpainting:
            return None
        mask = torch.zeros(batch, 1, size, size, device=device)
        mask[..., size // 4 : size // 4 + size // 2, size // 4 : size // 4 + size // 2] = 1
        return mask

    compile_error = None
    if "compile" in modes:
        import torch._inductor.config as inductor_config

        # Freezing folds the weights into the compiled graph (inductor's inference mode); without it the
        # CPU convolutions of the compiled graph run far slower than eager (about 100x here).
        inductor_config.freezing = True

    def network(model, mode: str):
        """``model`` as the sampler calls it in ``mode``: itself, compiled, or CUDA-graph replayed."""
        if mode == "compile":
            return torch.compile(model)
        if mode == "graph":
            return GraphReplay(model)
        return model

    # -- teacher
    sampler = natural_sampler(teacher.bridge_type)
    for mode in modes:
        net = CalledAs(teacher, network(teacher, mode))
        for batch in batches:
            xT = images(batch)
            label = f"teacher {mode} ({sampler}_sample)"
            try:
                for teacher_nfe in teacher_nfes:

                    def run_teacher(n=teacher_nfe):
                        # no_grad, not inference_mode: inductor's freezing and graph capture want plain tensors
                        with torch.no_grad():
                            return restore(net, xT, sampler, n, seed=0)

                    seconds, runs = measure(
                        run_teacher, device, args.warmup, args.repeats, args.budget, warm=lambda: run_teacher(1)
                    )
                    add(label, teacher_nfe, batch, seconds, runs, mode=mode)
            except Exception as exc:  # inductor needs a C++ compiler (and Triton on GPU); report, don't die
                compile_error = f"{label}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                print(f"  {label}: failed ({compile_error})", file=sys.stderr)
                break

    # -- student in PyTorch: each mode
    def student(model, xT, mask):
        with torch.no_grad():  # not inference_mode: inductor's freezing wants plain no_grad
            return sample_student(model, xT, nfe, mask, seed=0)

    for mode in modes:
        model = CalledAs(generator, network(generator, mode))
        method = {
            "eager": "student eager (PyTorch)",
            "compile": "student torch.compile",
            "graph": "student CUDA graph",
        }[mode]
        for batch in batches:
            xT, mask = images(batch), mask_for(batch)
            try:
                with Stopwatch(device) as first_call:
                    student(model, xT, mask)  # the first call compiles (or captures)
                first = first_call.seconds
                seconds, runs = measure(
                    lambda: student(model, xT, mask), device, args.warmup, args.repeats, args.budget
                )
            except Exception as exc:
                compile_error = f"{method}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                print(f"  {method}: failed ({compile_error})", file=sys.stderr)
                break
            add(method, nfe, batch, seconds, runs, first_call_s=first, mode=mode)

    # -- student in onnxruntime
    report = {k: None for k in ("exporter", "opset", "precision", "parity")}
    ort_version = None
    if not args.no_onnx:
        import onnxruntime as ort

        ort_version = ort.__version__

        from ibmd_fast.onnx import export_onnx

        onnx_path = os.path.join(scratch.name, "model.onnx")
        report = export_onnx(generator_path, onnx_path, example_size=size, progress=False)
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if args.threads > 0:
            options.intra_op_num_threads = args.threads
        for provider in providers:
            session = ort.InferenceSession(onnx_path, options, providers=[provider])
            ort_device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
            for batch in batches:
                rng = np.random.default_rng(0)
                feed = {}
                for item in json.loads(report["metadata"]["graph_inputs"]):  # an sr4x image input is low-res
                    side = size // item["size_divisor"]
                    feed[item["name"]] = rng.standard_normal((batch, item["channels"], side, side), dtype=np.float32)
                feed["xT"] = np.clip(feed["xT"], -1, 1)
                if "mask" in feed:
                    feed["mask"] = mask_for(batch).cpu().numpy()
                binding = session.io_binding()
                for name, array in feed.items():
                    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, ort_device, 0))
                binding.bind_output("x0", ort_device, 0)

                def run_ort():
                    session.run_with_iobinding(binding)
                    binding.synchronize_outputs()

                seconds, runs = measure(run_ort, "cpu", args.warmup, args.repeats, args.budget)
                add(f"student onnxruntime {ort_device.upper()}", nfe, batch, seconds, runs)

    # -- summary
    def find(prefix: str, row_nfe: int | None, batch: int):
        for row in rows:
            if (
                row["method"].startswith(prefix)
                and row["batch"] == batch
                and (row_nfe is None or row["nfe"] == row_nfe)
            ):
                return row
        return None

    summary = {}
    for batch in batches:
        eager = find("student eager", None, batch)
        teacher100 = find("teacher", 100, batch)
        ort_cpu = find("student onnxruntime CPU", None, batch)
        ort_cuda = find("student onnxruntime CUDA", None, batch)
        compiled = find("student torch.compile", None, batch)
        graphed = find("student CUDA graph", None, batch)
        entry = {}
        if eager and teacher100:
            entry["eager_speedup_vs_teacher_nfe100"] = teacher100["seconds_per_batch"] / eager["seconds_per_batch"]
        for name, row in (("ort_cpu", ort_cpu), ("ort_cuda", ort_cuda), ("compile", compiled), ("graph", graphed)):
            if row and eager:
                entry[f"{name}_time_over_eager"] = row["seconds_per_batch"] / eager["seconds_per_batch"]
            if row and teacher100:
                entry[f"{name}_speedup_vs_teacher_nfe100"] = teacher100["seconds_per_batch"] / row["seconds_per_batch"]
        summary[str(batch)] = entry

    print(f"\n{'method':<28}{'nfe':>5}{'batch':>7}{'ms/image':>12}{'images/s':>11}")
    for row in rows:
        print(
            f"{row['method']:<28}{row['nfe']:>5}{row['batch']:>7}{row['ms_per_image']:>12.2f}"
            f"{row['images_per_s']:>11.2f}"
        )
    for batch, entry in summary.items():
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry.items()))

    result = {
        "machine": machine,
        "device": device,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        # other processes on the machine skew every number: the 1-minute load averages at start and end
        "load_average": [load_at_start, os.getloadavg()[0]],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ort_threads": args.threads or "default",
        "onnxruntime": ort_version,
        "onnxruntime_cuda": "unmeasured: onnxruntime-gpu does not reach the lent GPU machine"
        if device == "cuda" and not any(r["method"] == "student onnxruntime CUDA" for r in rows)
        else None,
        "modes": modes,
        "ibmd_fast": ibmd_fast.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "synthetic": synthetic,
        "teacher": None if synthetic else os.path.abspath(teacher_path),
        "generator": None if synthetic else os.path.abspath(generator_path),
        "teacher_unet": teacher_config.get("unet"),
        "image": [channels, size, size],
        "student_nfe": nfe,
        "onnx": {k: report[k] for k in ("exporter", "opset", "precision", "parity")},
        "torch_compile": {"freezing": "compile" in modes, "error": compile_error},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "summary": summary,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    out = Path(args.out_dir) / f"inference-{machine}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
