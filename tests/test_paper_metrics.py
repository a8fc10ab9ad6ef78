"""The paper's metrics (ibmd_fast.paper_metrics) against the libraries the teachers' code calls.

Networks with random weights in the exact layouts of the real files stand in for them (nothing is
downloaded): pytorch-fid's FID Inception (torchvision Inception3 with FIDInceptionA/C/E) saved as
pt_inception-2015-12-05-6726825d.pth; a TorchScript module with the interface of
inception-2015-12-05.pt (forward(img, return_features), .layers, .output); torchvision's resnet50().
The reference numbers are computed the way I2SB's evaluation/fid_util.py and compute_metrices.py and
DBIM's evaluations/evaluator.py compute them, through clean-fid itself.

These need torchvision and clean-fid (pip install '.[metrics]', a torch whose torchvision loads). They
skip without them, unless IBMD_FAST_REQUIRE_METRICS=1 (set by .ci/run), where a missing library fails.
"""

import os

import numpy as np
import pytest
import torch

from ibmd_fast import metrics, paper_metrics


def _require(module):
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("IBMD_FAST_REQUIRE_METRICS") == "1":
            pytest.fail(f"IBMD_FAST_REQUIRE_METRICS=1 but {module} does not import", pytrace=False)
        raise


torchvision = _require("torchvision")
cleanfid_features = _require("cleanfid.features")
cleanfid_fid = _require("cleanfid.fid")
cleanfid_resize = _require("cleanfid.resize")
cleanfid_inception = _require("cleanfid.inception_pytorch")
cleanfid_torchscript = _require("cleanfid.inception_torchscript")
pytorch_fid_inception = _require("pytorch_fid.inception")

from torchvision.transforms import ToTensor  # noqa: E402


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2.2 - 1.1  # a little outside [-1, 1]: clamping counts


def _convert_to_numpy(t):  # I2SB compute_metrices.convert_to_numpy
    out = (t + 1) * 127.5
    return out.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ----------------------------------------------------------------------------------------
# Weight files in the real layouts


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _randomize(module, seed):
    """He-normal convolutions and varied BatchNorm statistics: deep random networks with PyTorch's default
    init shrink every input to nearly the same features, which would make any two FIDs look equal."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.fixture(scope="module")
def fid_inception_file(weights_dir):
    """pytorch-fid's fid_inception_v3() layout with random weights, saved as its release file."""
    torch.manual_seed(0)
    pf = pytorch_fid_inception
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    _randomize(net, 1)
    path = weights_dir / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return str(path)


