"""The end of a distillation run (ibmd_fast/train/report.py): the corrupted-input row, the reading line,
and comparison.png (a whole held-out photograph in four labeled columns)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ibmd_fast.bridges import I2SBBridge
from ibmd_fast.data import HELD_OUT_PHOTO, get_degradation, held_out_photo, load_skimage_photo
from ibmd_fast import imageio
from ibmd_fast.data.images import tensor_to_uint8
from ibmd_fast.metrics import psnr, ssim
from ibmd_fast.models import Generator, Teacher, build_unet
from ibmd_fast.train import report


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1
    xT = (x0 + 0.2 * torch.randn(6, 3, 16, 16, generator=gen)).clamp(-1, 1)
    return [{"x0": x0[:4], "xT": xT[:4]}, {"x0": x0[4:], "xT": xT[4:]}], x0, xT


def test_corrupted_row_scores_the_input_itself():
    batches, x0, xT = _batches()
    row = report.corrupted_row(batches)
    assert row["model"] == "corrupted" and row["nfe"] == 0 and row["sec_per_image"] == 0.0
    assert row["psnr"] == pytest.approx(float(psnr(xT, x0).mean()), rel=1e-6)  # all six images, both batches
    assert row["ssim"] == pytest.approx(float(ssim(xT, x0).mean()), rel=1e-6)


def test_table_has_the_input_row_and_one_reading_line():
    rows = [
        report.corrupted_row(_batches()[0]),
        {"model": "teacher", "nfe": 100, "psnr": 30.0, "ssim": 0.9, "sec_per_image": 0.5},
        {"model": "student", "nfe": 1, "psnr": 31.0, "ssim": 0.91, "sec_per_image": 0.005},
    ]
    text = report.format_comparison(rows, "runs/distill")
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) + 1  # header, rule, rows, the reading line
    assert lines[2].startswith("corrupted") and lines[3].startswith("teacher") and lines[4].startswith("student")
    reading = lines[-1]
    assert "higher is better" in reading and "corrupted" in reading and "lower" in reading
    assert "runs/distill/" in reading and "comparison.png" in reading and "generator.safetensors" in reading


def test_draw_columns_lays_out_four_labeled_columns():
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 10, 14, generator=gen) * 2 - 1 for _ in range(4)]
    titles = ["corrupted", "teacher NFE 100", "student NFE 1", "clean"]
    columns = [(t, im, [f"PSNR {i}.00 dB", f"{i} ms/image"]) for i, (t, im) in enumerate(zip(titles, images))]
    zoom, pad = 3, 6
    picture = np.asarray(imageio.draw_columns(columns, zoom=zoom, pad=pad))
    top = imageio.LINE_HEIGHT + 2 * imageio.LABEL_PAD
    bottom = 2 * imageio.LINE_HEIGHT + 2 * imageio.LABEL_PAD
    assert picture.shape == (top + 10 * zoom + bottom, pad + 4 * (14 * zoom + pad), 3)
    for j, image in enumerate(images):
        left = pad + j * (14 * zoom + pad)
        expected = np.repeat(np.repeat(tensor_to_uint8(image), zoom, 0), zoom, 1)
        assert np.array_equal(picture[top : top + 10 * zoom, left : left + 14 * zoom], expected)
        title_band = picture[:top, left : left + 14 * zoom]
        label_band = picture[top + 10 * zoom :, left : left + 14 * zoom]
        assert (title_band < 128).any() and (label_band < 128).any()  # text drawn above and below
    with pytest.raises(ValueError, match="differ in size"):
        imageio.draw_columns([("a", images[0], []), ("b", torch.zeros(3, 8, 8), [])])


def test_save_grid_enlarges_small_images_and_titles_the_columns(tmp_path):
    gen = torch.Generator().manual_seed(0)
    columns = [torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1]
    path = tmp_path / "grid.png"
    imageio.save_grid(columns, str(path), titles=["corrupted", "student NFE 1"], pad=2)
    zoom = imageio.grid_zoom(32, 32)
    assert zoom == 3  # 32 px -> 96 px cells
    band = imageio.LINE_HEIGHT + 2 * imageio.LABEL_PAD
    with Image.open(path) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.shape == (band + 2 + 2 * (96 + 2), 2 + 2 * (96 + 2), 3)
    for j, images in enumerate(columns):
        for i in range(2):
            top, left = band + 2 + i * 98, 2 + j * 98
            expected = np.repeat(np.repeat(tensor_to_uint8(images[i]), 3, 0), 3, 1)
            expected = np.repeat(expected, 3 // expected.shape[2], axis=2)  # gray next to colour: RGB
            assert np.array_equal(pixels[top : top + 96, left : left + 96], expected)
        assert (pixels[:band, 2 + j * 98 : 2 + j * 98 + 96] < 128).any()  # its title
    assert imageio.grid_zoom(256, 256) == 1 and imageio.grid_zoom(28, 28) == 3
    imageio.save_grid(columns, str(path), cell=0)  # at their own size, untitled
    with Image.open(path) as grid:
        assert grid.size == (2 + 2 * 34, 2 + 2 * 34)
    with pytest.raises(ValueError, match="2 columns"):
        imageio.save_grid(columns, str(path), titles=["one"])


def _tiny_pair(degradation: str):
    bridge = I2SBBridge(n_steps=20, beta_max=1.0 if degradation.startswith("inpaint") else 0.3)
    torch.manual_seed(0)
    teacher = Teacher(build_unet("tiny", 16, 3, 3), bridge).eval()
    return teacher, Generator(teacher).eval()


@pytest.mark.parametrize("degradation", ["inpaint-center", "sr4x-bicubic"])
def test_photo_comparison_restores_the_whole_held_out_photo(tmp_path, degradation):
    teacher, student = _tiny_pair(degradation)
    path = tmp_path / "comparison.png"
    info = report.photo_comparison(
        str(path), teacher, student, 1, 2, get_degradation(degradation), 3, 2, "cpu", short_side=24, zoom=2
    )
    h, w = load_skimage_photo(HELD_OUT_PHOTO).shape[:2]
    multiple = 4 if degradation.startswith("sr4x") else 2  # the SR factor, else the network's multiple
    assert info["photo"] == HELD_OUT_PHOTO and min(info["height"], info["width"]) in range(20, 25)
    assert info["height"] % multiple == 0 and info["width"] % multiple == 0
    assert abs(info["width"] / info["height"] - w / h) < 0.1  # the whole photo, not a crop of it
    assert [c["title"] for c in info["columns"]] == ["corrupted", "teacher NFE 2", "student NFE 1", "clean"]
    corrupted, teacher_col, student_col, clean = info["columns"]
    x0 = held_out_photo(3, 24 / min(h, w), multiple)
    xT, _ = get_degradation(degradation)(x0[None])
    assert corrupted["psnr"] == pytest.approx(float(psnr(xT, x0[None]).mean()), rel=1e-5)
    assert teacher_col["ms"] > 0 and student_col["ms"] > 0 and clean["psnr"] is None and corrupted["ms"] is None
    with Image.open(path) as picture:
        assert picture.size[0] == 6 + 4 * (2 * info["width"] + 6)
        assert picture.size[1] > 2 * info["height"] + 2 * imageio.LINE_HEIGHT


def test_photo_comparison_cuts_the_hole_the_teacher_learned(tmp_path):
    """With ``hole`` the photo loses a centered square of that side (the training crops' hole), not
    half of the whole photo."""
    from ibmd_fast.data.degradations import CenterInpainting

    teacher, student = _tiny_pair("inpaint-center")
    info = report.photo_comparison(
        str(tmp_path / "c.png"),
        teacher,
        student,
        1,
        2,
        get_degradation("inpaint-center"),
        3,
        2,
        "cpu",
        short_side=24,
        zoom=2,
        hole=8,
    )
    assert info["hole"] == 8
    h, w = load_skimage_photo(HELD_OUT_PHOTO).shape[:2]
    x0 = held_out_photo(3, 24 / min(h, w), 2)
    xT, mask = CenterInpainting(hole=8)(x0[None])
    assert int(mask.sum()) == 64 and info["columns"][0]["psnr"] == pytest.approx(float(psnr(xT, x0[None])), rel=1e-5)
    whole = report.photo_comparison(
        str(tmp_path / "d.png"),
        teacher,
        student,
        1,
        2,
        get_degradation("inpaint-center"),
        3,
        2,
        "cpu",
        short_side=24,
        zoom=2,
    )
    assert whole["hole"] == info["height"] // 2  # the degradation's own: half the side


def test_photo_comparison_restores_the_hole_from_its_training_size_window(tmp_path):
    """With ``window`` the models see the window x window square around the hole (the crops they
    learned), and the photo outside it keeps its own pixels: the student's column is the window's
    restoration pasted back, and a window as large as the photo is the whole photo."""
    from ibmd_fast.data.degradations import CenterInpainting
    from ibmd_fast.restore import sample_student

    teacher, student = _tiny_pair("inpaint-center")
    info = report.photo_comparison(
        str(tmp_path / "w.png"),
        teacher,
        student,
        1,
        2,
        get_degradation("inpaint-center"),
        3,
        2,
        "cpu",
        short_side=24,
        zoom=2,
        hole=8,
        window=16,
    )
    assert info["window"] == 16 and info["hole"] == 8
    h, w = load_skimage_photo(HELD_OUT_PHOTO).shape[:2]
    x0 = held_out_photo(3, 24 / min(h, w), 2)[None]
    xT, mask = CenterInpainting(hole=8)(x0, rng=torch.Generator().manual_seed(0))
    top, left = (x0.shape[-2] - 16) // 2, (x0.shape[-1] - 16) // 2
    rows, cols = slice(top, top + 16), slice(left, left + 16)
    with torch.no_grad():
        part = sample_student(student, xT[..., rows, cols], 1, mask[..., rows, cols], seed=0)
    pasted = xT.clone()
    pasted[..., rows, cols] = part
    assert info["columns"][2]["psnr"] == pytest.approx(float(psnr(pasted.clamp(-1, 1), x0)), rel=1e-6)
    with torch.no_grad():
        whole = sample_student(student, xT, 1, mask, seed=0)
    assert float(psnr(whole.clamp(-1, 1), x0)) != pytest.approx(info["columns"][2]["psnr"], rel=1e-6)
    same = report.photo_comparison(
        str(tmp_path / "x.png"),
        teacher,
        student,
        1,
        2,
        get_degradation("inpaint-center"),
        3,
        2,
        "cpu",
        short_side=24,
        zoom=2,
        hole=8,
        window=max(x0.shape[-2:]),
    )
    assert same["window"] is None


def test_held_out_photo_is_whole_and_sized_for_the_network():
    full = load_skimage_photo(HELD_OUT_PHOTO)  # 300 x 451
    photo = held_out_photo(3, 0.25, 8)
    assert photo.shape == (3, 72, 112)  # round(300/4)=75 -> 72, round(451/4)=113 -> 112: center crops of 1-2 px
    assert full.shape[:2] == (300, 451)
    assert held_out_photo(1, 0.25, 8).shape == (1, 72, 112)
    assert -1 <= float(photo.min()) and float(photo.max()) <= 1 and float(photo.std()) > 0.1


def test_photo_comparison_draws_score_further_samples_of_the_same_photo(tmp_path):
    """``draws``: the photo restored again with other noise (one batch, the seed after the picture's);
    each draw's PSNR is that of the window's restoration pasted into the photo, as the picture's is."""
    from ibmd_fast.data.degradations import CenterInpainting
    from ibmd_fast.restore import sample_student, sample_teacher

    teacher, student = _tiny_pair("inpaint-center")
    kwargs = dict(short_side=24, zoom=2, hole=8, window=16)
    info = report.photo_comparison(
        str(tmp_path / "d.png"),
        teacher,
        student,
        1,
        2,
        get_degradation("inpaint-center"),
        3,
        2,
        "cpu",
        draws=3,
        **kwargs,
    )
    assert info["draw_seed"] == 1 and [len(v) for v in info["draws"].values()] == [3, 3]
    h, w = load_skimage_photo(HELD_OUT_PHOTO).shape[:2]
    x0 = held_out_photo(3, 24 / min(h, w), 2)[None]
    xT, mask = CenterInpainting(hole=8)(x0, rng=torch.Generator().manual_seed(0))
    top, left = (x0.shape[-2] - 16) // 2, (x0.shape[-1] - 16) // 2
    rows, cols = slice(top, top + 16), slice(left, left + 16)
    window, hole = xT[..., rows, cols].repeat(3, 1, 1, 1), mask[..., rows, cols].repeat(3, 1, 1, 1)
    with torch.no_grad():
        outs = {
            "teacher": sample_teacher(teacher, window, 2, hole, seed=1),
            "student": sample_student(student, window, 1, hole, seed=1),
        }
    for name, out in outs.items():
        pasted = xT.repeat(3, 1, 1, 1)
        pasted[..., rows, cols] = out
        expected = [float(v) for v in psnr(pasted.clamp(-1, 1), x0.expand(3, -1, -1, -1))]
        assert info["draws"][name] == pytest.approx(expected, rel=1e-6), name
    assert len(set(info["draws"]["teacher"])) == 3  # other noise for each draw: three different fills
    assert info["columns"][1]["psnr"] not in info["draws"]["teacher"]  # the picture's draw is not among them
    plain = report.photo_comparison(
        str(tmp_path / "e.png"), teacher, student, 1, 2, get_degradation("inpaint-center"), 3, 2, "cpu", **kwargs
    )
    assert (
        "draws" not in plain and "draw_seed" not in plain
    )  # and the draws leave the picture's own columns as they were
    assert [c["psnr"] for c in plain["columns"]] == [c["psnr"] for c in info["columns"]]
