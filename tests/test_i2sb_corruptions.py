"""I2SB's corruptions (ibmd_fast.data.i2sb_corruptions) against transcriptions of its code.

The transcriptions below are written here, in this file's own words, from NVlabs/I2SB
``corruption/`` (``superresolution.py``: ``build_sr_bicubic`` and DDRM's ``SRConv``;
``blur.py``: ``build_blur`` and DDRM's ``Deblurring``; ``jpeg.py``: DDRM-JPEG's
``jpeg_encode`` / ``jpeg_decode`` with its FFT-based ``dct``; ``inpaint.py``: ``load_masks``,
``load_freeform_masks``, ``build_inpaint_freeform``) and ``base.py``'s ``H``. They keep the
reference's route (the SVD, the permutation of singular values, unfold / fold, the DCT built
from an FFT), so they check the closed forms the package uses rather than repeat them.

One choice is made explicit: DDRM's blur sorts the singular-value products with ``torch.sort``,
whose order of equal products is the device's; here it is the stable order (what torch's radix
sort gives on the GPU that built I2SB's operators at 256 px, by our reading of torch's sort;
not checked on a GPU). The CPU's default order moves blur outputs by up to 0.04.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibmd_fast.data import get_degradation
from ibmd_fast.data import i2sb_corruptions as ops

pytestmark = pytest.mark.usefixtures("one_thread")


def photo_like(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth structure plus texture on [-1, 1]: what a photo gives the operators (edges, flat areas)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=g) * 2 - 1
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * (torch.rand(batch, 3, size, size, generator=g) * 2 - 1)).clamp(-1, 1)


# ----------------------------------------------------------------------------
# Transcription: DDRM's SVD route (base.py H = U(singulars * Vt(x)))

DDRM_ZERO = 3e-2


def ref_sr_bicubic(img: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """build_sr_bicubic + SRConv.H + nearest Upsample, as I2SB's sr4x('bicubic')."""

    def keys(x, a=-0.5):
        if abs(x) <= 1:
            return (a + 2) * abs(x) ** 3 - (a + 3) * abs(x) ** 2 + 1
        if 1 < abs(x) < 2:
            return a * abs(x) ** 3 - 5 * a * abs(x) ** 2 + 8 * a * abs(x) - 4 * a
        return 0

    k = np.zeros(factor * 4)
    for i in range(factor * 4):
        k[i] = keys((1 / factor) * (i - np.floor(factor * 4 / 2) + 0.5))
    k = k / np.sum(k)
    kernel = torch.from_numpy(k).float()
    kernel = kernel / kernel.sum()
    b, c, dim, _ = img.shape
    small = dim // factor
    H_small = torch.zeros(small, dim)
    for i in range(factor // 2, dim + factor // 2, factor):
        for j in range(i - kernel.shape[0] // 2, i + kernel.shape[0] // 2):
            je = j
            if je < 0:
                je = -je - 1
            if je >= dim:
                je = (dim - 1) - (je - dim)
            H_small[i // factor, je] += kernel[j - i + kernel.shape[0] // 2]
    U, s, V = torch.svd(H_small, some=False)
    s[s < DDRM_ZERO] = 0
    singulars = (s.reshape(small, 1) @ s.reshape(1, small)).reshape(small**2)
    perm = torch.tensor(
        [dim * i + j for i in range(small) for j in range(small)]
        + [dim * i + j for i in range(small) for j in range(small, dim)]
    ).long()
    # Vt: V^T x V, the permutation, channels interleaved
    t = (V.t() @ img.reshape(b * c, dim, dim) @ V).reshape(b, c, -1)
    t[:, :, : perm.shape[0]] = t[:, :, perm]
    t = t.permute(0, 2, 1).reshape(b, -1)
    sing = singulars.repeat_interleave(3).reshape(-1)
    t = sing * t[:, : sing.shape[0]]
    # U: back to [C, small, small], U y U^T
    u = t.reshape(b, small**2, c).permute(0, 2, 1).reshape(b * c, small, small)
    low = (U @ u @ U.t()).reshape(b, c, small, small)
    return F.interpolate(low, scale_factor=factor, mode="nearest")


def ref_blur(img: torch.Tensor, kind: str, stable: bool = True) -> torch.Tensor:
    """build_blur + Deblurring.H on (img + 1) / 2, back to [-1, 1]."""
    if kind == "uni":
        kernel = torch.Tensor([1 / 9] * 9)
    else:
        sigma = 10
        pdf = lambda x: torch.exp(torch.Tensor([-0.5 * (x / sigma) ** 2]))  # noqa: E731
        g = torch.Tensor([pdf(-2), pdf(-1), pdf(0), pdf(1), pdf(2)])
        kernel = g / g.sum()
    b, c, dim, _ = img.shape
    H_small = torch.zeros(dim, dim)
    for i in range(dim):
        for j in range(i - kernel.shape[0] // 2, i + kernel.shape[0] // 2):
            if j < 0 or j >= dim:
                continue
            H_small[i, j] = kernel[j - i + kernel.shape[0] // 2]
    U, s, V = torch.svd(H_small, some=False)
    s[s < DDRM_ZERO] = 0
    singulars = (s.reshape(dim, 1) @ s.reshape(1, dim)).reshape(dim**2)
    singulars, perm = singulars.sort(descending=True, stable=stable)
    x = (img + 1) / 2
    t = (V.t() @ x.reshape(b * c, dim, dim) @ V).reshape(b, c, -1)
    t = t[:, :, perm].permute(0, 2, 1).reshape(b, -1)
    sing = singulars.repeat(1, 3).reshape(-1)
    t = sing * t[:, : sing.shape[0]]
    u = torch.zeros(b, dim**2, c)
    u[:, perm, :] = t.reshape(b, dim**2, c)
    u = u.permute(0, 2, 1).reshape(b * c, dim, dim)
    y = (U @ u @ U.t()).reshape(b, c, dim, dim)
    return y * 2 - 1


# ----------------------------------------------------------------------------
# Transcription: DDRM-JPEG (jpeg_torch.py)


def ref_dct_ortho(x: torch.Tensor) -> torch.Tensor:
    """DCT-II over the last dimension through an FFT of the even/odd reordering, norm='ortho'."""
    shape = x.shape
    N = shape[-1]
    x = x.contiguous().view(-1, N)
    v = torch.cat([x[:, ::2], x[:, 1::2].flip([1])], dim=1)
    Vc = torch.view_as_real(torch.fft.fft(v, dim=1))
    k = -torch.arange(N, dtype=x.dtype)[None, :] * np.pi / (2 * N)
    V = Vc[:, :, 0] * torch.cos(k) - Vc[:, :, 1] * torch.sin(k)
    V[:, 0] /= np.sqrt(N) * 2
    V[:, 1:] /= np.sqrt(N / 2) * 2
    return 2 * V.view(*shape)


def ref_idct_ortho(X: torch.Tensor) -> torch.Tensor:
    shape = X.shape
    N = shape[-1]
    X_v = X.contiguous().view(-1, N) / 2
    X_v[:, 0] *= np.sqrt(N) * 2
    X_v[:, 1:] *= np.sqrt(N / 2) * 2
    k = torch.arange(N, dtype=X.dtype)[None, :] * np.pi / (2 * N)
    W_r, W_i = torch.cos(k), torch.sin(k)
    V_t_r = X_v
    V_t_i = torch.cat([X_v[:, :1] * 0, -X_v.flip([1])[:, :-1]], dim=1)
    V_r = V_t_r * W_r - V_t_i * W_i
    V_i = V_t_r * W_i + V_t_i * W_r
    V = torch.cat([V_r.unsqueeze(2), V_i.unsqueeze(2)], dim=2)
    v = torch.fft.irfft(torch.view_as_complex(V), n=V.shape[1], dim=1)
    x = v.new_zeros(v.shape)
    x[:, ::2] += v[:, : N - (N // 2)]
    x[:, 1::2] += v.flip([1])[:, : N // 2]
    return x.view(*shape)


def ref_linear_2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LinearDCT (weight = f(I).t(), no bias) applied along both of the last two dims."""
    x1 = x @ weight.t()
    return (x1.transpose(-1, -2) @ weight.t()).transpose(-1, -2)


def ref_tables(qf: int):
    q1 = torch.tensor(
        [
            16,
            11,
            10,
            16,
            24,
            40,
            51,
            61,
            12,
            12,
            14,
            19,
            26,
            58,
            60,
            55,
            14,
            13,
            16,
            24,
            40,
            57,
            69,
            56,
            14,
            17,
            22,
            29,
            51,
            87,
            80,
            62,
            18,
            22,
            37,
            56,
            68,
            109,
            103,
            77,
            24,
            35,
            55,
            64,
            81,
            104,
            113,
            92,
            49,
            64,
            78,
            87,
            103,
            121,
            120,
            101,
            72,
            92,
            95,
            98,
            112,
            100,
            103,
            99,
        ]
    )
    q2 = torch.tensor(
        [
            17,
            18,
            24,
            47,
            99,
            99,
            99,
            99,
            18,
            21,
            26,
            66,
            99,
            99,
            99,
            99,
            24,
            26,
            56,
            99,
            99,
            99,
            99,
            99,
            47,
            66,
            99,
            99,
            99,
            99,
            99,
            99,
        ]
        + [99] * 32
    )
    s = (5000 / qf) if qf < 50 else (200 - 2 * qf)
    q1 = torch.floor((s * q1 + 50) / 100)
    q1[q1 <= 0] = 1
    q1[q1 > 255] = 255
    q2 = torch.floor((s * q2 + 50) / 100)
    q2[q2 <= 0] = 1
    q2[q2 > 255] = 255
    return q1, q2


def ref_jpeg(img: torch.Tensor, qf: int) -> torch.Tensor:
    """jpeg_decode(jpeg_encode(img, qf), qf) for square images, as DDRM-JPEG writes it."""
    eye = torch.eye(8)
    dct_w, idct_w = ref_dct_ortho(eye).t(), ref_idct_ortho(eye).t()
    q1, q2 = ref_tables(qf)
    # encode
    x = (img + 1) / 2 * 255
    n_batch, _, n_size, _ = x.shape
    to_ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
    x = torch.tensordot(x, to_ycc, dims=([1], [1])).transpose(3, 2).transpose(2, 1)
    x[:, 1:] += 128
    luma, chroma = x[:, 0:1], x[:, 1:, ::2, ::2]
    unfold = torch.nn.Unfold(kernel_size=(8, 8), stride=(8, 8))
    luma = unfold(luma).transpose(2, 1).reshape(-1, 8, 8) - 128
    chroma = unfold(chroma).transpose(2, 1).reshape(-1, 8, 8) - 128
    luma = ref_linear_2d(luma, dct_w).view(-1, 1, 8, 8)
    chroma = ref_linear_2d(chroma, dct_w).view(-1, 2, 8, 8)
    luma = (luma / q1.view(1, 8, 8)).round()
    chroma = (chroma / q2.view(1, 8, 8)).round()
    luma = luma.reshape(n_batch, (n_size // 8) ** 2, 64).transpose(2, 1)
    chroma = chroma.reshape(n_batch, (n_size // 16) ** 2, 64 * 2).transpose(2, 1)
    luma = torch.nn.Fold(output_size=(n_size, n_size), kernel_size=(8, 8), stride=(8, 8))(luma)
    chroma = torch.nn.Fold(output_size=(n_size // 2, n_size // 2), kernel_size=(8, 8), stride=(8, 8))(chroma)
    # decode
    luma = unfold(luma).transpose(2, 1).reshape(-1, 1, 8, 8) * q1.view(1, 8, 8)
    chroma = unfold(chroma).transpose(2, 1).reshape(-1, 2, 8, 8) * q2.view(1, 8, 8)
    luma = ref_linear_2d(luma.reshape(-1, 8, 8), idct_w)
    chroma = ref_linear_2d(chroma.reshape(-1, 8, 8), idct_w)
    luma = (luma + 128).reshape(n_batch, (n_size // 8) ** 2, 64).transpose(2, 1)
    chroma = (chroma + 128).reshape(n_batch, (n_size // 16) ** 2, 64 * 2).transpose(2, 1)
    luma = torch.nn.Fold(output_size=(n_size, n_size), kernel_size=(8, 8), stride=(8, 8))(luma)
    chroma = torch.nn.Fold(output_size=(n_size // 2, n_size // 2), kernel_size=(8, 8), stride=(8, 8))(chroma)
    up = torch.zeros(n_batch, 2, n_size, n_size)
    for dy in (0, 1):
        for dx in (0, 1):
            up[:, :, dy::2, dx::2] = chroma
    x = torch.cat([luma, up], dim=1)
    to_rgb = torch.tensor(
        [
            [1.0, -3.68199903e-05, 1.40198758e00],
            [1.0, -3.44113281e-01, -7.14103821e-01],
            [1.0, 1.77197812e00, -1.34583413e-04],
        ]
    )
    x[:, 1:] -= 128
    x = torch.tensordot(x, to_rgb, dims=([1], [1])).transpose(3, 2).transpose(2, 1)
    return x / 255 * 2 - 1


# ----------------------------------------------------------------------------
# The operators against the transcriptions


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("name", ["sr4x-bicubic", "blur-uni", "blur-gauss"])
def test_linear_operators_match_i2sb(name, size):
    x = photo_like(3, size, seed=size)
    if name == "sr4x-bicubic":
        want = ref_sr_bicubic(x.clone())
    else:
        want = ref_blur(x.clone(), name.split("-")[1])
    degradation = get_degradation(name)
    batched, mask = degradation(x)
    assert mask is None and batched.shape == x.shape and batched.dtype == x.dtype
    assert (batched - want).abs().max() <= 1e-5
    single, _ = degradation(x[1])
    assert single.shape == x[1].shape and (single - want[1]).abs().max() <= 1e-5


def test_sr4x_bicubic_is_the_plain_matrix_and_differs_from_the_antialiased_one():
    x = photo_like(1, 64)
    matrix = ops.bicubic_matrix(64).float()
    assert torch.allclose(matrix.sum(1), torch.ones(16), atol=1e-6)  # every row is a full normalised kernel
    low = get_degradation("sr4x-bicubic").downsample(x)
    assert (low - matrix @ x @ matrix.T).abs().max() <= 1e-5
    # the project's antialiased variant is kept, under its own name, and is not I2SB's
    aa = get_degradation("sr4x-bicubic-aa")
    assert aa.name == "sr4x-bicubic-aa" and (aa(x)[0] - get_degradation("sr4x-bicubic")(x)[0]).abs().max() > 0.05


def test_blur_is_ddrms_operator_not_a_separable_blur():
    """DDRM's Deblurring pairs the sorted singular values with channel-interleaved coefficients, so
    its H is not the (truncated) separable blur; I2SB's checkpoints learned the former."""
    x = photo_like(1, 64)
    got, _ = get_degradation("blur-uni")(x)
    matrix = torch.zeros(64, 64)
    for i in range(64):
        for j in range(max(i - 4, 0), min(i + 4, 64)):
            matrix[i, j] = 1 / 9
    left, singular, right_t = torch.linalg.svd(matrix)
    truncated = left @ torch.diag(torch.where(singular < DDRM_ZERO, 0.0, singular)) @ right_t
    separable = (truncated @ ((x + 1) / 2) @ truncated.T) * 2 - 1
    assert (got - separable).abs().max() > 0.05
    # the three channels of a gray image come out different: the pairing depends on the channel
    gray = x[:, :1].expand(-1, 3, -1, -1)
    out, _ = get_degradation("blur-uni")(gray)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("quality", [5, 10])
def test_jpeg_matches_ddrm_jpeg(quality, size):
    x = photo_like(2 if size == 256 else 3, size, seed=quality)
    want = ref_jpeg(x.clone(), quality)
    degradation = get_degradation(f"jpeg-{quality}")
    got, mask = degradation(x)
    diff = (got - want).abs()
    assert mask is None and got.shape == x.shape
    assert diff.mean() <= 1e-4 and (diff > 1e-3).float().mean() <= 0.01, (diff.mean(), (diff > 1e-3).float().mean())
    single, _ = degradation(x[0])
    diff = (single - want[0]).abs()
    assert diff.mean() <= 1e-4 and (diff > 1e-3).float().mean() <= 0.01
    # and it is a real JPEG: blocky, far from the input, worse at the lower quality
    assert (got - x).abs().mean() > 0.01


def test_jpeg_tables_and_libjpeg_variant():
    luma, chroma = ops.jpeg_tables(10)
    want1, want2 = ref_tables(10)
    assert torch.equal(luma.flatten(), want1.float()) and torch.equal(chroma.flatten(), want2.float())
    assert luma[0, 0] == 80 and chroma[7, 7] == 255  # floor((500 * 16 + 50) / 100), clipped 495
    libjpeg = get_degradation("jpeg-10-libjpeg")
    assert libjpeg.name == "jpeg-10-libjpeg" and libjpeg.codec == "libjpeg"
    x = photo_like(1, 32)
    assert (libjpeg(x)[0] - get_degradation("jpeg-10")(x)[0]).abs().max() > 0.01
    with pytest.raises(ValueError, match="divisible by 16"):
        get_degradation("jpeg-10")(photo_like(1, 24))


def test_gray_images_go_through_as_rgb():
    gray = photo_like(2, 64)[:, :1]
    rgb = gray.expand(-1, 3, -1, -1)
    for name in ("sr4x-bicubic", "blur-gauss", "jpeg-10"):
        got, _ = get_degradation(name)(gray)
        want, _ = get_degradation(name)(rgb)
        assert got.shape == gray.shape and (got - want.mean(1, keepdim=True)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------
# Free-form masks


def write_palette_masks(path, count: int = 6, seed: int = 0):
    """Palette's layout: per range a flat packed-bit array of [count, 256, 256] masks (1 = hole)."""
    rng = np.random.default_rng(seed)
    masks = {}
    for key, frac in (("10-20% freeform", 0.15), ("20-30% freeform", 0.25), ("30-40% freeform", 0.35)):
        bits = (rng.random((count, 256, 256)) < frac).astype(np.uint8)
        masks[key] = bits
    np.savez(path, **{k: np.packbits(v, axis=None) for k, v in masks.items()})
    return masks


def write_i2sb_masks(path, size: int, count: int = 5, seed: int = 1):
    """I2SB's cache: key 'mask', [count, size, size] uint8 (np.savez(mask_fn, mask=...))."""
    masks = (np.random.default_rng(seed).random((count, size, size)) < 0.15).astype(np.uint8)
    np.savez(path, mask=masks)
    return masks


def ref_load_masks(filename, count):
    """inpaint.py load_masks with its fixed shape (count instead of 10000)."""
    shape = [count, 256, 256]
    data = dict(np.load(filename))
    return {k: np.unpackbits(v, axis=None)[: np.prod(shape)].reshape(shape).astype(np.uint8) for k, v in data.items()}


@pytest.mark.parametrize("ratio,key", [("1020", "10-20% freeform"), ("2030", "20-30% freeform")])
def test_freeform_masks_from_palettes_file(tmp_path, ratio, key):
    path = tmp_path / "imagenet_freeform_masks.npz"
    write_palette_masks(path)
    want = ref_load_masks(path, 6)[key][:, None]  # [N, 1, 256, 256], as load_freeform_masks returns
    degradation = get_degradation(f"inpaint-freeform{ratio}", masks=str(path))
    assert degradation.is_inpainting and not degradation.fixed_mask and len(degradation.masks) == 6
    x = photo_like(4, 256)
    rng = torch.Generator().manual_seed(3)
    xT, mask = degradation(x, rng=rng)
    index = torch.randint(6, (4,), generator=torch.Generator().manual_seed(3))
    expected = torch.from_numpy(want[index.numpy()]).float()
    assert torch.equal(mask, expected)
    # the known pixels are x0's exactly (I2SB: img * (1 - mask) + mask; the hole is filled with noise before use)
    i2sb = x * (1 - expected) + expected
    assert torch.equal(xT * (1 - mask), i2sb * (1 - mask)) and torch.all(xT[mask.bool().expand_as(xT)] == 0)
    # seeded: the same generator state gives the same masks; single images get one mask
    again, _ = degradation(x, rng=torch.Generator().manual_seed(3))
    assert torch.equal(again, xT)
    one, one_mask = degradation(x[0], rng=torch.Generator().manual_seed(3))
    assert one_mask.shape == (1, 256, 256) and torch.equal(one_mask, expected[0])


@pytest.mark.parametrize("size", [64, 256])
def test_freeform_masks_from_i2sbs_file(tmp_path, size):
    path = tmp_path / "imagenet_freeform1020_masks.npz"
    masks = write_i2sb_masks(path, size)
    degradation = get_degradation("inpaint-freeform1020", masks=path)
    x = photo_like(3, size)
    xT, mask = degradation(x, rng=torch.Generator().manual_seed(0))
    index = torch.randint(5, (3,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, torch.from_numpy(masks[index.numpy()][:, None]).float())
    assert torch.equal(xT, x * (1 - mask))
    with pytest.raises(ValueError, match="freeform1020 masks, not freeform2030"):
        get_degradation("inpaint-freeform2030", masks=path)
    with pytest.raises(ValueError, match=f"are {size}x{size}, the images 32x32"):
        degradation(photo_like(1, 32))


def test_freeform_without_the_file_says_which_file(tmp_path):
    with pytest.raises(ValueError) as info:
        get_degradation("inpaint-freeform2030")
    message = str(info.value)
    assert "\n" not in message and "--masks" in message and "imagenet_freeform_masks.npz" in message
    assert "imagenet_freeform2030_masks.npz" in message and "drive.google.com" in message
    with pytest.raises(FileNotFoundError, match="imagenet_freeform_masks.npz"):
        get_degradation("inpaint-freeform1020", masks=tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match="neither Palette's"):
        get_degradation("inpaint-freeform1020", masks=tmp_path / "other.npz")


# ----------------------------------------------------------------------------
# import-teacher: options.pkl's corrupt -> the operator; distilled on exactly that


def write_i2sb_run(folder, corrupt: str, size: int = 16):
    """A small I2SB run folder: latest.pt (net with diffusion_model. keys, torch_ema's shadow list),
    options.pkl (a pickled Namespace) and the architecture pickle I2SB keeps beside them."""
    import argparse
    import pickle

    from ibmd_fast.models import UNet

    folder.mkdir(parents=True, exist_ok=True)
    gd = dict(
        image_size=size,
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
    torch.manual_seed(0)
    net = UNet(
        image_size=size,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=(1, 2),
        num_heads=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    torch.save(
        {
            "net": {f"diffusion_model.{k}": v for k, v in net.state_dict().items()},
            "ema": {
                "decay": 0.99,
                "num_updates": 1,
                "collected_params": None,
                "shadow_params": [p.detach().clone() for p in net.parameters()],
            },
        },
        folder / "latest.pt",
    )
    options = argparse.Namespace(
        image_size=size,
        corrupt=corrupt,
        t0=1e-4,
        T=1.0,
        interval=50,
        beta_max=0.3,
        ot_ode=False,
        cond_x1=False,
        device="cuda",
    )
    with open(folder / "options.pkl", "wb") as fh:
        pickle.dump(options, fh)
    with open(folder / "256x256_diffusion_uncond_fixedsigma.pkl", "wb") as fh:
        pickle.dump(gd, fh)


@pytest.mark.parametrize("corrupt,operator", [("jpeg-10", "jpeg"), ("blur-gauss", "blur")])
def test_imported_i2sb_teacher_distills_on_its_own_corruption(tmp_path, monkeypatch, corrupt, operator):
    import json

    from ibmd_fast.release import read_release
    from ibmd_fast.importers import import_teacher
    from ibmd_fast.train import distill

    write_i2sb_run(tmp_path / "run", corrupt)
    release = tmp_path / "teacher.safetensors"
    config = import_teacher(tmp_path / "run", "i2sb", release)
    assert config["degradation"] == corrupt
    assert read_release(str(release), expect="ibmd_fast.teacher")[1]["degradation"] == corrupt

    # the distiller's corrupted images come from I2SB's operator itself: record its calls
    calls = []
    original = getattr(ops, operator)

    def spy(x, arg):
        calls.append((tuple(x.shape), arg))
        return original(x, arg)

    monkeypatch.setattr(ops, operator, spy)
    summary = distill(
        run_dir=str(tmp_path / "distill"),
        teacher=str(release),
        data="skimage",
        image_size=16,
        batch_size=2,
        steps=2,
        inner_steps=1,
        log_every=1,
        ckpt_every=2,
        eval_items=2,
        eval_teacher_nfe=(1,),
        device="cpu",
        progress=False,
        lr=1e-6,
        fake_lr=1e-6,
    )
    assert np.isfinite(summary["loss_theta"]) and np.isfinite(summary["loss_phi"])
    want = 10 if corrupt == "jpeg-10" else "gauss"
    training = [shape for shape, arg in calls if shape[-2:] == (16, 16)]
    assert training and all(arg == want for _, arg in calls)
    # the end-of-run photo is cut to what the operator takes (DDRM's JPEG: sides of 16k; its blur: a square)
    with open(tmp_path / "distill" / "comparison-photo.json") as fh:
        photo = json.load(fh)
    assert photo["height"] % 16 == 0 and photo["width"] % 16 == 0
    assert corrupt != "blur-gauss" or photo["height"] == photo["width"]
    with open(tmp_path / "distill" / "config.json") as fh:
        assert json.load(fh)["degradation"] == corrupt
    assert read_release(summary["release"], expect="ibmd_fast.generator")[1]["degradation"] == corrupt


def test_import_refuses_mixture_and_unknown_corruptions(tmp_path):
    from ibmd_fast.importers import import_teacher
    from ibmd_fast.importers.unpickle import TeacherImportError

    write_i2sb_run(tmp_path / "mix", "mixture")
    with pytest.raises(TeacherImportError) as info:
        import_teacher(tmp_path / "mix", "i2sb", tmp_path / "t.safetensors")
    assert "\n" not in str(info.value) and "mixture" in str(info.value) and "no single operator" in str(info.value)
    # the user may pick one of the mixture's corruptions
    assert (
        import_teacher(tmp_path / "mix", "i2sb", tmp_path / "t.safetensors", degradation="blur-uni")["degradation"]
        == "blur-uni"
    )
    write_i2sb_run(tmp_path / "odd", "jpeg-10-libjpeg")
    with pytest.raises(TeacherImportError, match="not one of I2SB's corruptions"):
        import_teacher(tmp_path / "odd", "i2sb", tmp_path / "t.safetensors")
    # a free-form teacher imports without the mask file (distilling it needs --masks)
    write_i2sb_run(tmp_path / "free", "inpaint-freeform2030")
    assert (
        import_teacher(tmp_path / "free", "i2sb", tmp_path / "f.safetensors")["degradation"] == "inpaint-freeform2030"
    )


def _one_error_line(result, *fragments):
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_cli_masks_option(tmp_path):
    from click.testing import CliRunner

    from ibmd_fast.cli import cli

    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)

    # without the file: one line naming the file and where it comes from, for every command that corrupts
    for command in ("train-teacher", "distill"):
        _one_error_line(
            invoke(command, "--degradation", "inpaint-freeform1020", "--dry-run"),
            "--masks",
            "imagenet_freeform_masks.npz",
            "drive.google.com",
        )
    masks = tmp_path / "imagenet_freeform1020_masks.npz"
    write_i2sb_masks(masks, 16)
    result = invoke(
        "train-teacher",
        "--degradation",
        "inpaint-freeform1020",
        "--masks",
        masks,
        "--image-size",
        16,
        "--steps",
        1,
        "--batch-size",
        2,
        "--beta-max",
        1.0,
        "--run-dir",
        tmp_path / "teacher",
        "--device",
        "cpu",
        "--no-progress",
        "--sample-nfe",
        2,
        "--n-steps",
        20,
    )
    assert result.exit_code == 0, result.output
    release = tmp_path / "teacher" / "teacher.safetensors"
    _one_error_line(
        invoke(
            "eval",
            "--teacher",
            release,
            "--student",
            "none",
            "--teacher-nfe",
            1,
            "--num-images",
            2,
            "--run-dir",
            tmp_path / "eval",
        ),
        "--masks",
        "freeform1020",
    )
    result = invoke(
        "eval",
        "--teacher",
        release,
        "--student",
        "none",
        "--teacher-nfe",
        1,
        "--num-images",
        2,
        "--masks",
        masks,
        "--run-dir",
        tmp_path / "eval",
        "--classifier-epochs",
        1,
        "--classifier-items",
        8,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    _one_error_line(invoke("sample", "--model", release, "--output", tmp_path / "s"), "--masks")
    result = invoke(
        "sample",
        "--model",
        release,
        "--masks",
        masks,
        "--output",
        tmp_path / "s",
        "--num-images",
        2,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output


def test_sizes_a_degradation_cannot_take_are_refused_before_training(tmp_path):
    from ibmd_fast.train import TeacherConfig

    with pytest.raises(ValueError, match="jpeg-10 needs image sides divisible by 16, got 24x24"):
        TeacherConfig(degradation="jpeg-10", image_size=24).validate()
    TeacherConfig(degradation="jpeg-10-libjpeg", image_size=24).validate()  # libjpeg pads its blocks itself
    masks = tmp_path / "imagenet_freeform2030_masks.npz"
    write_i2sb_masks(masks, 16)
    with pytest.raises(ValueError, match="takes 16x16 images"):
        TeacherConfig(degradation="inpaint-freeform2030", masks=str(masks), image_size=32).validate()
    with pytest.raises(ValueError, match="square images only"):
        get_degradation("blur-uni").check_size(32, 48)
