"""ADM U-Net (guided-diffusion compatibility) and teacher / generator / fake wrappers."""

import math
import os

import pytest
import torch

from ibmd_fast.bridges import Bridge
from ibmd_fast.models import (
    Generator,
    Teacher,
    UNet,
    attention_rates,
    build_unet,
    count_parameters,
    load_checkpoint_file,
    load_state_dict_checked,
    make_fake_model,
    timestep_embedding,
)
from ibmd_fast.models.unet import CONFIGS
from ibmd_fast.models.blocks import QKVAttention, QKVAttentionLegacy
from ibmd_fast.restore import student_chain


# tiny convolutions on shared cores: one thread per module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# guided-diffusion 256x256_diffusion_uncond.pt (learn_sigma: 6 output channels)
ADM256_UNCOND_PARAMS = 552_814_086


# ----------------------------------------------------------------------------
# helpers


class StubI2SB(Bridge):
    """Stand-in for ibmd_fast.bridges.I2SBBridge: only what the wrappers use (and ``Bridge.times``)."""

    is_discrete = True

    def __init__(self, n_steps=50):
        self.n_steps = n_steps
        self.T = n_steps - 1
        self.std_fwd = torch.linspace(0.05, 1.0, n_steps, dtype=torch.float64)

    def net_time(self, t):
        return (torch.linspace(1e-4, 1.0, self.n_steps, dtype=torch.float64) * self.n_steps)[t.cpu()].float()

    def config(self):
        return {"type": "i2sb", "n_steps": self.n_steps}


class StubVP(Bridge):
    """Stand-in for ibmd_fast.bridges.VPBridge."""

    is_discrete = False
    T = 1.0

    def precond(self, t):
        t = t.double()
        c_skip = 1.0 / (1.0 + t)
        c_out = t.sqrt() + 0.1
        c_in = 1.0 / torch.sqrt(1.0 + t * t)
        c_noise = 250.0 * torch.log(t + 1e-3)
        return tuple(c.float() for c in (c_skip, c_out, c_in, c_noise))

    def net_time(self, t):
        return self.precond(t)[3]

    def config(self):
        return {"type": "vp"}


