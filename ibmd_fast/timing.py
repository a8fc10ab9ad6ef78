"""Timing and CUDA-graph capture: the one copy benchmarks, reports and `restore.timed_restore` use.

- ``synchronize(device)``: wait for queued GPU work (a no-op on the CPU), so a wall-clock time covers it.
- ``Stopwatch(device)``: seconds of a ``with`` block, synchronized before and after.
- ``measure(fn, device, ...)``: the median seconds of ``fn()`` over timed repeats after warm-up
  calls; on CUDA timed by CUDA events on the current stream (``events=True``) or by
  ``perf_counter`` around a synchronize (``events=False``: for work torch's stream does not see,
  such as onnxruntime's).
- ``capture_cuda_graph(fn)``: ``fn``'s GPU work as a ``torch.cuda.CUDAGraph`` (warm-up calls on
  a side stream first, as ``torch.cuda.graphs`` asks), and ``fn``'s output, the graph's static
  output that each ``graph.replay()`` overwrites.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["synchronize", "Stopwatch", "measure", "capture_cuda_graph"]

Device = Union[str, torch.device]


def _is_cuda(device: Device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: Device) -> None:
    """Wait for the GPU work queued on ``device`` (no-op on the CPU)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds of a ``with`` block, the GPU work queued in it included (``.seconds``)."""

    def __init__(self, device: Device = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def measure(
    fn: Callable[[], Any],
    device: Device = "cpu",
    warmup: int = 1,
    repeats: int = 10,
    budget: Optional[float] = None,
    warm: Optional[Callable[[], Any]] = None,
    events: bool = True,
) -> tuple[float, int]:
    """(median seconds of ``fn()``, number of timed calls).

    ``warm`` (default ``fn``) runs ``warmup`` times first, untimed. Then ``repeats`` timed calls,
    fewer (at least one) when ``budget`` seconds would be passed by the next. On CUDA with
    ``events`` each call is timed by a pair of CUDA events (GPU time of the current stream);
    otherwise by ``perf_counter`` with a synchronize after the call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        (warm or fn)()
    synchronize(device)
    use_events = events and _is_cuda(device)
    times: list[float] = []
    while True:
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - begin)
        if len(times) >= repeats or (budget is not None and sum(times) + times[-1] > budget):
            break
    return statistics.median(times), len(times)


def capture_cuda_graph(fn: Callable[[], Any], warmup: int = 3) -> tuple["torch.cuda.CUDAGraph", Any]:
    """(graph, output) of ``fn`` captured on the current device.

    ``warmup`` calls run on a side stream first (allocations and lazy initialisation stay out of
    the graph), then one call is captured. ``fn`` must read its inputs from tensors that stay in
    place (copy new inputs into them before ``graph.replay()``); the output is overwritten by each
    replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
