"""The feature classifier behind FID and CA (MATH.md 7): a small ResNet, its training, save/load.

The paper measures FID on Inception features and CA with an ImageNet ResNet-50. Offline we cannot
fetch those weights, so the project trains its own small classifier (`Classifier`) on the clean
training split of the data set and takes FID on its penultimate features. For unlabeled image
folders it is trained on a self-supervised task, rotation prediction (`task="rotation"`), or on
proxy labels such as the index of the source photograph, so FID features exist for any data.

Saved files carry the format tag ``ibmd_fast.metrics.Classifier`` (where the class lived when the
embedded classifier was written), so those files load.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Classifier",
    "train_classifier",
    "save_classifier",
    "load_classifier",
    "top1_fraction",
    "describe_classifier",
    "CLASSIFIER_FORMAT",
    "TASKS",
]

CLASSIFIER_FORMAT = "ibmd_fast.metrics.Classifier"  # the tag in saved files (kept from before the move)
TASKS = ("labels", "rotation")


# ----------------------------------------------------------------------------------------
# The feature classifier


def _groups(channels: int, max_groups: int = 8) -> int:
    return math.gcd(channels, max_groups)


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a skip; `stride=2` halves the resolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if stride != 1 or in_ch != out_ch:
            self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Classifier(nn.Module):
    """A small residual CNN whose penultimate features stand in for Inception's.

    Stem conv, then one residual block per resolution, halving from `image_size` down
    to 4x4 (channels width, 2*width, 4*width, 4*width, ...), then GroupNorm, SiLU,
    global average pooling -> `features` [B, feature_dim], and a linear head ->
    logits. `task` records what the head was trained for: "labels" (class labels or
    proxy labels such as the source photograph) or "rotation" (4-way rotation
    prediction; its logits are no class scores, so CA is undefined for it).
    `config` holds the constructor arguments, which is all `load_classifier` needs;
    `info` what is known about its training (data, items, epochs, held-out accuracy), saved
    beside the config and shown by `describe_classifier`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 32,
        task: str = "labels",
        label_source: str | None = None,
    ):
        super().__init__()
        self.info: dict = {}
        if task not in TASKS:
            raise ValueError(f"Classifier: task must be one of {TASKS}, got {task!r}")
        if in_channels < 1 or num_classes < 1 or image_size < 1 or width < 1:
            raise ValueError("Classifier: in_channels, num_classes, image_size and width must be positive")
        self.config = dict(
            in_channels=int(in_channels),
            num_classes=int(num_classes),
            image_size=int(image_size),
            width=int(width),
            task=task,
        )
        if label_source is not None:  # what the labels were, e.g. "photo" (evaluate.fit_classifier)
            self.config["label_source"] = str(label_source)
        num_down = max(0, int(math.log2(max(image_size, 4) / 4)))
        channels = [width * min(2**i, 4) for i in range(num_down + 1)]
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks = [_ResBlock(channels[0], channels[0])]
        for i in range(num_down):
            blocks.append(_ResBlock(channels[i], channels[i + 1], stride=2))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(_groups(channels[-1]), channels[-1])
        self.feature_dim = channels[-1]
        self.head = nn.Linear(channels[-1], num_classes)

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] of images in [-1, 1]."""
        h = self.blocks(self.stem(x))
        return F.silu(self.norm(h)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------
# Training


def _as_tensors(data: Any, pseudo_labels: torch.Tensor | None):
    """(images, labels or None) when `data` is a tensor or a tensor pair, else None."""
    if isinstance(data, torch.Tensor):
        return data, pseudo_labels
    if isinstance(data, (tuple, list)) and len(data) in (1, 2) and all(isinstance(t, torch.Tensor) for t in data):
        labels = pseudo_labels if pseudo_labels is not None else (data[1] if len(data) == 2 else None)
        return data[0], labels
    return None


def _collate_x0_label(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    # Only the fields the classifier needs; the bridge data sets carry more.
    batch = {"x0": torch.stack([torch.as_tensor(item["x0"]) for item in items])}
    if all("label" in item for item in items):
        batch["label"] = torch.as_tensor([int(item["label"]) for item in items])
    return batch


def _augment(x: torch.Tensor, mode: str, rng: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (reflect padding) and, for "shift_flip", horizontal flips."""
    if mode == "none":
        return x
    b, _, h, w = x.shape
    pad = 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=rng)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=rng)
    # Gather the crops with one index op: rows dy+i, columns dx+j for each image.
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    out = padded[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    if mode == "shift_flip":
        flip = (torch.rand(b, generator=rng) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _rotation_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations (0, 90, 180, 270 degrees) of every image, with labels 0..3."""
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


def train_classifier(
    data: Any,
    num_classes: int | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    augment: bool | str = True,
    task: str = "labels",
    pseudo_labels: torch.Tensor | None = None,
    width: int = 32,
    weight_decay: float = 5e-4,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    log: Callable[[str], None] | None = None,
    label_source: str | None = None,
) -> Classifier:
    """Train a `Classifier` on clean images and return it in eval mode.

    data          -- a tensor pair (images [N,C,H,W] in [-1,1], labels [N]), a tensor of
                     images (for task="rotation" or with `pseudo_labels`), or a Dataset of
                     dicts with "x0" (and "label" for task="labels").
    num_classes   -- label count; inferred as max(label)+1 from tensors when None;
                     ignored for task="rotation" (always 4).
    augment       -- True/"shift_flip": 2-pixel shifts and horizontal flips; "shift":
                     shifts only (for data where a mirror image is another class);
                     False/"none": none.
    task          -- "labels": supervised on the given labels; "rotation": the
                     self-supervised fallback for unlabeled images (predict which of four
                     rotations was applied; needs square images).
    pseudo_labels -- labels [N] that replace the data set's own, e.g. the index of the
                     source photograph each crop came from (tensor data only).
    progress      -- a tqdm bar while a terminal shows it; in any case one line per
                     epoch (mean loss, training accuracy, seconds) through `log` (default: print
                     to stderr), so a log file of a long run shows where training is.
    label_source  -- what the labels are, e.g. "photo" (the source photograph of each crop):
                     kept in ``config["label_source"]`` and used in the log lines.
    AdamW with a cosine learning-rate decay; `seed` fixes initialisation, shuffling
    and augmentation.
    """
    if task not in TASKS:
        raise ValueError(f"train_classifier: task must be one of {TASKS}, got {task!r}")
    modes = {True: "shift_flip", False: "none", "shift_flip": "shift_flip", "shift": "shift", "none": "none"}
    if augment not in modes:
        raise ValueError(
            f"train_classifier: augment must be a bool or one of 'shift_flip', 'shift', 'none', got {augment!r}"
        )
    augment_mode = modes[augment]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rng = torch.Generator().manual_seed(seed)

    tensors = _as_tensors(data, pseudo_labels)
    if tensors is not None:
        images, labels = tensors
        if task == "labels":
            if labels is None:
                raise ValueError(
                    "train_classifier: task='labels' needs labels (a tensor pair or pseudo_labels); "
                    "use task='rotation' for unlabeled images"
                )
            labels = torch.as_tensor(labels).long()
            if labels.shape != (images.shape[0],):
                raise ValueError(
                    f"train_classifier: labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}"
                )
            if num_classes is None:
                num_classes = int(labels.max()) + 1
        sample_shape = images.shape[1:]
        num_items = images.shape[0]
        loader = None
    else:
        if pseudo_labels is not None:
            raise ValueError(
                "train_classifier: pseudo_labels needs tensor data; for a Dataset put them in its 'label' field"
            )
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            drop_last=False,
            generator=rng,
            collate_fn=_collate_x0_label,
            num_workers=num_workers,
        )
        sample_shape = torch.as_tensor(data[0]["x0"]).shape
        num_items = len(data)
        if task == "labels" and "label" not in data[0]:
            raise ValueError(
                "train_classifier: task='labels' needs a 'label' field in the data set items; "
                "use task='rotation' for unlabeled images"
            )
        if task == "labels" and num_classes is None:
            raise ValueError("train_classifier: num_classes is required for a Dataset")
    if len(sample_shape) != 3:
        raise ValueError(f"train_classifier: expected images [N, C, H, W], got items of shape {tuple(sample_shape)}")
    channels, height, width_px = sample_shape
    if task == "rotation":
        if height != width_px:
            raise ValueError(f"train_classifier: task='rotation' needs square images, got {height}x{width_px}")
        num_classes = 4

    # Fork the global RNG so that seeding the initialisation leaves the caller's stream alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(
            channels, num_classes, max(height, width_px), width=width, task=task, label_source=label_source
        ).to(device)
    name = f"{label_source or ('rotation' if task == 'rotation' else 'label')} classifier"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(num_items / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
        if loader is not None:
            for batch in loader:
                yield batch["x0"], batch.get("label")
        else:
            order = torch.randperm(num_items, generator=rng)
            for start in range(0, num_items, batch_size):
                idx = order[start : start + batch_size]
                yield images[idx], (labels[idx] if labels is not None else None)

    bar = None
    if progress and sys.stderr.isatty():  # a bar redrawn with carriage returns is noise in a log file
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=name, leave=False)
    if log is None:

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    model.train()
    for epoch in range(epochs):
        begin, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for x, y in batches():
            x = _augment(x.to(device, torch.float32), augment_mode, rng)
            if task == "rotation":
                x, y = _rotation_batch(x)
            else:
                y = y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * y.shape[0]
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        # one line per epoch, bar or not: a log file of a long evaluation shows where it is
        log(
            f"{name} epoch {epoch + 1}/{epochs}: loss {loss_sum / max(seen, 1):.4f}, "
            f"training accuracy {100.0 * correct / max(seen, 1):.2f}% (augmented batches), "
            f"{time.perf_counter() - begin:.1f} s"
        )
    if bar is not None:
        bar.close()
    return model.eval()


@torch.no_grad()
def top1_fraction(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy, as a fraction in [0, 1], of ``model`` on ``images`` [N, C, H, W] in [-1, 1]: the
    classifier's own held-out accuracy (any task). CA, the paper's metric in percent, is
    ``metrics.classifier_accuracy``.

    For a rotation classifier ``labels`` is ignored: every image is scored in its four rotations.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = seen = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, torch.float32)
        if model.task == "rotation":
            x, y = _rotation_batch(x)
        else:
            if labels is None:
                raise ValueError("top1_fraction: a label classifier needs labels")
            y = torch.as_tensor(labels[start : start + batch_size]).long().to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
        seen += y.shape[0]
    model.train(was_training)
    return correct / max(seen, 1)


def describe_classifier(model: Classifier) -> str:
    """What the classifier tells apart, and how well, in words: e.g. "photo classifier (which of 6
    photographs a 32x32 crop comes from), 97.50% accuracy on 512 held-out test crops"."""
    config, info = model.config, getattr(model, "info", {}) or {}
    size = f"{config['image_size']}x{config['image_size']}"
    if config["task"] == "rotation":
        what = f"rotation classifier (which of 4 rotations a {size} image shows; self-supervised)"
    elif config.get("label_source") == "photo":
        what = f"photo classifier (which of {config['num_classes']} photographs a {size} crop comes from)"
    else:
        what = f"label classifier ({config['num_classes']} classes, {size} images)"
    if info.get("test_accuracy") is not None:
        what += f", {100.0 * info['test_accuracy']:.2f}% accuracy on {info.get('test_items', '?')} held-out test images"
    else:
        what += ", accuracy not measured"
    return what


# ----------------------------------------------------------------------------------------
# Saving and loading (safetensors + JSON config; never pickle)


def save_classifier(model: Classifier, path: str | os.PathLike) -> None:
    """Write the weights as safetensors with the config (and ``info``, when set) as JSON metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": CLASSIFIER_FORMAT, "config": json.dumps(model.config, sort_keys=True)}
    if getattr(model, "info", None):
        metadata["info"] = json.dumps(model.info, sort_keys=True)
    save_file(state, os.fspath(path), metadata=metadata)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
    """Read a classifier written by `save_classifier`; returns it in eval mode.

    Raises ValueError when the file is no safetensors file or not a classifier.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise ValueError(f"load_classifier: {path!r} is not a safetensors file ({exc})") from exc
    if metadata.get("format") != CLASSIFIER_FORMAT or "config" not in metadata:
        raise ValueError(
            f"load_classifier: {path!r} is a safetensors file but not a classifier saved by "
            f"save_classifier (metadata format={metadata.get('format')!r}, expected {CLASSIFIER_FORMAT!r})"
        )
    try:
        config = json.loads(metadata["config"])
        model = Classifier(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_classifier: {path!r} holds an unusable classifier config ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"load_classifier: weights in {path!r} do not fit its config ({exc})") from exc
    try:
        model.info = json.loads(metadata["info"]) if "info" in metadata else {}
    except ValueError as exc:
        raise ValueError(f"load_classifier: {path!r} holds unreadable training info ({exc})") from exc
    return model.to(device).eval()
