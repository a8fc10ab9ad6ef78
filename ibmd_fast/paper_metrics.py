"""The papers' own metric networks, from local weight files: Inception FID as I2SB and DBIM compute it,
the Inception Score as DBIM computes it, and CA with an ImageNet ResNet-50 as I2SB computes it.

Both protocols go through clean-fid (the library the teachers' code calls), with the weights a
researcher has on disk; nothing is ever downloaded:

- ``inception-pytorch:FILE`` -- I2SB (``evaluation/fid_util.py``, clean-fid mode ``legacy_pytorch``):
  images quantised to uint8 as I2SB's ``convert_to_numpy`` does, clean-fid's resizer (bilinear to
  299x299 in PyTorch, kept in float), clean-fid's copy of pytorch-fid's FID Inception with
  pytorch-fid's weights ``pt_inception-2015-12-05-6726825d.pth``, pool3 features (2048).
- ``inception-tf:FILE`` -- DDBM / DBIM (``evaluations/evaluator.py``, mode ``legacy_tensorflow``):
  uint8 images as float [0, 255], clean-fid's ``InceptionV3W`` around the TorchScript
  ``inception-2015-12-05.pt``, which resizes inside; pool3 features (2048) and, for the Inception
  Score, the network's own output layer applied to them (DBIM's logits).
- ``resnet50:FILE`` -- CA as I2SB's ``evaluation/resnet.py``: torchvision's ResNet-50 with the
  IMAGENET1K_V1 weights, uint8 images to [0, 1], bicubic to 224, ImageNet mean/std, top-1.

Images given to this module are float tensors [B, 3, H, W] in [-1, 1], as everywhere in ibmd-fast.
clean-fid and torchvision come with the optional extra ``pip install .[metrics]``; this module
imports them only when a network is built, so the package imports without them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WEIGHTS",
    "quantize_uint8",
    "InceptionFeatures",
    "ResNet50Accuracy",
    "load_inception",
    "load_resnet50",
    "parse_network_spec",
    "inception_score",
    "reference_stats",
    "save_reference_stats",
]


@dataclass(frozen=True)
class WeightsFile:
    name: str  # the file name the publisher gives it
    url: str  # where it is published
    what: str


WEIGHTS = {
    "inception-pytorch": WeightsFile(
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "pytorch-fid's FID Inception weights (I2SB's FID, clean-fid legacy_pytorch)",
    ),
    "inception-tf": WeightsFile(
        "inception-2015-12-05.pt",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
        "the TorchScript Inception of StyleGAN2-ADA (DDBM/DBIM's FID and IS, clean-fid legacy_tensorflow)",
    ),
    "resnet50": WeightsFile(
        "resnet50-0676ba61.pth",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "torchvision's ResNet-50 IMAGENET1K_V1 weights (I2SB's CA)",
    ),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _expected(kind: str) -> str:
    w = WEIGHTS[kind]
    return f"expected {w.name}, {w.what}, published at {w.url}; nothing is downloaded"


def _check_file(kind: str, path: str) -> str:
    path = os.fspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} weights file not found: {path} ({_expected(kind)})")
    return path


def _need(module: str):
    """Import a metric library, or one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or torchvision's compiled part failing to load (OSError)
        raise ValueError(
            f"the paper's metrics need {module.split('.')[0]} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}): pip install '.[metrics]' with a torch whose torchvision "
            "loads (e.g. torch==2.14.1 torchvision==0.29.1; see README.md)"
        ) from None


def parse_network_spec(spec: str, kinds: tuple[str, ...]) -> tuple[str, Optional[str]]:
    """'KIND:FILE' (or a bare 'classifier') -> (kind, file or None), kind one of ``kinds``."""
    kind, sep, path = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind not in kinds:
        raise ValueError(f"unknown network {spec!r}; choose one of {', '.join(k + ':FILE' for k in kinds)}")
    if kind != "classifier" and not path:
        raise ValueError(f"{kind} needs a weights file: {kind}:FILE ({_expected(kind)})")
    return kind, (path or None)


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [B, C, H, W], as I2SB's ``convert_to_numpy``:
    ``((x + 1) * 127.5).clamp(0, 255).to(uint8)`` (truncation, not rounding)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"the Inception and ResNet-50 metrics need RGB images [B, 3, H, W], got {tuple(images.shape)}")
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# Inception (FID features, IS logits)


