"""ibmd_fast.timing: the Stopwatch, measure's warm-up / repeats / budget, and CUDA-graph capture (GPU only)."""

import time

import pytest
import torch

from ibmd_fast.timing import Stopwatch, capture_cuda_graph, measure


def test_stopwatch_times_its_block():
    with Stopwatch("cpu") as watch:
        time.sleep(0.05)
    assert 0.04 <= watch.seconds < 1.0


def test_measure_warms_up_then_times_repeats():
    calls = {"fn": 0, "warm": 0}

    def fn():
        calls["fn"] += 1
        time.sleep(0.03 if calls["fn"] % 2 else 0.01)  # calls 1, 3, 5 slow: the median is a slow one

    median, runs = measure(fn, "cpu", warmup=2, repeats=5, warm=lambda: calls.__setitem__("warm", calls["warm"] + 1))
    assert runs == 5 and calls == {"fn": 5, "warm": 2}
    assert 0.025 <= median < 0.5  # three of the five timed calls are the slow ones

    calls["fn"] = 0
    median, runs = measure(fn, "cpu", warmup=0, repeats=100, budget=0.05)
    assert 1 <= runs < 10 and calls["fn"] == runs  # the budget stops the repeats early
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure(fn, "cpu", repeats=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_replays_on_new_inputs():
    x = torch.randn(1000, device="cuda")
    graph, out = capture_cuda_graph(lambda: torch.sin(x) * 2)
    x.copy_(torch.linspace(-1, 1, 1000, device="cuda"))
    graph.replay()
    torch.testing.assert_close(out, torch.sin(x) * 2)
    for events in (True, False):
        median, runs = measure(graph.replay, "cuda", warmup=1, repeats=3, events=events)
        assert runs == 3 and 0 < median < 1.0
