"""Importing released I2SB / DDBM / DBIM checkpoints (ibmd_fast.importers) and DDBM's VE bridge.

The exactness tests compare the imported teacher's ``predict_x0`` with transcriptions, written
here from the released code, of

- I2SB (NVlabs/I2SB ``i2sb/runner.py``, ``network.py``, ``diffusion.py``):
  ``compute_pred_x0(step, xt, net(xt, step, cond))`` with ``noise_levels = linspace(t0, T,
  interval) * interval`` (float32) and ``std_fwd = sqrt(cumsum(betas))`` (numpy float64 -> float32);
- DDBM / DBIM (alexzhou907/DDBM and thu-ml/DiffusionBridge ``ddbm/karras_diffusion.py``):
  ``denoise(model, x_t, t, xT=xT)[1]`` with ``get_scalings_and_weightings`` in float64.

Checkpoints are synthetic, in each source's exact layout (``diffusion_model.`` prefixes, the
torch_ema shadow list, options.pkl as a pickled Namespace with Paths, DDBM's 2-d attention convs,
DBIM's squeezed ones), with small configs and every weight random (ADM zero-inits its output
convolutions, which would make the network output 0 and the test vacuous).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch

from ibmd_fast.bridges import I2SBBridge, VEBridge, bridge_from_config
from ibmd_fast.models import UNet
from ibmd_fast.release import GENERATOR_FORMAT, load_teacher, read_release, save_release
from ibmd_fast.samplers import dbim_sample, heun_sample, probability_flow_coefficients
from ibmd_fast.importers import ImportedNet, import_teacher
from ibmd_fast.importers.unpickle import TeacherImportError, UnsafePickleError, restricted_load

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
# guided-diffusion create_model keywords of a small ADM (attention at 8 px, both orders tested)
GD_KWARGS = dict(
    image_size=SIZE,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    learn_sigma=False,
    class_cond=False,
    attention_resolutions="8",
    num_heads=2,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    dropout=0.0,
    resblock_updown=True,
    use_fp16=False,
    use_new_attention_order=False,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def random_unet(seed: int, **kwargs) -> UNet:
    """Our UNet (guided-diffusion's layout) with every parameter random, zero-inits included."""
    torch.manual_seed(seed)
    net = UNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return net.eval()


def small_unet_kwargs(in_channels: int, out_channels: int = 3, new_order=False, classes=None) -> dict:
    return dict(
        image_size=SIZE,
        in_channels=in_channels,
        model_channels=32,
        out_channels=out_channels,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=(1, 2),
        num_heads=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=new_order,
        num_classes=classes,
    )


# ----------------------------------------------------------------------------
# I2SB: checkpoint layout and transcription


def write_i2sb_run(
    folder: Path, cond: bool, interval=1000, beta_max=0.3, t0=1e-4, T=1.0, seed=0, kwargs_in_folder=True
):
    """An I2SB run folder: latest.pt (net with diffusion_model. keys, torch_ema state, optimizer,
    sched), options.pkl (a Namespace holding Paths) and the architecture pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = random_unet(seed, **small_unet_kwargs(6 if cond else 3))
    ema = random_unet(seed + 100, **small_unet_kwargs(6 if cond else 3))  # differs from raw everywhere
    torch.save(
        {
            "net": {f"diffusion_model.{k}": v for k, v in raw.state_dict().items()},
            "ema": {
                "decay": 0.99,
                "num_updates": 7,
                "shadow_params": [p.detach().clone() for p in ema.parameters()],
                "collected_params": None,
            },
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": list(range(5))}]},
            "sched": None,
        },
        folder / "latest.pt",
    )
    opt = argparse.Namespace(
        seed=0,
        name="test",
        image_size=SIZE,
        corrupt="sr4x-pool",
        t0=t0,
        T=T,
        interval=interval,
        beta_max=beta_max,
        ot_ode=False,
        clip_denoise=False,
        cond_x1=cond,
        add_x1_noise=False,
        batch_size=256,
        microbatch=2,
        lr=5e-5,
        ema=0.99,
        dataset_dir=PosixPath("/dataset"),
        log_dir=Path(".log"),
        ckpt_path=Path("results") / "test",
        load=None,
        device="cuda",
        distributed=False,
        use_fp16=False,
    )
    with open(folder / "options.pkl", "wb") as fh:
        pickle.dump(opt, fh)
    kw = dict(GD_KWARGS, in_channels=6) if cond else dict(GD_KWARGS)
    if cond:  # I2SB's cond pickle also carries the diffusion keywords; create_model ignores them
        kw.update(diffusion_steps=1000, noise_schedule="linear", timestep_respacing="250")
    name = f"256x256_diffusion_{'cond' if cond else 'uncond'}_fixedsigma.pkl"
    with open((folder if kwargs_in_folder else folder.parent) / name, "wb") as fh:
        pickle.dump(kw, fh)
    return raw, ema


def i2sb_reference_pred_x0(net_weights: UNet, opts: dict, xt, step, cond):
    """I2SB: ``Runner.compute_pred_x0(step, xt, Image256Net(xt, step, cond))``, transcribed."""
    interval = opts["interval"]
    # runner.make_beta_schedule + the symmetric concatenation (numpy float64)
    betas = np.linspace(1e-4**0.5, (opts["beta_max"] / interval) ** 0.5, interval, dtype=np.float64) ** 2
    betas = np.concatenate([betas[: interval // 2], np.flip(betas[: interval // 2])])
    std_fwd = torch.tensor(np.sqrt(np.cumsum(betas)), dtype=torch.float32)  # Diffusion: to_torch float32
    noise_levels = torch.linspace(opts["t0"], opts["T"], interval) * interval  # float32, as the Runner
    t = noise_levels[step]  # Image256Net.forward
    x = torch.cat([xt, cond], dim=1) if opts["cond_x1"] else xt
    net_out = net_weights(x, t)
    return xt - std_fwd[step].view(-1, 1, 1, 1) * net_out  # compute_pred_x0 (eq. 12 inverted)


@pytest.mark.parametrize("cond", [False, True])
def test_i2sb_import_is_exact(tmp_path, cond):
    opts = dict(interval=1000, beta_max=0.3, t0=1e-4, T=1.0, cond_x1=cond)
    raw, ema = write_i2sb_run(tmp_path / "run", cond)
    out = tmp_path / "teacher.safetensors"
    config = import_teacher(tmp_path / "run", "i2sb", out)
    assert config["conditional"] is cond and config["degradation"] == "sr4x-pool"
    src = config["source"]
    assert src["format"] == "i2sb" and src["file"] == "latest.pt" and len(src["sha256"]) == 64
    assert src["options"]["ckpt_path"] == "results/test" and src["options"]["interval"] == 1000
    teacher, _ = load_teacher(str(out))
    gen = torch.Generator().manual_seed(1)
    xt = torch.randn(4, 3, SIZE, SIZE, generator=gen)
    xT = torch.randn(4, 3, SIZE, SIZE, generator=gen)
    for n in (0, 1, 250, 500, 998, 999):
        step = torch.full((4,), n, dtype=torch.long)
        with torch.no_grad():
            ours = teacher.predict_x0(xt, step, xT if cond else None)
            ref = i2sb_reference_pred_x0(ema, opts, xt, step, xT)
            other = i2sb_reference_pred_x0(raw, opts, xt, step, xT)
        assert rel_err(ours, ref) <= 1e-5, n
        assert rel_err(ours - xt, other - xt) > 1e-2  # the EMA weights, not the raw ones, were imported


def test_i2sb_raw_weights_and_options(tmp_path):
    """--weights raw, a non-default interval / t0 / T / beta_max, and JSON model keywords."""
    opts = dict(interval=200, beta_max=1.0, t0=1e-3, T=0.9, cond_x1=False)
    raw, _ = write_i2sb_run(tmp_path / "run", False, interval=200, beta_max=1.0, t0=1e-3, T=0.9, kwargs_in_folder=False)
    (tmp_path / "kw.json").write_text(json.dumps(GD_KWARGS))
    out = tmp_path / "t.safetensors"
    import_teacher(tmp_path / "run" / "latest.pt", "i2sb", out, weights="raw", model_kwargs=str(tmp_path / "kw.json"))
    teacher, config = load_teacher(str(out))
    assert config["bridge"] == {
        "type": "i2sb",
        "n_steps": 200,
        "beta_max": 1.0,
        "ot_ode": False,
        "t0": 1e-3,
        "T": 0.9,
        "float32_levels": True,
    }
    xt = torch.randn(2, 3, SIZE, SIZE)
    for n in (0, 77, 199):
        step = torch.full((2,), n, dtype=torch.long)
        with torch.no_grad():
            assert rel_err(teacher.predict_x0(xt, step), i2sb_reference_pred_x0(raw, opts, xt, step, None)) <= 1e-5


def test_readers_return_what_they_found(tmp_path):
    """Each reader returns one frozen ImportedNet: the checkpoint, the loaded net, its bridge and task."""
    import dataclasses

    from ibmd_fast.bridges import I2SBBridge, VPBridge
    from ibmd_fast.importers.ddbm import read_ddbm
    from ibmd_fast.importers.i2sb import read_i2sb

    raw, ema = write_i2sb_run(tmp_path / "run", True, interval=200)
    found = read_i2sb(str(tmp_path / "run"), None, "ema", {})
    assert isinstance(found, ImportedNet) and found.checkpoint == str(tmp_path / "run" / "latest.pt")
    assert (found.conditional, found.image_size, found.channels, found.degradation) == (True, SIZE, 3, "sr4x-pool")
    assert isinstance(found.bridge, I2SBBridge) and found.bridge.config()["n_steps"] == 200
    assert found.info["options"]["interval"] == 200 and not found.net.training
    assert all(torch.equal(a, b) for a, b in zip(found.net.parameters(), ema.parameters()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.image_size = 32

    net = random_unet(3, **small_unet_kwargs(6))
    torch.save(net.state_dict(), tmp_path / "ema_0.9999_000100.pt")
    kw = dict(
        GD_KWARGS,
        in_channels=3,
        noise_schedule="vp",
        sigma_max=1.0,
        sigma_min=1e-4,
        condition_mode="concat",
        degradation="sketch",
    )
    (tmp_path / "kw.json").write_text(json.dumps(kw))
    found = read_ddbm(str(tmp_path / "ema_0.9999_000100.pt"), str(tmp_path / "kw.json"), None, {})
    assert (found.conditional, found.image_size, found.channels, found.degradation) == (True, SIZE, 3, "sketch")
    assert isinstance(found.bridge, VPBridge) and found.info["model_kwargs"]["noise_schedule"] == "vp"
    assert all(torch.equal(a, b) for a, b in zip(found.net.state_dict().values(), net.state_dict().values()))


def test_i2sb_default_architecture_is_adm256():
    from ibmd_fast.models import count_parameters
    from ibmd_fast.importers.i2sb import i2sb_default_kwargs
    from ibmd_fast.importers.weights import unet_kwargs

    with torch.device("meta"):
        net = UNet(**unet_kwargs(i2sb_default_kwargs(False), 3, 3))
    assert net.config["attention_resolutions"] == [8, 16, 32] and net.config["channel_mult"] == [1, 1, 2, 2, 4, 4]
    assert count_parameters(net) == 552_807_171  # guided-diffusion 256x256 uncond ADM with 3 output channels


# ----------------------------------------------------------------------------
# DDBM / DBIM: checkpoint layout and transcription


def dbim_abc(schedule: str, t: torch.Tensor, kw: dict):
    """DiffusionBridge ``NoiseSchedule.get_abc`` (float64), transcribed for vp, ve and i2sb."""
    t = t.double()
    if schedule == "vp":
        bd, bm = kw["beta_d"], kw["beta_min"]
        alpha_fn = lambda s: np.e ** (-0.5 * bm * s - 0.25 * bd * s**2)  # noqa: E731
        rho_fn = lambda s: (np.e ** (bm * s + 0.5 * bd * s**2) - 1).sqrt()  # noqa: E731
        alpha_T, rho_T = alpha_fn(1), rho_fn(torch.DoubleTensor([1])).item()
        alpha_t, rho_t = alpha_fn(t), rho_fn(t)
        alpha_bar, rho_bar = alpha_t / alpha_T, (rho_T**2 - rho_t**2).sqrt()
    elif schedule == "ve":
        rho_T = kw["sigma_max"]
        alpha_t, alpha_bar, rho_t = torch.ones_like(t), torch.ones_like(t), t
        rho_bar = (rho_T**2 - rho_t**2).sqrt()
    else:
        raise AssertionError(schedule)
    a = alpha_bar * rho_t**2 / rho_T**2
    b = alpha_t * rho_bar**2 / rho_T**2
    c = alpha_t * rho_bar * rho_t / rho_T
    return a, b, c


def dbim_i2sb_tables(beta_max=1.0, beta_min=0.1, n=1000):
    """DiffusionBridge ``I2SBNoiseSchedule`` / ``I2SBPreCond`` tables (std_fwd float64, levels float32)."""
    betas = torch.linspace((beta_min / n) ** 0.5, (beta_max / n) ** 0.5, n, dtype=torch.float64) ** 2
    betas = torch.cat([betas[: n // 2], torch.flip(betas[: n // 2], dims=(0,))])
    std_fwd = torch.sqrt(torch.cumsum(betas, dim=0))
    noise_levels = torch.linspace(1e-4, 1.0, n) * n
    return std_fwd, noise_levels


def ddbm_reference_denoise(net: UNet, kw: dict, x_t, t, xT, y=None):
    """``KarrasDenoiser.denoise(model, x_t, t, xT=xT)[1]`` with ``get_scalings_and_weightings``, transcribed."""
    schedule = kw["noise_schedule"]
    if schedule.startswith("i2sb"):
        std_fwd, levels = dbim_i2sb_tables(kw["beta_max"], kw["beta_min"])
        index = (999 * t).round().long()
        c_skip, c_in, c_out = torch.ones_like(t), torch.ones_like(t), -std_fwd[index]
        c_noise = levels[index]
    else:
        a, b, c = dbim_abc(schedule, t, kw)
        sd = sd_end = kw["sigma_data"]
        cov = kw["cov_xy"]
        A = a**2 * sd_end**2 + b**2 * sd**2 + 2 * a * b * cov + c**2
        c_in = 1 / A**0.5
        c_skip = (b * sd**2 + a * cov) / A
        c_out = (a**2 * (sd_end**2 * sd**2 - cov**2) + sd**2 * c**2) ** 0.5 * c_in
        c_noise = 1000 * 0.25 * torch.log(t + 1e-44)
    c_skip, c_in, c_out = (v.view(-1, 1, 1, 1) for v in (c_skip, c_in, c_out))
    # UNetModel.forward: concat condition, timesteps and input cast to the model dtype
    h = torch.cat([c_in * x_t, xT], dim=1).float()
    out = net(h, c_noise.float()) if y is None else net(h, c_noise.float(), y)
    return c_out * out + c_skip * x_t  # float64, as their code promotes


def ddbm_original_scalings(schedule: str, t: torch.Tensor, kw: dict):
    """alexzhou907/DDBM ``KarrasDenoiser.get_bridge_scalings`` (pred_mode ve / vp), transcribed:
    ``(c_skip, c_out, c_in)``."""
    sd = sd_end = kw["sigma_data"]
    cov, c, t = kw["cov_xy"], 1.0, t.double()
    if schedule == "ve":
        T = kw["sigma_max"]
        A = (
            t**4 / T**4 * sd_end**2
            + (1 - t**2 / T**2) ** 2 * sd**2
            + 2 * t**2 / T**2 * (1 - t**2 / T**2) * cov
            + c**2 * t**2 * (1 - t**2 / T**2)
        )
        c_in = 1 / A**0.5
        c_skip = ((1 - t**2 / T**2) * sd**2 + t**2 / T**2 * cov) / A
        c_out = ((t / T) ** 4 * (sd_end**2 * sd**2 - cov**2) + sd**2 * c**2 * t**2 * (1 - t**2 / T**2)) ** 0.5 * c_in
        return c_skip, c_out, c_in
    bd, bm = kw["beta_d"], kw["beta_min"]
    vp_logsnr = lambda s: -torch.log(torch.exp(0.5 * bd * torch.as_tensor(s) ** 2 + bm * torch.as_tensor(s)) - 1)  # noqa
    vp_logs = lambda s: -0.25 * torch.as_tensor(s) ** 2 * bd - 0.5 * torch.as_tensor(s) * bm  # noqa: E731
    logsnr_t, logsnr_T, logs_t, logs_T = vp_logsnr(t), vp_logsnr(1.0), vp_logs(t), vp_logs(1.0)
    a_t = (logsnr_T - logsnr_t + logs_t - logs_T).exp()
    b_t = -torch.expm1(logsnr_T - logsnr_t) * logs_t.exp()
    c_t = -torch.expm1(logsnr_T - logsnr_t) * (2 * logs_t - logsnr_t).exp()
    A = a_t**2 * sd_end**2 + b_t**2 * sd**2 + 2 * a_t * b_t * cov + c**2 * c_t
    c_in = 1 / A**0.5
    c_skip = (b_t * sd**2 + a_t * cov) / A
    c_out = (a_t**2 * (sd_end**2 * sd**2 - cov**2) + sd**2 * c**2 * c_t) ** 0.5 * c_in
    return c_skip, c_out, c_in


def test_ddbm_and_dbim_scalings_agree():
    """DDBM's own get_bridge_scalings and DBIM's get_abc-based ones are the same functions (both transcribed)."""
    for schedule, kw, times in (
        ("vp", dict(beta_d=2.0, beta_min=0.1), [1e-4, 0.3, 0.99]),
        ("ve", dict(sigma_max=80.0), [0.002, 5.0, 79.9]),
    ):
        kw = dict(kw, sigma_data=0.6, cov_xy=0.1)
        t = torch.tensor(times, dtype=torch.float64)
        a, b, c = dbim_abc(schedule, t, kw)
        A = a**2 * 0.36 + b**2 * 0.36 + 2 * a * b * 0.1 + c**2
        dbim = ((b * 0.36 + a * 0.1) / A, (a**2 * (0.36**2 - 0.01) + 0.36 * c**2) ** 0.5 / A**0.5, 1 / A**0.5)
        for ddbm, theirs in zip(ddbm_original_scalings(schedule, t, kw), dbim):
            # DDBM evaluates its VP logsnr_T = vp_logsnr(1, ...) on th.as_tensor(1): in float32
            torch.testing.assert_close(ddbm, theirs, rtol=1e-10 if schedule == "ve" else 1e-6, atol=0)
        bridge = (
            VEBridge(sigma_data=0.6, cov_xy=0.1)
            if schedule == "ve"
            else bridge_from_config({"type": "vp", "sigma_data": 0.6, "cov_xy": 0.1})
        )
        c_skip, c_out, c_in, _ = bridge.precond(t)
        for ours, theirs in zip((c_skip, c_out, c_in), dbim):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)


def _attention_keys(state: dict) -> list[str]:
    return [k for k in state if (".qkv." in k or ".proj_out." in k) and k.endswith("weight")]


def write_ddbm_ckpt(path: Path, net: UNet, layout: str) -> None:
    """``layout``: "ddbm" (alexzhou907/DDBM: 2-d attention convs [O, I, 1, 1]), "adapted" (DBIM's
    ``*_adapted.pt``: [O, I, 1]) or "squeezed" (fully squeezed [O, I])."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for key in _attention_keys(state):
        if layout == "ddbm":
            state[key] = state[key].unsqueeze(-1)
        elif layout == "squeezed":
            state[key] = state[key].squeeze(-1)
    torch.save(state, path)


DDBM_CASES = {
    # name: (kwargs for the import, kwargs of the transcription, checkpoint layout, times)
    "vp": (
        dict(noise_schedule="vp", beta_d=2.0, beta_min=0.1, sigma_max=1.0, sigma_min=1e-4),
        "ddbm",
        [1e-4, 0.05, 0.5, 0.9, 1.0],
    ),
    "ve": (
        dict(noise_schedule="ve", sigma_max=80.0, sigma_min=0.002, sigma_data=0.6, cov_xy=0.1),
        "squeezed",
        [0.002, 0.3, 10.0, 79.0, 80.0],
    ),
    "i2sb_cond": (
        dict(noise_schedule="i2sb_cond", beta_max=1.0, beta_min=0.1, sigma_max=1.0, sigma_min=1e-4),
        "adapted",
        [1e-4, 0.25, 0.5, 0.777, 1.0],
    ),
}


@pytest.mark.parametrize("case", sorted(DDBM_CASES))
def test_ddbm_import_is_exact(tmp_path, case):
    schedule_kw, layout, times = DDBM_CASES[case]
    kw = dict(
        image_size=SIZE,
        in_channels=3,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=2,
        num_head_channels=-1,
        use_new_attention_order=(case != "vp"),
        condition_mode="concat",
        sigma_data=0.5,
        cov_xy=0.0,
    )
    kw.update(schedule_kw)
    net = random_unet(3, **small_unet_kwargs(6, new_order=kw["use_new_attention_order"]))
    ckpt = tmp_path / "e2h_ema_0.9999_420000.pt"
    write_ddbm_ckpt(ckpt, net, layout)
    (tmp_path / "kw.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in kw.items()))
    out = tmp_path / "teacher.safetensors"
    config = import_teacher(ckpt, "ddbm", out, model_kwargs=str(tmp_path / "kw.yaml"))
    assert config["source"]["file"] == ckpt.name and config["conditional"] is True
    teacher, _ = load_teacher(str(out))
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    xT = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    for value in times:
        t = torch.full((3,), value, dtype=torch.float64)
        with torch.no_grad():
            ref = ddbm_reference_denoise(net, kw, x_t, t, xT)
            t_ours = (999 * t).round().long() if case == "i2sb_cond" else t  # DBIM's t -> I2SB step
            ours = teacher.predict_x0(x_t, t_ours, xT)
        assert rel_err(ours, ref) <= 1e-5, value


def test_presets_build_the_released_architectures():
    from ibmd_fast.importers.ddbm import PRESETS, ddbm_bridge, ddbm_kwargs
    from ibmd_fast.importers.weights import unet_kwargs

    expect = {  # DiffusionBridge scripts/args.sh on its model_and_diffusion_defaults()
        "e2h": (64, 192, 3, [2, 4, 8], [1, 2, 3, 4], True, None, 0.1, "vp"),
        "diode": (256, 256, 2, [8, 16, 32], [1, 1, 2, 2, 4, 4], True, None, 0.1, "vp"),
        "imagenet-inpaint": (256, 256, 2, [8, 16, 32], [1, 1, 2, 2, 4, 4], False, 1000, 0.0, "i2sb"),
    }
    for name, (size, ch, blocks, rates, mult, new_order, classes, dropout, bridge) in expect.items():
        kw = ddbm_kwargs(name, None, {})
        unet = unet_kwargs(kw, 6, 3)
        assert (
            unet["image_size"],
            unet["model_channels"],
            unet["num_res_blocks"],
            unet["attention_resolutions"],
            list(unet["channel_mult"]),
            unet["use_new_attention_order"],
            unet["num_classes"],
            unet["dropout"],
        ) == (size, ch, blocks, rates, mult, new_order, classes, dropout), name
        assert unet["num_heads"] == 4 and unet["num_head_channels"] == 64 and unet["resblock_updown"]
        assert unet["use_scale_shift_norm"] and kw["condition_mode"] == "concat"
        assert ddbm_bridge(kw).config()["type"] == bridge
    assert ddbm_bridge(ddbm_kwargs("e2h", None, {})).config() == {
        "type": "vp",
        "beta_min": 0.1,
        "beta_d": 2.0,
        "t_min": 1e-4,
        "t_max": 1.0,
    }
    assert ddbm_bridge(ddbm_kwargs("imagenet-inpaint", None, {})).config()["beta_max"] == 1.0
    assert set(PRESETS) == set(expect)


def test_class_conditional_teacher_samples_with_a_label(tmp_path):
    """DBIM's ImageNet inpainting preset: labels reach the U-Net; distilling it is refused in one message."""
    from ibmd_fast.importers.ddbm import PRESETS

    kw = dict(
        PRESETS["imagenet-inpaint"],
        image_size=SIZE,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=2,
        num_head_channels=-1,
        sigma_data=0.5,
        cov_xy=0.0,
    )
    net = random_unet(4, **small_unet_kwargs(6, classes=1000))
    ckpt = tmp_path / "imagenet256_inpaint_ema_0.9999_400000.pt"
    write_ddbm_ckpt(ckpt, net, "adapted")
    out = tmp_path / "t.safetensors"
    import_teacher(
        ckpt,
        "ddbm",
        out,
        preset="imagenet-inpaint",
        image_size=SIZE,
        label=207,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=2,
        num_head_channels=-1,
    )
    teacher, config = load_teacher(str(out))
    assert config["class_label"] == 207 and config["degradation"] == "inpaint-center"
    x_t, xT = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    y = torch.tensor([207, 3])
    with torch.no_grad():
        ref = ddbm_reference_denoise(net, kw, x_t, t, xT, y)
        step = (999 * t).round().long()
        assert rel_err(teacher.predict_x0(x_t, step, xT, y=y), ref) <= 1e-5
        default = teacher.predict_x0(x_t, step, xT)  # class_label for every image
        assert rel_err(default[:1], ref[:1]) <= 1e-5 and rel_err(default[1:], ref[1:]) > 1e-3
        x0 = dbim_sample(lambda x, s: teacher.predict_x0(x, s, xT), teacher.bridge, xT, 2, seed=0)
    assert torch.isfinite(x0).all()
    teacher.class_label = None
    with pytest.raises(ValueError, match="class-conditional .* needs a class label"):
        teacher.predict_x0(x_t, step, xT)

    from ibmd_fast.train import distill

    with pytest.raises(
        ValueError, match=r"class-conditional \(1000 classes\) but the data .skimage. has no class labels"
    ):
        distill(
            run_dir=str(tmp_path / "d"),
            teacher=str(out),
            data="skimage",
            steps=1,
            device="cpu",
            progress=False,
            eval_items=0,
        )


# ----------------------------------------------------------------------------
# Safety and bad input


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    write_i2sb_run(tmp_path / "run", False)
    for payload in (argparse.Namespace(interval=1000, evil=_Evil(target)), _Evil(target)):
        with open(tmp_path / "run" / "options.pkl", "wb") as fh:
            pickle.dump(payload, fh)
        with pytest.raises(UnsafePickleError, match="refusing to unpickle .*system"):
            import_teacher(tmp_path / "run", "i2sb", tmp_path / "out.safetensors")
        assert not target.exists() and not (tmp_path / "out.safetensors").exists()
    # the same file really would create it under plain pickle: the test is not vacuous
    pickle.loads(pickle.dumps(_Evil(target)))
    assert target.exists()


def test_restricted_load_allows_plain_options(tmp_path):
    value = argparse.Namespace(p=Path("a/b"), s={1, 2}, f=frozenset(), c=1j, b=b"x", l=[1, (2, 3)], n=None)
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "o.pkl").write_bytes(pickle.dumps(value, protocol=protocol))
        loaded = restricted_load(tmp_path / "o.pkl")
        assert vars(loaded) == vars(value), protocol


def test_bad_inputs_one_clear_message_each(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TeacherImportError, match="has no latest.pt"):
        import_teacher(empty, "i2sb", tmp_path / "o.safetensors")
    write_i2sb_run(tmp_path / "run", False)
    os.remove(tmp_path / "run" / "options.pkl")
    with pytest.raises(TeacherImportError, match="no options.pkl"):
        import_teacher(tmp_path / "run", "i2sb", tmp_path / "o.safetensors")

    net = random_unet(0, **small_unet_kwargs(6))
    ckpt = tmp_path / "model_100000.pt"
    write_ddbm_ckpt(ckpt, net, "adapted")
    base = dict(
        image_size=SIZE,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=2,
        num_head_channels=-1,
        condition_mode="concat",
        noise_schedule="vp",
        sigma_max=1.0,
    )
    (tmp_path / "kw.json").write_text(json.dumps({**base, "num_channels": 64}))
    with pytest.raises(
        TeacherImportError,
        match=r"first mismatched key 'time_embed.0.weight': "
        r"checkpoint \(128, 32\) vs model \(256, 64\)",
    ):
        import_teacher(ckpt, "ddbm", tmp_path / "o.safetensors", model_kwargs=str(tmp_path / "kw.json"))
    (tmp_path / "kw.json").write_text(json.dumps({**base, "noise_schedule": "cosine"}))
    with pytest.raises(TeacherImportError, match="unknown noise_schedule 'cosine'"):
        import_teacher(ckpt, "ddbm", tmp_path / "o.safetensors", model_kwargs=str(tmp_path / "kw.json"))
    with pytest.raises(TeacherImportError, match="pass --model-kwargs FILE or --preset"):
        import_teacher(ckpt, "ddbm", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()

    generator = tmp_path / "generator.safetensors"
    save_release(str(generator), net, GENERATOR_FORMAT, {"unet": net.config})
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07onnx")
    for source, fmt, what in (
        (generator, "ddbm", "generator release"),
        (generator, "i2sb", "generator release"),
        (onnx_file, "ddbm", "ONNX model"),
    ):
        with pytest.raises(TeacherImportError, match=what):
            import_teacher(source, fmt, tmp_path / "o.safetensors", preset="e2h")


def test_cli_import_teacher(tmp_path):
    from tests.test_cli import assert_one_error_line, invoke

    write_i2sb_run(tmp_path / "run", True)
    result = invoke(
        "import-teacher",
        tmp_path / "run",
        "--format",
        "i2sb",
        "--out",
        tmp_path / "t.safetensors",
        "--beta-max",
        "0.5",
        "--image-size",
        str(SIZE),
    )
    assert result.exit_code == 0, result.output
    assert "teacher release" in result.stdout and read_release(str(tmp_path / "t.safetensors"))[1]["conditional"]
    config = read_release(str(tmp_path / "t.safetensors"))[1]
    assert config["bridge"]["beta_max"] == 0.5 and config["image_size"] == SIZE == config["unet"]["image_size"]
    result = invoke(
        "import-teacher",
        tmp_path / "run",
        "--format",
        "i2sb",
        "--out",
        tmp_path / "u.safetensors",
        "--sigma-data",
        "0.3",
    )
    assert_one_error_line(result, "unknown I2SB setting", "sigma_data")
    os.remove(tmp_path / "run" / "latest.pt")
    result = invoke("import-teacher", tmp_path / "run", "--format", "i2sb", "--out", tmp_path / "u.safetensors")
    assert_one_error_line(result, "has no latest.pt")


# ----------------------------------------------------------------------------
# The VE bridge (DDBM, alpha = 1, rho_t = t)


def test_ve_marginal_matches_ddbm_float64():
    bridge = VEBridge(sigma_max=80.0, sigma_min=0.002)
    t = torch.tensor([0.002, 0.1, 1.0, 20.0, 56.5, 79.99, 80.0], dtype=torch.float64)
    coef_x0, coef_xT, std = bridge.marginal(t)
    # DDBM training_bridge_losses, pred_mode 've'
    mu_xT, mu_x0 = t**2 / 80.0**2, 1 - t**2 / 80.0**2
    std_t = t * torch.sqrt(1 - t**2 / 80.0**2)
    torch.testing.assert_close(coef_xT, mu_xT, rtol=1e-14, atol=0)
    torch.testing.assert_close(coef_x0, mu_x0, rtol=1e-14, atol=1e-17)
    torch.testing.assert_close(std, std_t, rtol=1e-14, atol=0)
    assert (
        bridge_from_config(bridge.config()).config()
        == bridge.config()
        == {"type": "ve", "sigma_max": 80.0, "sigma_min": 0.002}
    )
    # loss weight: DDBM's 'bridge_karras' weighting for ve is 1 / c_out^2
    A = t**4 / 80**4 * 0.25 + (1 - t**2 / 80**2) ** 2 * 0.25 + t**2 * (1 - t**2 / 80**2)
    weight = A / ((t / 80) ** 4 * 0.25**2 + 0.25 * t**2 * (1 - t**2 / 80**2))
    torch.testing.assert_close(bridge.loss_weight(t[:-1]), weight[:-1], rtol=1e-12, atol=0)


def test_ve_posterior_composes_to_the_marginal():
    """Marginal at t, then the posterior t -> s with the true x0, is the marginal at s (mean and variance)."""
    bridge = VEBridge()
    s = torch.tensor([0.002, 1.0, 30.0, 50.0], dtype=torch.float64)
    t = torch.tensor([0.5, 40.0, 60.0, 80.0], dtype=torch.float64)
    k0, kt, sigma = bridge.posterior(s, t)
    b_t, a_t, c_t = bridge.marginal(t)
    b_s, a_s, c_s = bridge.marginal(s)
    torch.testing.assert_close(kt * b_t + k0, b_s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(kt * a_t, a_s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(kt**2 * c_t**2 + sigma**2, c_s**2, rtol=1e-12, atol=1e-15)
    # the Gaussian conditioning of a Brownian path with variance t^2: x_s | x_t, x0
    torch.testing.assert_close(kt, s**2 / t**2, rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma, s * torch.sqrt(1 - s**2 / t**2), rtol=1e-14, atol=0)


def test_ve_marginal_dt_matches_finite_differences():
    bridge = VEBridge()
    t = torch.tensor([0.01, 1.0, 20.0, 70.0], dtype=torch.float64)
    h = 1e-6 * t
    numeric = [(p - m) / (2 * h) for p, m in zip(bridge.marginal(t + h), bridge.marginal(t - h))]
    for got, want in zip(bridge.marginal_dt(t), numeric):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert probability_flow_coefficients(bridge, t)[0].isfinite().all()


def test_ve_sampler_steps():
    """A DBIM step (eta = 1) is the posterior step; Heun and DBIM with an oracle for a point mass
    end at that point."""
    bridge = VEBridge()
    x0 = torch.full((2, 3, 4, 4), 0.3, dtype=torch.float64)
    xT = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    states = []
    out = dbim_sample(lambda x, t: x0, bridge, xT, 1, eta=1.0, seed=5, callback=states.append)
    s, t = torch.full((2,), bridge.t_min, dtype=torch.float64), torch.full((2,), bridge.T, dtype=torch.float64)
    k0, kt, sigma = bridge.posterior(s, t)
    noise = (states[0]["x"] - kt.view(-1, 1, 1, 1) * xT - k0.view(-1, 1, 1, 1) * x0) / sigma.view(-1, 1, 1, 1)
    assert abs(float(noise.std()) - 1.0) < 0.3 and torch.equal(out, x0)  # the rest is unit Gaussian noise
    for sampler in (
        lambda f: heun_sample(f, bridge, xT, 8, seed=0, callback=states.append),
        lambda f: dbim_sample(f, bridge, xT, 8, eta=0.0, seed=0, callback=states.append),
    ):
        states.clear()
        sampler(lambda x, t: x0)
        final = states[-1]["x"]  # the state at t_min = 0.002: within a few c_{t_min} of x0
        assert float((final - x0).abs().max()) < 0.02


# ----------------------------------------------------------------------------
# End to end: import -> distill -> sample -> export


def test_end_to_end_import_distill_sample_export(tmp_path):
    from ibmd_fast.release import load_model
    from ibmd_fast.restore import restore_with_generator
    from ibmd_fast.onnx import export_onnx
    from ibmd_fast.train import distill

    write_i2sb_run(tmp_path / "i2sb", False, interval=50)
    net = random_unet(5, **small_unet_kwargs(6, new_order=True))
    ckpt = tmp_path / "e2h_ema_0.9999_420000.pt"
    write_ddbm_ckpt(ckpt, net, "ddbm")
    small = dict(
        image_size=SIZE,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=2,
        num_head_channels=-1,
    )
    releases = {
        "i2sb": import_teacher(tmp_path / "i2sb", "i2sb", tmp_path / "i2sb.safetensors", nfe=4),
        "ddbm": import_teacher(
            ckpt, "ddbm", tmp_path / "ddbm.safetensors", preset="e2h", nfe=4, degradation="sr4x-bicubic", **small
        ),
        "ve": import_teacher(
            ckpt,
            "ddbm",
            tmp_path / "ve.safetensors",
            preset="e2h",
            nfe=4,
            noise_schedule="ve",
            sigma_max=80.0,
            sigma_min=0.002,
            degradation="jpeg-10",
            **small,
        ),
    }
    assert releases["ddbm"]["bridge"]["type"] == "vp" and releases["ve"]["bridge"]["type"] == "ve"
    for name in releases:
        summary = distill(
            run_dir=str(tmp_path / f"run-{name}"),
            teacher=str(tmp_path / f"{name}.safetensors"),
            data="skimage",
            image_size=SIZE,
            batch_size=2,
            steps=2,
            inner_steps=1,
            log_every=1,
            ckpt_every=2,
            eval_items=0,
            device="cpu",
            progress=False,
            lr=1e-6,
            fake_lr=1e-6,
        )
        assert np.isfinite(summary["loss_theta"]) and np.isfinite(summary["loss_phi"])
        student = load_model(summary["release"], expect="generator")
        xT = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
        restored = restore_with_generator(student.model, xT, seed=0)
        assert restored.shape == xT.shape and torch.isfinite(restored).all()
        # the TorchScript exporter: ~10x faster here than the dynamo one, which tests/test_onnx.py covers
        report = export_onnx(summary["release"], str(tmp_path / f"{name}.onnx"), progress=False, exporter="torchscript")
        assert os.path.exists(tmp_path / f"{name}.onnx") and report["exporter"] == "torchscript"


# ----------------------------------------------------------------------------
# Full size (slow: excluded by default, run with `python -m pytest -m slow tests/test_importers.py`)

_MEASURE = """
import json, resource, sys, time
started = time.perf_counter()
{body}
print("MEASURED " + json.dumps({{"seconds": time.perf_counter() - started,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def _measured(body: str, cwd) -> dict:
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE.format(body=body)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("MEASURED ")][-1]
    return json.loads(line[len("MEASURED ") :])


@pytest.mark.slow
def test_adm256_import_memory_and_sample(tmp_path):
    """A 552M-parameter I2SB ADM-256 run folder imports with peak memory under 3x its weights,
    and ``ibmd-fast sample`` runs the teacher at NFE 1 on a 256x256 image."""
    from PIL import Image

    from ibmd_fast.models import count_parameters
    from ibmd_fast.importers.i2sb import i2sb_default_kwargs
    from ibmd_fast.importers.weights import unet_kwargs

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    net = UNet(**unet_kwargs(i2sb_default_kwargs(False), 3, 3))
    params = count_parameters(net)
    assert params == 552_807_171
    weight_bytes = 4 * params
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
        shadow = [p.detach() * 0.999 for p in net.parameters()]
    torch.save(
        {
            "net": {f"diffusion_model.{k}": v for k, v in net.state_dict().items()},
            "ema": {"decay": 0.99, "num_updates": 1, "shadow_params": shadow},
            "optimizer": {},
            "sched": None,
        },
        run / "latest.pt",
    )
    del net, shadow
    with open(run / "options.pkl", "wb") as fh:
        pickle.dump(
            argparse.Namespace(
                interval=1000,
                beta_max=0.3,
                t0=1e-4,
                T=1.0,
                ot_ode=False,
                cond_x1=False,
                corrupt="sr4x-pool",
                image_size=256,
                ckpt_path=Path("results/sr4x"),
            ),
            fh,
        )
    imported = _measured(
        f"from ibmd_fast.importers import import_teacher\n"
        f"import_teacher({str(run)!r}, 'i2sb', {str(tmp_path / 't.safetensors')!r})",
        tmp_path,
    )
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    sampled = _measured(
        "from ibmd_fast.cli import main\n"
        "try:\n"
        f"    main(['sample', '--model', {str(tmp_path / 't.safetensors')!r}, '--input', "
        f"{str(tmp_path / 'in.png')!r}, '--output', {str(tmp_path / 'out')!r}, '--nfe', '1', '--device', 'cpu'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code",
        tmp_path,
    )
    print(
        f"\nADM-256 ({params} parameters, {weight_bytes / 2**30:.2f} GiB): import {imported['seconds']:.1f} s, "
        f"peak RSS {imported['peak_rss_bytes'] / 2**30:.2f} GiB ({imported['peak_rss_bytes'] / weight_bytes:.2f}x); "
        f"sample NFE 1 at 256x256 {sampled['seconds']:.1f} s, peak RSS {sampled['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    assert imported["peak_rss_bytes"] < 3 * weight_bytes
    assert list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_adm256_student_onnx_export_and_runner(tmp_path):
    """A student of the 552.8M-parameter ADM-256 teacher exports with ``ibmd-fast export --onnx`` in
    float32 (2.06 GiB: over protobuf's 2 GiB, so model.onnx + model.onnx.data) and in float16 (one
    file), each passes the parity check, and both run in export/run_onnx.py on a 256x256 image
    after being moved to another folder; the float32 result there matches PyTorch at 256x256.

    The parity check runs at shapes near a 64 px example (``--example-size 64``: 1x96x128 and
    3x32x96), the 256x256 comparison is the runner's against ``Generator`` in PyTorch."""
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from ibmd_fast.models import Generator, Teacher, count_parameters
    from ibmd_fast.release import load_generator
    from ibmd_fast.importers.i2sb import i2sb_default_kwargs
    from ibmd_fast.importers.weights import unet_kwargs

    torch.manual_seed(0)
    net = UNet(**unet_kwargs(i2sb_default_kwargs(False), 3, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    generator = Generator(Teacher(net, I2SBBridge()))
    with torch.no_grad():
        generator.net.input_blocks[0][0].weight[:, 3:].normal_(0, 0.02)  # the z input is live
    params = count_parameters(generator.net)
    assert params > 552_807_171
    release = tmp_path / "student.safetensors"
    save_release(
        str(release),
        generator.net,
        GENERATOR_FORMAT,
        {
            **generator.config(),
            "nfe": 1,
            "degradation": "jpeg-10",
            "image_size": 256,
            "channels": 3,
            "inpainting": False,
        },
    )
    del net, generator

    rng = np.random.default_rng(0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(inputs / "in.png")
    runner = Path(__file__).resolve().parents[1] / "export" / "run_onnx.py"
    figures = {"parameters": params}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision / "model.onnx"
        args = [
            "export",
            "--onnx",
            "--model",
            str(release),
            "--output",
            str(out),
            "--example-size",
            "64",
            "--no-progress",
        ] + (["--fp16"] if precision == "fp16" else [])
        exported = _measured(
            "from ibmd_fast.cli import main\n"
            "try:\n"
            f"    main({args!r})\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code",
            tmp_path,
        )
        files = sorted(os.listdir(out.parent))
        sizes = {name: (out.parent / name).stat().st_size for name in files}
        if precision == "fp32":
            assert files == ["model.onnx", "model.onnx.data"]
            assert sizes["model.onnx.data"] > 2**31 > sizes["model.onnx"]
        else:
            assert files == ["model.onnx"] and sizes["model.onnx"] < 2**31

        moved = tmp_path / f"{precision}-moved"
        shutil.move(str(out.parent), str(moved))
        result_dir = tmp_path / f"{precision}-out"
        command = [
            sys.executable,
            str(runner),
            "--model",
            str(moved / "model.onnx"),
            "--input",
            str(inputs),
            "--output",
            str(result_dir),
            "--seed",
            "7",
            "--provider",
            "cpu",
            "--quiet",
        ]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        run_seconds = time.perf_counter() - started
        assert proc.returncode == 0, proc.stderr[-3000:]
        out_png = np.asarray(Image.open(result_dir / "in.png"))
        assert out_png.shape == (256, 256, 3)
        figures[precision] = {
            "export_seconds": round(exported["seconds"], 1),
            "export_peak_rss_gib": round(exported["peak_rss_bytes"] / 2**30, 2),
            "files_bytes": sizes,
            "runner_256px_seconds": round(run_seconds, 1),
        }
        figures[precision + "_png"] = out_png

    # The runner's float32 result at 256x256 against PyTorch (z as the runner draws it).
    generator, _ = load_generator(str(release))
    xT = torch.from_numpy(np.asarray(Image.open(inputs / "in.png"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
    z = torch.from_numpy(np.random.default_rng(7).standard_normal((3, 256, 256), dtype=np.float32))
    with torch.no_grad():
        expected = generator(xT[None], z[None])[0]
    expected = np.clip(np.round((expected.numpy() + 1) * 127.5), 0, 255).astype(np.int16).transpose(1, 2, 0)
    diff32 = np.abs(figures.pop("fp32_png").astype(np.int16) - expected)
    diff16 = np.abs(figures.pop("fp16_png").astype(np.int16) - expected)
    figures["fp32_vs_pytorch_256px_uint8"] = {"max": int(diff32.max()), "share_off": float((diff32 > 0).mean())}
    figures["fp16_vs_pytorch_fp32_256px_uint8"] = {"max": int(diff16.max()), "mean": float(diff16.mean())}
    print("\nADM-256 student ONNX: " + json.dumps(figures))
    assert diff32.max() <= 1 and (diff32 > 0).mean() < 0.01