def randomize(module, seed=0, scale=0.2):
    """Give every parameter (also the zero-initialized ones) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def tiny(in_channels=3, out_channels=3, seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(build_unet("tiny", 16, in_channels, out_channels, **overrides).eval(), seed)


def inputs(batch=2, channels=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.tensor([3.0, 517.5])[:batch]


# ----------------------------------------------------------------------------
# parameter counts and state-dict layout


def test_parameter_counts_per_config():
    assert set(CONFIGS) >= {"tiny", "small", "adm256"}
    assert count_parameters(build_unet("tiny", 32, 3, 3)) < 1_000_000
    with torch.device("meta"):
        small = build_unet("small", 64, 6, 3)
        adm = build_unet("adm256", 256, 3, 6)
        i2sb_cond = build_unet("adm256", 256, 6, 3)
    assert 5_000_000 <= count_parameters(small) <= 15_000_000
    assert count_parameters(adm) == ADM256_UNCOND_PARAMS
    # I2SB: sigma output channels dropped (3 out), conditional: 3 extra input channels
    assert count_parameters(i2sb_cond) == ADM256_UNCOND_PARAMS - 3 * (256 * 9 + 1) + 3 * 256 * 9


def test_adm256_state_dict_names_and_shapes():
    with torch.device("meta"):
        net = build_unet("adm256", 256, 3, 6)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {
        "time_embed.0.weight": (1024, 256),
        "time_embed.2.weight": (1024, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (256,),
        "input_blocks.1.0.in_layers.2.weight": (256, 256, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # scale-shift: 2 * out_channels
        "input_blocks.1.0.out_layers.0.weight": (256,),
        "input_blocks.1.0.out_layers.3.weight": (256, 256, 3, 3),
        "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # ResBlock down (resblock_updown)
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.10.1.norm.weight": (512,),  # first attention at rate 8
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),
        "input_blocks.10.1.proj_out.weight": (512, 512, 1),
        "middle_block.0.in_layers.2.weight": (1024, 1024, 3, 3),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.2.out_layers.3.bias": (1024,),
        "output_blocks.0.0.in_layers.0.weight": (2048,),
        "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
        "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),  # ResBlock up
        "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
        "out.0.weight": (256,),
        "out.2.weight": (6, 256, 3, 3),
        "out.2.bias": (6,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, (key, shapes.get(key), shape)
    assert len(net.input_blocks) == 18 and len(net.output_blocks) == 18
    assert "input_blocks.9.1.qkv.weight" not in shapes  # no attention at rate 4
    assert not any(k.startswith("label_emb") for k in shapes)
    assert net.config["attention_resolutions"] == attention_rates(256, "32,16,8") == [8, 16, 32]


def test_resample_and_label_names():
    net = build_unet("tiny", 16, 3, 3, resblock_updown=False, num_classes=10)
    keys = set(net.state_dict())
    assert "input_blocks.2.0.op.weight" in keys  # Downsample conv
    assert "output_blocks.1.2.conv.weight" in keys  # Upsample conv after ResBlock + attention
    assert "input_blocks.3.1.qkv.weight" in keys
    assert net.label_emb.weight.shape == (10, 128)
    x, t = inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    assert net(x, t, y=torch.tensor([1, 7])).shape == x.shape


def test_config_is_json_and_rebuilds():
    import json

    net = tiny()
    cfg = json.loads(json.dumps(net.config))
    rebuilt = UNet(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="unknown U-Net config"):
        build_unet("huge", 16, 3, 3)


# ----------------------------------------------------------------------------
# forward math


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 1.5, 999.0])
    for dim in (8, 9):
        emb = timestep_embedding(t, dim)
        half = dim // 2
        assert emb.shape == (3, dim)
        for i in range(3):
            for k in range(half):
                freq = math.exp(-math.log(10000) * k / half)
                assert emb[i, k].item() == pytest.approx(math.cos(t[i].item() * freq), abs=1e-4)
                assert emb[i, half + k].item() == pytest.approx(math.sin(t[i].item() * freq), abs=1e-4)
        if dim % 2:
            assert torch.all(emb[:, -1] == 0)


def _einsum_attention(qkv, n_heads, legacy):
    """guided-diffusion's attention math (q and k each scaled by ch^-1/4 before the product)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if legacy:
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * n_heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_matches_einsum_reference(legacy):
    qkv = torch.randn(2, 3 * 4 * 8, 20, dtype=torch.float64)
    module = QKVAttentionLegacy(4) if legacy else QKVAttention(4)
    torch.testing.assert_close(module(qkv), _einsum_attention(qkv, 4, legacy), rtol=1e-10, atol=1e-10)
    # the gradient too: the fused SDPA kernel has its own backward
    cotangent = torch.randn(2, 4 * 8, 20, dtype=torch.float64)
    (ours,) = torch.autograd.grad(module(qkv.requires_grad_()), qkv, cotangent)
    (ref,) = torch.autograd.grad(_einsum_attention(qkv, 4, legacy), qkv, cotangent)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_attention_in_float32_at_a_u_net_size():
    """At the tiny U-Net's 16x16 (256 tokens, heads of 16 channels) in float32, against float64 einsum:
    within a few float32 ulps of the outputs' size (softmax weights sum to 1, so outputs are O(|v|))."""
    qkv = torch.randn(3, 3 * 4 * 16, 256, dtype=torch.float64)
    ref = _einsum_attention(qkv, 4, True)
    ours = QKVAttentionLegacy(4)(qkv.float()).double()
    assert (ours - ref).abs().max() <= 64 * torch.finfo(torch.float32).eps * ref.abs().max()


def test_fresh_unet_outputs_zero_and_forward_is_deterministic():
    net = build_unet("tiny", 16, 3, 3).eval()
    x, t = inputs()
    assert torch.count_nonzero(net(x, t)) == 0  # zero_module on the output convolution
    randomize(net)
    with torch.no_grad():
        a, b = net(x, t), net(x, t)
    assert a.shape == (2, 3, 16, 16) and a.abs().sum() > 0
    assert torch.equal(a, b)
    assert not torch.equal(a[0], net(x, t.flip(0))[0])  # the timestep matters


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_new_attention_order": True, "use_scale_shift_norm": False, "resblock_updown": False},
        {"num_head_channels": -1, "num_heads": 2, "conv_resample": False, "resblock_updown": False},
    ],
)
def test_channels_last_matches(overrides):
    net = tiny(**overrides)
    x, t = inputs()
    with torch.no_grad():
        ref = net(x, t)
        net_cl = net.to(memory_format=torch.channels_last)
        out = net_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_autocast_bf16_runs_close():
    net = tiny()
    x, t = inputs()
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1, err


# ----------------------------------------------------------------------------
# loading


