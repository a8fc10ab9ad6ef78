"""The paper's recipes (``distill --recipe``) and the two ways a multi-step student trains.

- Recipes: ``--dry-run`` shows a recipe's values; a config file's keys override the recipe and
  the command line overrides both; the Python API does the same with keywords.
- ``multistep = "full"`` (MATH.md 5, the paper's I2SB students): the gradient of the student's
  whole chain, ``restore.student_chain(..., grad_chain=True)`` with the fused op's seeded
  posterior steps, against autograd of a plain float64 transcription written here from MATH.md
  2a and 3 (the I2SB schedule, the grid, the x0 parametrization, the posterior coefficients).
- ``multistep = "random-stop"`` (the DDBM students): the same chain cut at a grid step, its
  gradient through the last call only.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ibmd_fast import ops
from ibmd_fast.bridges import I2SBBridge
from ibmd_fast.cli import cli
from ibmd_fast.models import Generator, Teacher, build_unet
from ibmd_fast.restore import SeededNoise, student_grid, student_chain
from ibmd_fast.known_pixels import noise_like
from ibmd_fast.train.ibmd import DistillConfig
from ibmd_fast.train.ibmd import recipe_config
from ibmd_fast.train.recipes import RECIPES, apply_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, BATCH, NFE = 8, 2, 3


# ----------------------------------------------------------------------------
# Recipes


def _dry_run(*args) -> dict:
    result = CliRunner().invoke(cli, ["distill", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_prints(name):
    cfg = _dry_run("--recipe", name)
    recipe = RECIPES[name]
    assert cfg["recipe"] == name
    for key, value in recipe.settings.items():
        assert cfg[key] == value, key
    assert cfg["batch_size"] == 256 and cfg["ema_decay"] == 0.99
    assert cfg["multistep"] == ("full" if recipe.family == "i2sb" else "random-stop")


def test_recipe_values_from_the_paper():
    i2sb = [RECIPES[n] for n in ("sr4x-bicubic", "sr4x-pool", "jpeg-5", "jpeg-10")]
    assert all(
        r.settings["nfe"] == 1
        and r.settings["inner_steps"] == 5
        and r.settings["lr"] == 5e-5
        and r.settings["noise_input"]
        for r in i2sb
    )
    inpaint = RECIPES["inpaint-center"].settings
    assert inpaint["nfe"] == 4 and inpaint["noise_input"] is False and inpaint["multistep"] == "full"
    for task in ("e2h", "diode"):
        assert [RECIPES[f"{task}-{n}nfe"].settings["nfe"] for n in (1, 2)] == [1, 2]
        assert {RECIPES[f"{task}-{n}nfe"].settings["lr"] for n in (1, 2)} == {1e-5}
    dbim = RECIPES["dbim-inpaint-center"].settings
    assert (dbim["nfe"], dbim["inner_steps"], dbim["lr"]) == (4, 1, 3e-6)
    assert all("steps" not in r.settings for r in RECIPES.values())  # K is the user's


def test_explicit_options_override_the_recipe(tmp_path):
    cfg = _dry_run("--recipe", "dbim-inpaint-center", "--nfe", "2", "--inner-steps", "5", "--multistep", "full")
    assert (cfg["nfe"], cfg["inner_steps"], cfg["multistep"]) == (2, 5, "full")  # 5 is also the default
    assert cfg["lr"] == 3e-6 and cfg["batch_size"] == 256  # the rest from the recipe
    config = tmp_path / "c.yaml"
    config.write_text("lr: 2.0e-5\nbatch-size: 64\nrecipe: jpeg-10\n")
    cfg = _dry_run("--config", str(config), "--batch-size", "32")
    assert cfg["recipe"] == "jpeg-10" and cfg["lr"] == 2e-5 and cfg["batch_size"] == 32  # file < command line
    assert cfg["fake_lr"] == 5e-5 and cfg["inner_steps"] == 5  # recipe < file
    plain = _dry_run()
    assert plain["recipe"] == "" and plain["multistep"] == "random-stop" and plain["noise_input"] is True


def test_bad_recipe_and_multistep_are_one_line():
    for args in (["--recipe", "sr8x"], ["--multistep", "half"]):
        result = CliRunner().invoke(cli, ["distill", *args, "--dry-run"])
        assert result.exit_code == 2 and "Invalid value" in result.output
    with pytest.raises(ValueError, match="unknown recipe 'sr8x'"):
        DistillConfig(recipe="sr8x").validate()
    with pytest.raises(ValueError, match="--multistep must be one of full, random-stop"):
        DistillConfig(multistep="half").validate()


def test_python_api_applies_the_recipe_under_keywords():
    cfg = recipe_config("inpaint-center", nfe=2, batch_size=8)
    assert (cfg.nfe, cfg.batch_size, cfg.noise_input, cfg.multistep, cfg.lr) == (2, 8, False, "full", 5e-5)
    same = apply_recipe(DistillConfig(recipe="e2h-2nfe", lr=3e-5), keep={"lr"})
    assert (same.lr, same.fake_lr, same.nfe, same.multistep) == (3e-5, 1e-5, 2, "random-stop")
    assert apply_recipe(DistillConfig()) == DistillConfig()


def test_recipe_refuses_a_teacher_of_another_task(tmp_path):
    from ibmd_fast.train import distill

    with pytest.raises(ValueError, match="--recipe sr4x-pool is for I2SB sr4x-pool teachers"):
        distill(recipe="sr4x-pool", run_dir=str(tmp_path / "run"), device="cpu")  # the embedded inpainting teacher


def test_full_chain_recipe_distills(tmp_path):
    """A 2-NFE student without noise input, trained on its full chain, for two steps end to end."""
    from ibmd_fast.release import load_generator
    from ibmd_fast.train import distill

    summary = distill(
        recipe="inpaint-center",
        run_dir=str(tmp_path / "run"),
        device="cpu",
        nfe=2,
        steps=2,
        batch_size=2,
        inner_steps=1,
        eval_items=0,
        log_every=1,
        progress=False,
    )
    assert summary["steps"] == 2 and math.isfinite(summary["loss_theta"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["recipe"], config["multistep"], config["noise_input"]) == ("inpaint-center", "full", False)
    generator, release = load_generator(summary["release"])
    assert generator.z_channels == 0 and release["nfe"] == 2


# ----------------------------------------------------------------------------
# The student's full chain: gradient against a float64 transcription


def _student(seed=0) -> Generator:
    torch.manual_seed(seed)
    teacher = Teacher(build_unet("tiny", SIZE, 3, 3), I2SBBridge(), conditional=False)
    generator = Generator(teacher, multistep=True).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off ADM's zero-initialized output and z input
        for p in generator.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return generator


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    xT = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    weight = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    return xT, z, weight


def _transcribed_chain(net, xT, z, nfe, seeds, stop=1, detach_before_last=False, n_steps=1000, beta_max=0.3):
    """The student's chain in plain float64 arithmetic, from MATH.md alone.

    2a: beta = linspace(sqrt(1e-4), sqrt(beta_max/N), N)^2 made symmetric; std_fwd^2 = cumsum(beta);
    network time noise_level[n] = linspace(1e-4, 1, N)[n] * N; x0~ = x - std_fwd[n] * net([x, z], n).
    3: the grid space_indices(N, nfe + 1) without 0, visited from T down; the posterior step n -> s
    is coef_xt = std_fwd[s]^2/std_fwd[n]^2, coef_x0 = 1 - coef_xt, std = sqrt(std_fwd[s]^2
    (std_fwd[n]^2 - std_fwd[s]^2)/std_fwd[n]^2), with eps the fused op's Philox noise of each seed.
    """
    N = n_steps
    beta = torch.linspace(math.sqrt(1e-4), math.sqrt(beta_max / N), N, dtype=torch.float64) ** 2
    beta = torch.cat([beta[: N // 2], beta[: N // 2].flip(0)])
    var_fwd = torch.cumsum(beta, 0)
    noise_level = torch.linspace(1e-4, 1.0, N, dtype=torch.float64) * N
    grid = [round(i * (N - 1) / nfe) for i in range(nfe + 1)][1:]  # t_1 < ... < t_k

    def call(x, n):
        time = noise_level[n].float().expand(x.shape[0])  # the network's time input is float32
        return x - var_fwd[n].sqrt() * net(torch.cat([x, z], dim=1), time)

    x = xT
    for i in range(nfe - 1, stop - 1, -1):  # t_k .. t_{stop+1}
        n, s = grid[i], grid[i - 1]
        x0 = call(x, n)
        coef_xt = var_fwd[s] / var_fwd[n]
        std = torch.sqrt(var_fwd[s] * (var_fwd[n] - var_fwd[s]) / var_fwd[n])
        x = coef_xt * x + (1 - coef_xt) * x0 + std * noise_like(x.detach(), seeds.pop(0))
    if detach_before_last:
        x = x.detach()
    return call(x, grid[stop - 1]), grid


def _seeds(seed, count):
    gen = torch.Generator().manual_seed(seed)
    return [ops.draw_seed(gen) for _ in range(count)]


@pytest.mark.parametrize("stop, grad_chain", [(1, True), (2, False), (1, False)])
def test_chain_gradient_matches_float64_transcription(stop, grad_chain):
    """``grad_chain=True`` (multistep full): d/dtheta of <w, x0~> through all NFE calls and the
    fused posterior steps equals autograd of the transcription; without it (random-stop) only the
    last call carries the gradient, the chain before it being data."""
    generator = _student()
    xT, z, weight = _inputs()
    params = [p for p in generator.parameters() if p.requires_grad]

    x0 = student_chain(
        generator, xT, z, NFE, noise=SeededNoise(torch.Generator().manual_seed(7)), stop=stop, grad_chain=grad_chain
    )
    grads = torch.autograd.grad((weight * x0).sum(), params)

    ref, grid = _transcribed_chain(
        generator.net, xT, z, NFE, _seeds(7, NFE - stop), stop=stop, detach_before_last=not grad_chain
    )
    assert grid == student_grid(generator.bridge, NFE).tolist()
    ref_grads = torch.autograd.grad((weight * ref).sum(), params)

    torch.testing.assert_close(x0, ref, rtol=1e-10, atol=1e-10)
    for p, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    total = sum(g.abs().sum() for g in grads)
    assert total > 0
    if stop == 1 and not grad_chain:  # the stop-gradient drops the earlier calls' share: not the full gradient
        full, _ = _transcribed_chain(generator.net, xT, z, NFE, _seeds(7, NFE - 1))
        full_grads = torch.autograd.grad((weight * full).sum(), params)
        assert max((g - f).abs().max() for g, f in zip(grads, full_grads)) > 1e-6


def test_ibmd_generate_follows_multistep():
    """``IBMD.generate`` runs the whole chain with gradient for "full", and one call with
    gradient after a drawn stop for "random-stop"."""
    from ibmd_fast.train import IBMD
    from ibmd_fast.train.common import Precision
    from ibmd_fast.train.distributed import DistEnv

    calls = {}
    for mode in ("full", "random-stop"):
        torch.manual_seed(0)
        teacher = Teacher(build_unet("tiny", SIZE, 3, 3), I2SBBridge()).double()
        cfg = DistillConfig(batch_size=BATCH, nfe=NFE, device="cpu", multistep=mode)
        ibmd = IBMD(teacher, cfg, DistEnv(), Precision("fp32", torch.device("cpu")))
        seen = []
        hook = ibmd.generator.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
        xT, z, _ = _inputs()
        for _ in range(4):
            ibmd.generate(xT, z, None, grad=True)
        hook.remove()
        calls[mode] = seen
    assert calls["full"] == [True] * (4 * NFE)
    assert calls["random-stop"].count(True) == 4 and len(calls["random-stop"]) < 4 * NFE + 1
