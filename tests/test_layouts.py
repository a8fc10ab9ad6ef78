"""DDBM / DBIM paired layouts (edges2handbags, diode) and folders that start in seconds (lazy check,
shared listings)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ibmd_fast.data import (
    DIODE,
    BridgePairs,
    CorruptedOnly,
    EdgesToHandbags,
    ImageFolder,
    Listing,
    UnreadableImageWarning,
    collate,
    make_dataset,
    make_source,
)
from ibmd_fast.train.batches import shared_dataset
from ibmd_fast.train.distributed import DistEnv

from conftest import run_torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a transcription of DiffusionBridge's transforms
# datasets/aligned_dataset.py: get_transform = __scale (resize to crop_size x crop_size with `method`),
# __flip (params["flip"], the same for both images), ToTensor, then t * 2 - 1. EdgesDataset splits the
# pix2pix file at int(w / 2) and returns (B, A); DIODE returns (image, normal map resized with NEAREST).


def reference_transform(image: Image.Image, size: int, method, flip: bool) -> torch.Tensor:
    image = image.resize((size, size), method)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # ToTensor
    return tensor * 2 - 1


def reference_e2h(path: Path, size: int, flip: bool):
    pair = Image.open(path).convert("RGB")
    w, h = pair.size
    w2 = int(w / 2)
    a, b = pair.crop((0, 0, w2, h)), pair.crop((w2, 0, w, h))
    return reference_transform(b, size, Image.BICUBIC, flip), reference_transform(a, size, Image.BICUBIC, flip)


def reference_diode(folder: Path, name: str, size: int, flip: bool):
    image = Image.open(folder / name).convert("RGB")
    label = Image.open(folder / (name[:-4] + "_normal.png")).convert("RGB")
    return reference_transform(image, size, Image.BICUBIC, flip), reference_transform(label, size, Image.NEAREST, flip)


# ---------------------------------------------------------------- generated folders


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [
        0.5 + 0.3 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy) + 0.05 * rng.standard_normal((h, w))
        for _ in range(3)
    ]
    return np.clip(np.stack(planes, -1) * 255, 0, 255).astype(np.uint8)


def _edges(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)  # black strokes on white, as pix2pix's edge maps
    for _ in range(4):
        if rng.random() < 0.5:
            out[rng.integers(0, h), :] = 0
        else:
            out[:, rng.integers(0, w)] = 0
    return out


@pytest.fixture()
def e2h_root(tmp_path: Path) -> Path:
    """edges2handbags: 5 train pairs (one with an odd width, one in a subfolder), 2 val pairs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "edges2handbags"
    shapes = {"train": [(40, 40)] * 4 + [(36, 40)], "val": [(40, 40)] * 2}
    for split, sizes in shapes.items():
        for i, (h, half) in enumerate(sizes):
            pair = np.concatenate([_edges(rng, h, half), _photo(rng, h, half + (i == 3))], axis=1)
            sub = "nested/" if i == 4 else ""
            path = root / split / f"{sub}{i}_AB.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pair).save(path, quality=95)
    (root / "train" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def diode_root(tmp_path: Path) -> Path:
    """DIODE-256's layout: X.png, X_depth.png, X_normal.png; 4 train photos, 2 val photos."""
    rng = np.random.default_rng(1)
    root = tmp_path / "DIODE-256"
    for split, n in (("train", 4), ("val", 2)):
        folder = root / split
        folder.mkdir(parents=True)
        for i in range(n):
            name = f"{i:05d}_{i + 7:05d}_outdoor_000_010"
            Image.fromarray(_photo(rng, 48, 48)).save(folder / f"{name}.png")
            # sharp random blocks: nearest and bicubic resizing give different values
            normal = np.kron(rng.integers(0, 256, (12, 12, 3)), np.ones((4, 4, 1))).astype(np.uint8)
            Image.fromarray(normal).save(folder / f"{name}_normal.png")
            Image.fromarray(_photo(rng, 48, 48)).save(folder / f"{name}_depth.png")
    return root


def _item(dataset, index: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return dataset[index]


def _match(item: dict, expected_x0: torch.Tensor, expected_xT: torch.Tensor) -> bool:
    return torch.allclose(item["x0"], expected_x0, atol=1e-6) and torch.allclose(item["xT"], expected_xT, atol=1e-6)


# ---------------------------------------------------------------- edges2handbags


def test_e2h_pairs_shapes_ranges_and_transforms(e2h_root: Path):
    train = EdgesToHandbags(e2h_root, "train", size=32)
    assert len(train) == 5 and train.files[-1] == "nested/4_AB.jpg" and train.flip
    flips = set()
    for index, rel in enumerate(train.files):
        for seed in range(6):
            item = _item(train, index, seed)
            assert set(item) == {"x0", "xT"}
            assert item["x0"].shape == item["xT"].shape == (3, 32, 32) and item["x0"].dtype == torch.float32
            assert -1 <= item["x0"].min() and item["x0"].max() <= 1
            # x0 is the photo (B, right), xT the edges (A, left), flipped together or not at all
            unflipped = _match(item, *reference_e2h(e2h_root / "train" / rel, 32, False))
            flipped = _match(item, *reference_e2h(e2h_root / "train" / rel, 32, True))
            assert unflipped != flipped, (rel, seed)
            flips.add(flipped)
    assert flips == {True, False}
    # the edges side is nearly black and white, the photo side is not
    item = _item(train, 0, 0)
    assert (item["xT"].abs() > 0.8).float().mean() > 0.8 and (item["x0"].abs() > 0.8).float().mean() < 0.2

    test = EdgesToHandbags(e2h_root, "test", size=32)  # val/, never flipped (their random_flip=False)
    assert len(test) == 2 and not test.flip
    for index, rel in enumerate(test.files):
        assert _match(_item(test, index, 3), *reference_e2h(e2h_root / "val" / rel, 32, False))


def test_e2h_odd_width_splits_as_theirs(e2h_root: Path):
    native = EdgesToHandbags(e2h_root, "train", size=None, flip=False)
    item = native[native.files.index("3_AB.jpg")]  # 40 + 41 = 81 px wide: A is 40, B 41
    assert item["xT"].shape == (3, 40, 40) and item["x0"].shape == (3, 40, 41)


def test_e2h_specs_corrupted_only_and_bridge_pairs(e2h_root: Path):
    pairs = make_dataset(f"edges2handbags:{e2h_root}", size=32, split="test")
    assert isinstance(pairs, BridgePairs) and set(pairs[0]) == {"x0", "xT"}
    only = make_dataset(f"edges2handbags:{e2h_root}", size=32, split="train", corrupted_only=True)
    assert isinstance(only, EdgesToHandbags) and only.corrupted_only and len(only) == 5
    item = _item(only, 0, 0)
    assert set(item) == {"xT"}
    expected = [reference_e2h(e2h_root / "train" / only.files[0], 32, f)[1] for f in (False, True)]
    assert any(torch.allclose(item["xT"], e, atol=1e-6) for e in expected)
    wrapped = CorruptedOnly(make_source(f"edges2handbags:{e2h_root}", size=32))
    assert not wrapped.synthetic and set(wrapped[1]) == {"xT"}
    batch = collate([only[i] for i in range(4)])
    assert batch["xT"].shape == (4, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        make_source(f"edges2handbags:{e2h_root / 'train'}", size=32)


# ---------------------------------------------------------------- diode


def test_diode_pairs_nearest_condition_and_transforms(diode_root: Path):
    train = DIODE(diode_root, "train", size=32)
    assert len(train) == 4 and all(n.endswith("_normal.png") and not p.endswith("_depth.png") for p, n in train.pairs)
    flips = set()
    for index, (photo, _) in enumerate(train.pairs):
        for seed in range(6):
            item = _item(train, index, seed)
            assert item["x0"].shape == item["xT"].shape == (3, 32, 32)
            assert -1 <= item["xT"].min() and item["xT"].max() <= 1
            unflipped = _match(item, *reference_diode(diode_root / "train", photo, 32, False))
            flipped = _match(item, *reference_diode(diode_root / "train", photo, 32, True))
            assert unflipped != flipped
            flips.add(flipped)
    assert flips == {True, False}
    # nearest: every value of the condition is a value of the normal map file (bicubic would blend them)
    item = DIODE(diode_root, "test", size=32)[0]
    normal = np.array(Image.open(diode_root / "val" / DIODE(diode_root, "test").pairs[0][1]).convert("RGB"))
    values = set(((item["xT"] + 1) * 127.5).round().to(torch.int64).flatten().tolist())
    assert values <= set(normal.flatten().tolist())


def test_diode_corrupted_only_never_opens_the_photo(diode_root: Path):
    for photo in (diode_root / "train").glob("*[0-9].png"):
        photo.write_bytes(b"not a png")  # distillation must not need it
    only = make_dataset(f"diode:{diode_root}", size=32, corrupted_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableImageWarning)
        items = [only[i] for i in range(len(only))]
    assert all(set(i) == {"xT"} and i["xT"].shape == (3, 32, 32) for i in items)


def test_diode_missing_normal_map(diode_root: Path):
    os.remove(next((diode_root / "train").glob("*_normal.png")))
    with pytest.raises(ValueError, match="1 photo.* no normal map"):
        DIODE(diode_root, "train")
    with pytest.warns(UserWarning, match="dropping them"):
        assert len(DIODE(diode_root, "train", allow_unmatched=True)) == 3


# ---------------------------------------------------------------- lazy check and shared listings


@pytest.fixture()
def folder_with_bad_files(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    root = tmp_path / "images"
    for i in range(12):
        path = root / f"c{i % 3}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(rng, 20 + i, 24)).save(path, quality=90)
    data = (root / "c0" / "000.jpg").read_bytes()
    (root / "c1" / "bad-truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "c2" / "bad-text.jpg").write_text("not an image")
    return root


def test_folder_is_listed_not_decoded(folder_with_bad_files: Path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a file was opened while building the data set")

    with monkeypatch.context() as m:
        m.setattr(Image, "open", refuse)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = ImageFolder(folder_with_bad_files, size=16, crop="random", flip=True)
    assert len(ds) == 14  # the two bad files are still listed: they are met later


def test_bad_file_skipped_with_one_warning_each(folder_with_bad_files: Path):
    ds = ImageFolder(folder_with_bad_files, size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second epoch meets the same files: no new warning
            items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) for x in items)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == 2 and any("bad-truncated.jpg" in m for m in messages)
    assert any("bad-text.jpg" in m for m in messages) and len(ds.runtime_skipped) == 2


def test_bad_files_do_not_kill_workers(folder_with_bad_files: Path):
    ds = CorruptedOnly(ImageFolder(folder_with_bad_files, size=16), "jpeg-10")
    loader = DataLoader(ds, batch_size=7, num_workers=2, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(loader)
    assert [b["xT"].shape[0] for b in batches] == [7, 7]


def test_listing_written_once_and_read_by_the_others(folder_with_bad_files: Path, tmp_path: Path):
    cache = tmp_path / "run" / "listings"
    first = ImageFolder(folder_with_bad_files, listing=Listing(cache, write=True))
    files = list(cache.glob("listing-images-*.txt"))
    assert len(files) == 1 and files[0].read_text().splitlines()[1:] == first.files
    # a file added afterwards: a reader sees rank 0's listing, not the folder (it did not walk)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder_with_bad_files / "late.png")
    second = ImageFolder(folder_with_bad_files, listing=Listing(cache, write=False))
    assert second.files == first.files and "late.png" not in second.files
    # no listing there (a run folder not shared between machines): walk, with one warning
    with pytest.warns(UserWarning, match="listing the folder here instead"):
        third = ImageFolder(folder_with_bad_files, listing=Listing(tmp_path / "elsewhere", write=False))
    assert "late.png" in third.files


class _FakeRanks(DistEnv):
    """Two ranks without a process group: ``broadcast`` hands out what rank 0 said."""

    said = None

    @property
    def distributed(self) -> bool:
        return True

    def broadcast(self, obj):
        if self.is_main:
            _FakeRanks.said = obj
        return _FakeRanks.said


def test_shared_dataset_rank0_lists_others_read(e2h_root: Path, tmp_path: Path, monkeypatch):
    import ibmd_fast.data.folders as folders

    walks = []
    real = folders._walk_images
    monkeypatch.setattr(
        folders, "_walk_images", lambda root, recursive=True: walks.append(root) or real(root, recursive)
    )

    def build(listing):
        return make_dataset(f"edges2handbags:{e2h_root}", size=16, corrupted_only=True, listing=listing)

    run = str(tmp_path / "run")
    rank0 = shared_dataset(build, _FakeRanks(rank=0, world_size=2), run)
    rank1 = shared_dataset(build, _FakeRanks(rank=1, world_size=2), run)
    assert rank0.files == rank1.files and len(walks) == 1  # one walk for both ranks
    assert len(os.listdir(os.path.join(run, "listings"))) == 1

    def broken(listing):
        raise ValueError("no such layout")

    with pytest.raises(ValueError, match="no such layout"):
        shared_dataset(broken, _FakeRanks(rank=0, world_size=2), run)
    with pytest.raises(RuntimeError, match="rank 0 could not build the training data: ValueError: no such layout"):
        shared_dataset(build, _FakeRanks(rank=1, world_size=2), run)


# ---------------------------------------------------------------- a DDBM teacher distills on its layout


@pytest.mark.parametrize("preset", ["e2h", "diode"])
def test_imported_teacher_distills_on_its_layout_with_only_data(
    preset: str, e2h_root: Path, diode_root: Path, tmp_path: Path
):
    from ibmd_fast.models import UNet
    from ibmd_fast.release import read_release
    from ibmd_fast.importers import import_teacher
    from ibmd_fast.importers.ddbm import ddbm_kwargs
    from ibmd_fast.importers.weights import unet_kwargs
    from ibmd_fast.train import distill

    small = dict(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="8",
        num_heads=2,
        num_head_channels=-1,
    )
    torch.manual_seed(0)
    net = UNet(**unet_kwargs(ddbm_kwargs(preset, None, small), 6, 3))
    ckpt = tmp_path / f"{preset}_ema_0.9999_1.pt"
    torch.save(net.state_dict(), ckpt)
    teacher = tmp_path / f"{preset}.safetensors"
    config = import_teacher(ckpt, "ddbm", teacher, preset=preset, **small)
    layout = {"e2h": "edges2handbags", "diode": "diode"}[preset]
    assert config["data_layout"] == layout
    root = e2h_root if preset == "e2h" else diode_root

    run = tmp_path / f"run-{preset}"
    summary = distill(
        run_dir=str(run),
        teacher=str(teacher),
        data=str(root),
        steps=1,
        inner_steps=1,
        batch_size=2,
        eval_items=2,
        eval_teacher_nfe=(1,),
        device="cpu",
        progress=False,
    )
    assert np.isfinite(summary["loss_theta"]) and np.isfinite(summary["loss_phi"])
    assert [row["model"] for row in summary["comparison"]][:2] == ["corrupted", "teacher"]
    _, released, _ = read_release(summary["release"], expect="ibmd_fast.generator")
    assert released["data"] == f"{layout}:{root}" and released["image_size"] == 16
    assert released["degradation"] == ("sketch" if preset == "e2h" else None)
    assert len(list((run / "listings").glob("listing-*.txt"))) == 1
    # eval reads the layout's val/ pairs with no degradation given (DIODE's release names none)
    from ibmd_fast.classifier import Classifier
    from ibmd_fast.evaluate import evaluate

    result = evaluate(
        teacher=str(teacher),
        student=summary["release"],
        data=f"{layout}:{root}",
        teacher_nfe=(1,),
        num_images=2,
        classifier=Classifier(3, 4, 16, width=8),
        run_dir=None,
        device="cpu",
    )
    assert [row["model"] for row in result["results"]] == ["corrupted", "teacher", "student"]


_RANKS_SCRIPT = """
import json, sys, warnings
from ibmd_fast.data import make_dataset
from ibmd_fast.train import distributed
from ibmd_fast.train.batches import shared_dataset
import ibmd_fast.data.folders as folders

walks = []
real = folders._walk_images
folders._walk_images = lambda root, recursive=True: walks.append(str(root)) or real(root, recursive)
env = distributed.init("cpu")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = shared_dataset(lambda listing: make_dataset(sys.argv[1], size=16, corrupted_only=True, listing=listing),
                        env, sys.argv[2])
out = {"rank": env.rank, "world": env.world_size, "walks": len(walks), "files": ds.files,
       "warnings": [str(w.message) for w in caught]}
with open(sys.argv[3] + f".{env.rank}.json", "w") as fh:
    json.dump(out, fh)
"""


def test_torchrun_ranks_share_one_listing(e2h_root: Path, tmp_path: Path):
    """Under torchrun (gloo, 2 processes): rank 0 walks the folder once, rank 1 reads its listing."""
    import json
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        f"edges2handbags:{e2h_root}",
        str(tmp_path / "run"),
        str(tmp_path / "out"),
    ]
    run_torchrun(cmd, repo, env, timeout=120)
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["walks"] for r in ranks] == [1, 0]  # rank 1 never walked the folder
    assert ranks[0]["files"] == ranks[1]["files"] and len(ranks[0]["files"]) == 5
    assert ranks[0]["warnings"] == [] and ranks[1]["warnings"] == []
    assert len(list((tmp_path / "run" / "listings").glob("listing-*.txt"))) == 1


def test_bench_data_makes_a_folder_and_measures_it(tmp_path: Path):
    """benchmarks/bench_data.py as a user runs it, at toy size: --make, then the measurement and its JSON."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    root, out = tmp_path / "jpegs", tmp_path / "bench.json"

    def run(*args):
        proc = subprocess.run(
            [sys.executable, str(repo / "benchmarks" / "bench_data.py"), "--root", str(root), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    run("--make", 40, "--bad", 2, "--processes", 1, "--min-side", 32, "--max-side", 48)
    assert len(list(root.rglob("*.jpg"))) == 42
    printed = run(
        "--images",
        4,
        "--batch-size",
        4,
        "--workers",
        1,
        "--image-size",
        32,
        "--load-check-classes",
        1,
        "--degradations",
        "jpeg-10,none",
        "--machine",
        "test",
        "--out",
        out,
    )
    report = json.loads(out.read_text())
    assert report["folder"]["jpegs"] == 40 and report["first_batch"]["rank0"]["items"] == 42
    assert report["first_batch"]["other_ranks"]["listing"] == "read from rank 0's file"
    assert [r["degradation"] for r in report["pipeline_per_worker"]] == ["jpeg-10", "none"]
    assert report["ibmd_step_consumes"]["images_per_s_per_gpu"] == pytest.approx(6 * 8 * 0.382, abs=0.01)
    assert "an IBMD step consumes 18.3 img/s per GPU" in printed