def test_state_dict_round_trip_all_forms():
    src, dst = tiny(seed=0), tiny(seed=1)
    x, t = inputs()
    with torch.no_grad():
        ref = src(x, t)
    sd = src.state_dict()
    other = tiny(seed=2).state_dict()

    forms = {
        "plain": sd,
        "module": {f"module.{k}": v for k, v in sd.items()},
        "net+ema": {"net": other, "ema": sd},
        "ema module": {"ema": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        # I2SB: net under `diffusion_model.`, ema as torch_ema shadow parameters
        "i2sb": {
            "net": {f"diffusion_model.{k}": v for k, v in other.items()},
            "ema": {"decay": 0.99, "num_updates": 3, "shadow_params": [p.detach().clone() for p in src.parameters()]},
        },
    }
    for name, ckpt in forms.items():
        randomize(dst, seed=3)
        load_state_dict_checked(dst, ckpt)
        with torch.no_grad():
            assert torch.equal(dst(x, t), ref), name

    load_state_dict_checked(dst, {"net": sd, "ema": other}, prefer="net")
    with torch.no_grad():
        assert torch.equal(dst(x, t), ref)


def test_mismatched_state_dict_error_lists_keys():
    net = tiny()
    sd = dict(net.state_dict())
    del sd["out.2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["input_blocks.0.0.weight"] = torch.zeros(32, 6, 3, 3)
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(net, sd)
    msg = str(info.value)
    assert "missing keys: 1 (out.2.bias)" in msg
    assert "unexpected keys: 1 (extra.weight)" in msg
    assert "mis-shaped keys: 1" in msg and "input_blocks.0.0.weight" in msg and "(32, 6, 3, 3)" in msg

    # a checkpoint of another architecture: counts and the first few names
    wrong = build_unet("tiny", 16, 3, 3, model_channels=64).state_dict()
    with pytest.raises(ValueError, match=r"mis-shaped keys: \d+ \(") as info:
        load_state_dict_checked(net, wrong)
    assert "..." in str(info.value)
    with pytest.raises(ValueError, match="no state dict found"):
        load_state_dict_checked(net, {"step": 3})


def test_load_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    net = tiny()
    sd = net.state_dict()
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"net": sd, "ema": sd, "step": 7}, pt)
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    for path in (pt, st):
        dst = tiny(seed=5)
        load_state_dict_checked(dst, load_checkpoint_file(path))
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), sd.values()))

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_file(tmp_path / "nope.pt")
    for name in ("bad.pt", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"\x00not a checkpoint" * 10)
        with pytest.raises(ValueError, match=name):
            load_checkpoint_file(tmp_path / name)
    # arbitrary pickled objects are refused, not executed
    torch.save({"obj": os.path.join}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint_file(tmp_path / "evil.pt")


# ----------------------------------------------------------------------------
# teacher, generator, fake model


def make_teacher(kind, conditional, seed=0):
    bridge = StubI2SB() if kind == "i2sb" else StubVP()
    net = tiny(in_channels=6 if conditional else 3, seed=seed)
    return Teacher(net, bridge, conditional=conditional).eval()


def test_teacher_parametrizations():
    x_t, _ = inputs(seed=2)
    xT, _ = inputs(seed=3)
    t = torch.tensor([0, 40])
    teacher = make_teacher("i2sb", conditional=True)
    with torch.no_grad():
        out = teacher(x_t, t, xT)
        net_out = teacher.net(torch.cat([x_t, xT], 1), teacher.bridge.net_time(t))
    std = teacher.bridge.std_fwd[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x_t - std * net_out)

    teacher = make_teacher("vp", conditional=True)
    tv = torch.tensor([0.3, 0.9])
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in teacher.bridge.precond(tv))
    with torch.no_grad():
        out = teacher.predict_x0(x_t, tv, xT)
        net_out = teacher.net(torch.cat([c_in * x_t, xT], 1), c_noise.flatten())
    torch.testing.assert_close(out, c_skip * x_t + c_out * net_out)
    with pytest.raises(ValueError, match="needs xT"):
        teacher(x_t, tv)


@pytest.mark.parametrize("kind,conditional", [("i2sb", False), ("i2sb", True), ("vp", True)])
def test_generator_starts_as_teacher(kind, conditional):
    teacher = make_teacher(kind, conditional)
    teacher.requires_grad_(False)
    gen = Generator(teacher)
    assert gen.image_channels == 3 and gen.z_channels == 3
    assert gen.arch_config()["in_channels"] == teacher.net.config["in_channels"] + 3
    assert teacher.net.input_blocks[0][0].in_channels == teacher.net.config["in_channels"]  # teacher untouched
    xT, _ = inputs(seed=4)
    T = teacher.full_time(2, xT.device)
    with torch.no_grad():
        ref = teacher(xT, T, xT if conditional else None)
        for seed in (5, 6):
            z = torch.randn(xT.shape, generator=torch.Generator().manual_seed(seed)) * 3
            torch.testing.assert_close(gen(xT, z), ref, rtol=0, atol=1e-6)
        # multi-step call at an intermediate time
        x_t, _ = inputs(seed=7)
        t = torch.tensor([3, 20]) if kind == "i2sb" else torch.tensor([0.2, 0.5])
        torch.testing.assert_close(
            gen(xT, z, t=t, x_t=x_t), teacher(x_t, t, xT if conditional else None), rtol=0, atol=1e-6
        )