@contextlib.contextmanager
def _local_state_dict(module, url: str, path: str, kind: str):
    """clean-fid's ``fid_inception_v3`` calls ``load_state_dict_from_url(FID_WEIGHTS_URL)``: answer that
    one call from the local file (a plain state dict, read with ``weights_only=True``) and refuse any other."""

    def load(requested, *args, **kwargs):
        if requested != url:
            raise ValueError(f"clean-fid asked to download {requested}; ibmd-fast never downloads")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable state dict ({type(exc).__name__}); {_expected(kind)}") from None

    with mock.patch.object(module, "load_state_dict_from_url", load):
        yield


class InceptionFeatures(nn.Module):
    """pool3 features (and DBIM's logits) of an Inception-v3, by one of the two protocols.

    ``protocol``: "inception-pytorch" (I2SB) or "inception-tf" (DDBM/DBIM); ``network``: clean-fid's
    ``InceptionV3`` (pool3 block) or ``InceptionV3W`` (resize inside); see the module docstring.
    """

    feature_dim = 2048

    def __init__(self, protocol: str, network: nn.Module, path: str):
        super().__init__()
        self.protocol, self.network, self.path = protocol, network, path
        self.task = protocol  # what eval.json records as the feature network
        if protocol == "inception-pytorch":
            self._resize = _need("cleanfid.resize").build_resizer("legacy_pytorch")

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> what the protocol's network reads: float [0, 255] (299x299 for legacy_pytorch)."""
        pixels = quantize_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # HWC uint8, as the protocols read
        if self.protocol == "inception-tf":  # DBIM's evaluator: torch.from_numpy(batch.transpose).float()
            return torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()
        # I2SB's NumpyResizeDataset: clean-fid's resizer per image (float32 [0, 255], 299x299), then CHW
        return torch.stack([torch.from_numpy(np.ascontiguousarray(self._resize(p).transpose(2, 0, 1))) for p in pixels])

    @torch.inference_mode()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        device = next(self.network.parameters()).device
        x = self._prepare(images).to(device)
        if self.protocol == "inception-pytorch":  # clean-fid's pytorch_inception feature_extractor
            return self.network(x / 255)[0].squeeze(-1).squeeze(-1), None
        features = self.network(x)  # InceptionV3W(resize_inside=True)
        return features, self.network.base.output(features)  # DBIM's InceptionV3W returns output(features) too

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


def load_inception(protocol: str, path: str, device="cpu") -> InceptionFeatures:
    """The Inception of ``protocol`` ("inception-pytorch" or "inception-tf") from the local ``path``."""
    path = _check_file(protocol, path)
    if protocol == "inception-pytorch":
        module = _need("cleanfid.inception_pytorch")
        try:
            with _local_state_dict(module, module.FID_WEIGHTS_URL, path, protocol):
                network = module.InceptionV3(output_blocks=[3], resize_input=False)
        except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, wrong shapes
            first = " ".join(str(exc).split())[:200]
            raise ValueError(
                f"{path} does not fit pytorch-fid's FID Inception ({first}); {_expected(protocol)}"
            ) from None
    elif protocol == "inception-tf":
        module = _need("cleanfid.inception_torchscript")
        name = WEIGHTS[protocol].name
        folder = os.path.dirname(os.path.abspath(path))
        tmp = None
        if os.path.basename(path) != name:  # InceptionV3W reads DIR/inception-2015-12-05.pt
            tmp = tempfile.TemporaryDirectory()
            folder = tmp.name
            os.symlink(os.path.abspath(path), os.path.join(folder, name))
        try:
            network = module.InceptionV3W(folder, download=False, resize_inside=True)
            if not hasattr(network.base, "output"):
                raise RuntimeError("it has no 'output' layer")
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:200]
            raise ValueError(f"{path} is not the TorchScript Inception ({first}); {_expected(protocol)}") from None
        finally:
            if tmp is not None:
                tmp.cleanup()
    else:
        raise ValueError(f"unknown Inception protocol {protocol!r}; choose inception-pytorch or inception-tf")
    model = InceptionFeatures(protocol, network, path)
    return model.to(device).eval()


