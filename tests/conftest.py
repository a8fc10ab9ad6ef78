"""Fixtures shared by the test modules, and the expected-backend check."""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module, restored after it: the tiny networks of the tests run on
    shared cores, where thread start-up and contention cost more than they give. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_smooth_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` smooth random RGB PNGs of 24x20 (5x6 noise, bicubic up) in ``root``: a folder the
    trainers crop to 16 px. The training, loop and fault tests share it."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((24, 20), Image.BICUBIC).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """8 smooth images (``write_smooth_images``): two batches of 4 per epoch."""
    return write_smooth_images(tmp_path_factory.mktemp("images"), 8)


def teacher_kwargs(run_dir, image_dir, **overrides) -> dict:
    """Settings of a 4-step teacher run on ``image_dir`` (checkpoints every 2 steps) that the training,
    loop and fault tests share; ``overrides`` change any of them."""
    kwargs = dict(
        run_dir=str(run_dir),
        data=f"folder:{image_dir}",
        image_size=16,
        batch_size=4,
        n_steps=50,
        steps=4,
        lr=1e-3,
        log_every=1,
        ckpt_every=2,
        sample_nfe=2,
        device="cpu",
        progress=False,
    )
    kwargs.update(overrides)
    return kwargs


def run_torchrun(cmd: list, cwd, env: dict, timeout: float) -> str:
    """Run a ``torch.distributed.run`` command and return its output (stdout and stderr together),
    asserting that it ended within ``timeout`` seconds with exit 0. It runs in a session of its own,
    so a hang is cleaned up with the workers torchrun started."""
    proc = subprocess.Popen(
        cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("torchrun timed out:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    return output


def pytest_configure(config):
    """``IBMD_FAST_EXPECT_BACKEND=compiled-cpu`` (set by .ci/run): stop before collecting anything when the
    ops run on another backend, so that tests comparing the kernels with the reference cannot pass by
    comparing the reference with itself after the extension failed to build or import."""
    expected = os.environ.get("IBMD_FAST_EXPECT_BACKEND", "")
    if not expected:
        return
    from ibmd_fast import ops

    if ops.backend() != expected:
        reason = f" ({ops._ext_error})" if ops._ext_error else ""
        raise pytest.UsageError(
            f"IBMD_FAST_EXPECT_BACKEND={expected} but ibmd_fast.ops.backend() is {ops.backend()!r}{reason}"
        )