class _TorchScriptInception(torch.nn.Module):
    """The interface of inception-2015-12-05.pt: forward(img [0, 255], return_features) resizes to 299
    (bilinear) inside, normalises (x - 128) / 128, runs .layers to [B, 2048] pool features; without
    return_features it returns the softmax of .output (1008 classes)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 7, stride=4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 2048, 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.shape[2] != 299 or img.shape[3] != 299:
            img = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        x = (img - 128) / 128
        features = self.layers(x).view(-1, 2048)
        if return_features:
            return features
        return torch.softmax(self.output(features), dim=1)


@pytest.fixture(scope="module")
def tf_inception_file(weights_dir):
    torch.manual_seed(2)
    net = _TorchScriptInception().eval()
    _randomize(net, 5)
    path = weights_dir / "inception-2015-12-05.pt"
    torch.jit.script(net).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def resnet_file(weights_dir):
    torch.manual_seed(3)
    net = torchvision.models.resnet50()
    _randomize(net, 4)
    path = weights_dir / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------------------
# The libraries, called as the teachers' evaluation code calls them


def _library_features_i2sb(images, weights_file, monkeypatch):
    """I2SB evaluation/fid_util.py: NumpyResizeDataset (clean-fid's resizer, ToTensor) + clean-fid's
    legacy_pytorch feature extractor + get_batch_features; the weights come from the local file."""
    state = torch.load(weights_file, weights_only=True)
    monkeypatch.setattr(cleanfid_inception, "load_state_dict_from_url", lambda url, **kw: state)
    model = cleanfid_features.build_feature_extractor("legacy_pytorch", torch.device("cpu"), use_dataparallel=False)
    fn_resize = cleanfid_resize.build_resizer("legacy_pytorch")
    batch = []
    for img_np in _convert_to_numpy(images):
        img_resized = fn_resize(img_np)
        if img_resized.dtype == "uint8":
            batch.append(ToTensor()(np.array(img_resized)) * 255)
        else:
            batch.append(ToTensor()(img_resized))
    return cleanfid_fid.get_batch_features(torch.stack(batch), model, torch.device("cpu"))


def _library_features_dbim(images, weights_file, monkeypatch):
    """DBIM evaluations/evaluator.py, MODE legacy_tensorflow: uint8 NHWC -> float NCHW -> clean-fid's
    torchscript feature extractor (resize inside); returns (features, logits = base.output(features))."""
    original = cleanfid_torchscript.InceptionV3W
    folder = os.path.dirname(weights_file)
    built = []

    def local(path, download=True, resize_inside=False):
        built.append(original(folder, download=False, resize_inside=resize_inside))
        return built[-1]

    monkeypatch.setattr(cleanfid_features, "InceptionV3W", local)
    model = cleanfid_features.build_feature_extractor("legacy_tensorflow", torch.device("cpu"), use_dataparallel=False)
    batch = torch.from_numpy(_convert_to_numpy(images).transpose([0, 3, 1, 2])).float()
    with torch.no_grad():
        features = model(batch)
        logits = built[0].base.output(features)
    return features.numpy(), logits.numpy()


def _stats(f):
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


# clean-fid's frechet_distance takes a general matrix square root (scipy.linalg.sqrtm), which needs
# minutes for 2048 x 2048 on two shared cores; ibmd-fast's FID (metrics.fid_from_stats) needs seconds.
# Features are compared in all 2048 dimensions; the two FIDs on the first DIMS of those same features.
DIMS = 96


def _check_fid(f_ours, f_ours_ref, f_lib, f_lib_ref):
    fid_lib = cleanfid_fid.frechet_distance(*_stats(f_lib[:, :DIMS]), *_stats(f_lib_ref[:, :DIMS]))
    fid_ours = metrics.fid_from_stats(*_stats(f_ours[:, :DIMS]), *_stats(f_ours_ref[:, :DIMS]))
    assert fid_lib > 1e-3
    assert abs(fid_ours - fid_lib) / fid_lib <= 1e-4, (fid_ours, fid_lib)
    return fid_ours


# ----------------------------------------------------------------------------------------
# FID


def test_i2sb_inception_features_and_fid_equal_clean_fid(fid_inception_file, monkeypatch, tmp_path):
    restored, clean = _images(6, seed=0), _images(6, seed=1)
    ours = paper_metrics.load_inception("inception-pytorch", fid_inception_file)
    f_ours, f_clean = ours.features(restored).double().numpy(), ours.features(clean).double().numpy()
    assert f_ours.shape == (6, 2048)
    f_lib = _library_features_i2sb(restored, fid_inception_file, monkeypatch)
    f_lib_clean = _library_features_i2sb(clean, fid_inception_file, monkeypatch)
    np.testing.assert_allclose(f_ours, f_lib, rtol=1e-5, atol=1e-6)

    _check_fid(f_ours, f_clean, f_lib, f_lib_clean)
    # the full 2048-d FID against cached reference statistics (the --fid-ref path) is the same number
    ref = tmp_path / "ref.npz"
    paper_metrics.save_reference_stats(str(ref), f_clean)
    full = metrics.fid_from_stats(*_stats(f_ours), *paper_metrics.reference_stats(str(ref)))
    assert full == pytest.approx(metrics.fid_from_stats(*_stats(f_lib), *_stats(f_lib_clean)), rel=1e-4)


def test_dbim_inception_features_fid_and_is_equal_clean_fid(tf_inception_file, monkeypatch):
    restored, clean = _images(12, size=24, seed=2), _images(12, size=24, seed=3)
    ours = paper_metrics.load_inception("inception-tf", tf_inception_file)
    f_ours, logits_ours = ours.features_and_logits(restored)
    f_lib, logits_lib = _library_features_dbim(restored, tf_inception_file, monkeypatch)
    np.testing.assert_allclose(f_ours.numpy(), f_lib, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits_ours.numpy(), logits_lib, rtol=1e-5, atol=1e-6)

    f_lib_clean, _ = _library_features_dbim(clean, tf_inception_file, monkeypatch)
    _check_fid(f_ours.double().numpy(), ours.features(clean).double().numpy(), f_lib, f_lib_clean)

    # DBIM's compute_inception_score, written out: softmax, then exp(mean KL) per split of 5000
    preds = torch.softmax(torch.from_numpy(logits_lib), dim=-1).numpy()
    kl = preds * (np.log(preds) - np.log(np.expand_dims(np.mean(preds, 0), 0)))
    assert paper_metrics.inception_score(logits_ours) == pytest.approx(float(np.exp(np.mean(np.sum(kl, 1)))), rel=1e-6)


def test_inception_features_feed_the_bootstrap(tf_inception_file):
    ours = paper_metrics.load_inception("inception-tf", tf_inception_file)
    f, r = ours.features(_images(10, seed=4)).double(), ours.features(_images(10, seed=5)).double()
    assert f.shape == (10, 2048)
    # all 2048 dimensions: 10 items < 2048 features, so every resample is a 10 x 10 eigensolve (MATH.md 7)
    boot = metrics.bootstrap_fid(f, r, num_resamples=20)
    assert boot["fid"] == pytest.approx(metrics.fid_from_features(f, r), rel=1e-5)  # scipy sqrtm, rank 9
    paired = metrics.paired_bootstrap_fid_diff(f, f, r, num_resamples=20)
    assert paired["diff"] == 0 and paired["ci"] == [0, 0]
    # against fixed statistics (an .npz's mu and sigma): only the restored images are resampled
    big = ours.features(_images(40, seed=6)).double().numpy()
    fixed = (big.mean(axis=0), np.cov(big, rowvar=False))
    boot = metrics.bootstrap_fid(f, fixed, num_resamples=20)
    # fid_from_stats solves in 2048 dimensions, where the rank-9 covariance leaves ~2000 round-off
    # eigenvalues whose square roots add about 1e-6 relative; the N x N route has none
    assert boot["fid"] == pytest.approx(
        metrics.fid_from_stats(f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False), *fixed), rel=1e-5
    )
    assert boot["ci"][0] <= boot["fid"] <= boot["ci"][1]


# ----------------------------------------------------------------------------------------
# CA


class _ImageNormalizer(torch.nn.Module):  # I2SB evaluation/resnet.py
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, image):
        image = (image + 1) / 2
        image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bicubic")
        return (image - self.mean) / self.std


def test_resnet50_ca_equals_i2sb(resnet_file):
    images = _images(10, size=40, seed=6)
    ours = paper_metrics.load_resnet50(resnet_file)
    net = torchvision.models.resnet50()
    net.load_state_dict(torch.load(resnet_file, weights_only=True))
    i2sb = torch.nn.Sequential(_ImageNormalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), net).eval()
    x = torch.stack([ToTensor()(a) * 2 - 1 for a in _convert_to_numpy(images)])  # compute_metrices.NumpyDataset
    with torch.no_grad():
        logits = i2sb(x)
    expected = logits.argmax(dim=1)
    # the logits too: random weights make top-1 too robust to notice a changed quantisation or resize
    torch.testing.assert_close(ours.logits(images), logits, rtol=1e-4, atol=1e-4)
    labels = expected.clone()
    labels[::2] = (labels[::2] + 1) % 1000  # half of them wrong
    assert torch.equal(ours.logits(images).argmax(dim=1), expected)
    assert ours.correct(images, labels).tolist() == [i % 2 == 1 for i in range(10)]


# ----------------------------------------------------------------------------------------
# Files: missing or wrong weights say which file and where it is published


def test_missing_and_wrong_weights_name_the_file(tmp_path, tf_inception_file, fid_inception_file, resnet_file):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*github.com/mseitzer"):
        paper_metrics.load_inception("inception-pytorch", str(tmp_path / "nope.pth"))
    with pytest.raises(
        ValueError, match="inception-2015-12-05.pt is not a readable state dict.*pt_inception-2015-12-05-6726825d.pth"
    ):
        paper_metrics.load_inception("inception-pytorch", tf_inception_file)
    with pytest.raises(ValueError, match="does not fit pytorch-fid's FID Inception.*github.com/mseitzer"):
        paper_metrics.load_inception("inception-pytorch", resnet_file)  # a state dict, of another network
    with pytest.raises(ValueError, match="resnet50-0676ba61.pth.*download.pytorch.org"):
        paper_metrics.load_resnet50(fid_inception_file)
    with pytest.raises(ValueError, match="inception-2015-12-05.pt.*nvlabs"):
        paper_metrics.load_inception("inception-tf", fid_inception_file)
    renamed = tmp_path / "my-inception.pt"  # any file name works
    renamed.write_bytes(open(tf_inception_file, "rb").read())
    assert paper_metrics.load_inception("inception-tf", str(renamed)).features(_images(2, seed=7)).shape == (2, 2048)


# ----------------------------------------------------------------------------------------
# ibmd-fast eval with the paper's networks, and class labels from folders


SIZE = 16


def _labelled_folder(root, classes=("n01440764", "n01443537"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _tiny_teacher(path):
    from ibmd_fast.bridges import I2SBBridge
    from ibmd_fast.models import build_unet
    from ibmd_fast.release import TEACHER_FORMAT, save_release

    torch.manual_seed(0)
    net = build_unet("tiny", SIZE, 3, 3).eval()
    save_release(
        str(path),
        net,
        TEACHER_FORMAT,
        {
            "unet": net.config,
            "conditional": False,
            "bridge": I2SBBridge(n_steps=100).config(),
            "nfe": 1,
            "degradation": "sr4x-bicubic",
            "image_size": SIZE,
            "channels": 3,
            "data": "skimage",
        },
    )
    return str(path)


def test_labelled_folder_numbers_classes_as_imagefolder(tmp_path):
    from ibmd_fast.data import make_source

    root = _labelled_folder(tmp_path / "data", classes=("zebra", "ant", "moth"), per_class=2)
    source = make_source(f"classes:{root}", size=SIZE, split="test")
    reference = torchvision.datasets.ImageFolder(str(root))
    assert [source[i][1] for i in range(len(source))] == [y for _, y in reference.samples]
    assert source.classes == reference.classes
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{rel},{7 + i}\n" for i, rel in enumerate(source.files)))
    by_csv = make_source(f"classes:{root},{csv}", size=SIZE, split="test")
    assert [by_csv[i][1] for i in range(len(by_csv))] == list(range(7, 13))
    csv.write_text("ant/0.png,1\n")
    with pytest.raises(ValueError, match="have no label"):
        make_source(f"classes:{root},{csv}", size=SIZE, split="test")


def test_eval_cli_with_inception_and_resnet(tmp_path, tf_inception_file, resnet_file, fid_inception_file):
    import json

    from click.testing import CliRunner

    from ibmd_fast.cli import cli

    teacher = _tiny_teacher(tmp_path / "teacher.safetensors")
    data = _labelled_folder(tmp_path / "imagenet")
    run_dir = tmp_path / "eval"
    args = [
        "eval",
        "--teacher",
        teacher,
        "--student",
        "none",
        "--teacher-nfe",
        "1",
        "--num-images",
        6,
        "--data",
        f"classes:{data}",
        "--features",
        f"inception-tf:{tf_inception_file}",
        "--ca",
        f"resnet50:{resnet_file}",
        "--fid-ref",
        str(data),
        "--run-dir",
        str(run_dir),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "IS" in result.stdout and "CA %" in result.stdout and "features inception-tf" in result.stdout
    payload = json.loads((run_dir / "eval.json").read_text())
    rows = {r["model"]: r for r in payload["results"]}
    for row in rows.values():
        assert isinstance(row["fid"], float) and isinstance(row["is"], float) and isinstance(row["ca"], float)
    assert (run_dir / "fid_ref.npz").is_file() and payload["classifier"]["fid_reference"].endswith("fid_ref.npz")

    # the reference statistics of the folder: the clean test images here, so the FID equals the one without
    again = CliRunner().invoke(
        cli, [str(a) for a in args[:-6] + ["--run-dir", str(tmp_path / "eval2"), "--device", "cpu"]]
    )
    assert again.exit_code == 0, again.output
    rows2 = {r["model"]: r for r in json.loads((tmp_path / "eval2" / "eval.json").read_text())["results"]}
    assert rows2["teacher"]["fid"] == pytest.approx(rows["teacher"]["fid"], rel=1e-6)

    # an .npz of reference images (arr_0, as ADM's and DDBM's reference batches): the same pixels as the
    # folder, so the same statistics and FID; fixed statistics, so the intervals resample the restored side only
    from PIL import Image

    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB")) for c in sorted(data.iterdir()) for p in sorted(c.iterdir())]
    )
    np.savez(tmp_path / "ref_batch.npz", arr_0=pixels)
    third = CliRunner().invoke(
        cli,
        [str(a) for a in args[:-5] + [tmp_path / "ref_batch.npz", "--run-dir", tmp_path / "eval3", "--device", "cpu"]],
    )
    assert third.exit_code == 0, third.output
    payload3 = json.loads((tmp_path / "eval3" / "eval.json").read_text())
    rows3 = {r["model"]: r for r in payload3["results"]}
    assert rows3["teacher"]["fid"] == pytest.approx(rows["teacher"]["fid"], rel=1e-6)
    with np.load(tmp_path / "eval3" / "fid_ref.npz") as cached:  # cached, keyed by the .npz it came from
        assert json.loads(str(cached["key"]))["npz"] == str(tmp_path / "ref_batch.npz")
    low, high = rows3["teacher"]["fid_ci"]
    assert low <= rows3["teacher"]["fid"] <= high
    np.savez(tmp_path / "neither.npz", images=pixels)
    bad_ref = CliRunner().invoke(
        cli,
        [str(a) for a in args[:-5] + [tmp_path / "neither.npz", "--run-dir", tmp_path / "eval4", "--device", "cpu"]],
    )
    assert bad_ref.exit_code != 0 and "neither 'mu' and 'sigma' nor reference images 'arr_0'" in bad_ref.output

    # a missing weights file: one line naming the file expected and where it is published
    bad = CliRunner().invoke(cli, [str(a) for a in args[:11] + ["--features", f"inception-pytorch:{tmp_path}/x.pth"]])
    assert bad.exit_code != 0
    lines = [line for line in bad.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "pt_inception-2015-12-05-6726825d.pth" in lines[0] and "github.com" in lines[0], (
        bad.output
    )