def test_generator_z_gets_gradient_and_the_chain_copies_known_pixels():
    teacher = make_teacher("i2sb", conditional=False).requires_grad_(False)
    gen = Generator(teacher)
    xT, _ = inputs(seed=4)
    z = torch.randn_like(xT)
    gen(xT, z).square().mean().backward()
    conv = gen.net.input_blocks[0][0]
    assert conv.weight.grad[:, 3:].abs().sum() > 0  # z can be learned
    assert all(p.requires_grad for p in gen.parameters())

    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    with torch.no_grad():
        out = student_chain(gen, xT, z, 1, mask=mask, grid=[teacher.T])  # known pixels: the chain's impose_known
        free = gen(xT, z)
    known = (mask == 0).expand_as(out)
    assert torch.equal(out[known], xT[known])
    assert torch.equal(out[~known], free[~known])
    with pytest.raises(TypeError):
        gen(xT, z, mask=mask)  # the generator predicts the whole image; it does not mask on its own


def test_generator_config_round_trip():
    import json

    teacher = make_teacher("vp", conditional=True)
    gen = Generator(teacher, z_channels=2, multistep=True)
    cfg = json.loads(json.dumps(gen.config()))
    assert cfg["unet"]["in_channels"] == 8 and cfg["z_channels"] == 2 and cfg["multistep"]
    randomize(gen, seed=9)
    rebuilt = Generator.from_config(cfg, teacher.bridge)
    load_state_dict_checked(rebuilt, gen.state_dict())
    xT, _ = inputs(seed=4)
    z = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(xT, z), gen.eval()(xT, z))


def test_fake_model_is_independent_trainable_copy():
    teacher = make_teacher("i2sb", conditional=False).requires_grad_(False)
    fake = make_fake_model(teacher)
    assert isinstance(fake, Teacher) and fake.bridge is teacher.bridge
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    x, _ = inputs()
    t = torch.tensor([5, 30])
    with torch.no_grad():
        torch.testing.assert_close(fake.eval()(x, t), teacher(x, t), rtol=0, atol=0)
        fake.net.out[2].bias.add_(1.0)
        assert not torch.equal(fake(x, t), teacher(x, t))
    assert list(teacher.state_dict()) == list(fake.state_dict())  # no bridge tables in checkpoints
    assert all(k.startswith("net.") for k in teacher.state_dict())


def test_real_bridges():
    from ibmd_fast import bridges

    for bridge, t in (
        (bridges.I2SBBridge(n_steps=20), torch.tensor([0, 19])),
        (bridges.VPBridge(), torch.tensor([0.3, 1.0])),
    ):
        teacher = Teacher(tiny(in_channels=6), bridge, conditional=True).eval()
        x, _ = inputs()
        with torch.no_grad():
            assert torch.isfinite(teacher(x, t, x)).all()
            assert torch.isfinite(Generator(teacher)(x, torch.randn_like(x))).all()


def test_check_image_size_one_rule_for_every_caller():
    """models.unet.check_image_size: sides must be positive multiples of 2**(len(channel_mult) - 1);
    the one-line message says what, which network, the multiple and the nearest sizes."""
    from ibmd_fast.models.unet import check_image_size, size_multiple

    assert [size_multiple(m) for m in ((1,), (1, 2), (1, 2, 2, 2))] == [1, 2, 8]
    check_image_size((1, 2, 2, 2), 32, 24, "input a.png")  # multiples of 8: fine
    with pytest.raises(ValueError) as err:
        check_image_size((1, 2, 2, 2), 30, 30, "--image-size 30", "the small U-Net")
    assert str(err.value) == (
        "--image-size 30 is 30x30, but the small U-Net halves the image 3 time(s) and takes "
        "widths and heights that are multiples of 8 (nearest: 24 or 32)"
    )
    with pytest.raises(
        ValueError,
        match=r"input a\.png is 17x16 \(width x height\), .*multiples of 2 "
        r"\(nearest: 16x16 or 18x16\)",
    ):
        check_image_size((1, 2), 16, 17, "input a.png")
    with pytest.raises(ValueError, match=r"is 4x4, .*multiples of 8 \(nearest: 8\)"):
        check_image_size((1, 2, 2, 2), 4, 4, "x")