def inception_score(logits, split_size: int = 5000) -> float:
    """Inception Score as DBIM's ``Evaluator.compute_inception_score``: softmax of the logits (float32),
    then exp(mean KL(p(y|x) || p(y))) per split of ``split_size`` images, averaged over splits."""
    logits = torch.as_tensor(logits).detach().cpu().float()
    preds = torch.softmax(logits, dim=-1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------
# ResNet-50 (CA)


class ResNet50Accuracy(nn.Module):
    """I2SB's ``build_resnet50``: normaliser (bicubic to 224, ImageNet mean/std) + torchvision ResNet-50."""

    def __init__(self, network: nn.Module, path: str):
        super().__init__()
        self.network, self.path = network, path
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = quantize_uint8(images).to(self.mean.device).float() / 255  # ToTensor of I2SB's uint8 arrays
        x = x * 2 - 1  # compute_metrices.NumpyDataset: [-1, 1] ...
        x = (x + 1) / 2  # ... and ImageNormalizer back to [0, 1]: kept, so the float rounding is I2SB's
        x = F.interpolate(x, size=(224, 224), mode="bicubic")
        return self.network((x - self.mean) / self.std)

    def correct(self, images: torch.Tensor, labels) -> torch.Tensor:
        """[B] bool: top-1 prediction == label."""
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"CA needs one class label per image: {images.shape[0]} images, labels {tuple(labels.shape)}"
            )
        return self.logits(images).argmax(dim=1).cpu() == labels


def load_resnet50(path: str, device="cpu") -> ResNet50Accuracy:
    """torchvision's ``resnet50()`` with the IMAGENET1K_V1 state dict from the local ``path``."""
    path = _check_file("resnet50", path)
    models = _need("torchvision.models")
    network = models.resnet50()
    try:
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        first = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"{path} does not fit torchvision's resnet50 ({type(exc).__name__}: {first}); {_expected('resnet50')}"
        ) from None
    return ResNet50Accuracy(network.eval(), path).to(device).eval()


# ----------------------------------------------------------------------------------------
# Reference statistics


def reference_images(path: str) -> Optional[np.ndarray]:
    """The reference images of an .npz that holds images rather than statistics (``arr_0``, uint8
    [N, H, W, 3], as ADM's and DDBM's reference batches store them), or None when it holds ``mu`` and
    ``sigma`` (then ``reference_stats`` reads it). ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds both:
    its statistics are taken."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" in data and "sigma" in data:
                return None
            if "arr_0" not in data:
                raise ValueError(
                    f"{path} has neither 'mu' and 'sigma' nor reference images 'arr_0' "
                    f"(keys: {', '.join(data.files) or 'none'})"
                )
            images = data["arr_0"]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz: {exc}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 2:
        raise ValueError(
            f"{path}: arr_0 must be uint8 images [N >= 2, H, W, 3], got {images.dtype} {tuple(images.shape)}"
        )
    return images


def reference_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) from an .npz with keys ``mu`` and ``sigma`` (ADM's
    ``VIRTUAL_imagenet256_labeled.npz``, I2SB's ``fid_imagenet_256_val.npz``, or one this module wrote)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {', '.join(data.files)})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [F] and [F, F]")
    return mu, sigma


def save_reference_stats(path: str, features, **meta) -> tuple[np.ndarray, np.ndarray]:
    """Fit mu and sigma (np.mean, np.cov as clean-fid) to ``features`` [N, F] and write them to ``path``."""
    f = np.asarray(torch.as_tensor(features).double().cpu().numpy())
    mu, sigma = f.mean(axis=0), np.cov(f, rowvar=False)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(str(v)) for k, v in meta.items()})
    os.replace(tmp, path)
    return mu, sigma
