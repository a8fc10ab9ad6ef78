#!/usr/bin/env python
"""Restore images with an ibmd-fast generator exported to ONNX. Needs onnxruntime (or
onnxruntime-gpu), numpy and Pillow only: no torch, no ibmd_fast.

    python export/run_onnx.py --model model.onnx --input IMAGE_OR_FOLDER --output OUT_DIR \\
        [--batch 8] [--seed 0] [--provider auto|cuda|cpu] [--mask MASK] [--threads N]
        [--labels FILE.csv | --class-label N]

Inputs. A file, or a folder searched recursively (sorted; names starting with "." skipped) for
images (.png .jpg .jpeg .webp .bmp .tif .tiff) and tensors (.npy: float32 [C, H, W] in [-1, 1]).
Images are read with Pillow, EXIF orientation applied, converted to the model's channel count
(grayscale "L" for 1, "RGB" for 3) and mapped to [-1, 1] by ``x / 127.5 - 1``. They are the
CORRUPTED images as stored: for an ``srKx`` model the low-resolution image, which the model itself
upsamples K times (inside the graph, as ibmd_fast's degradation does), so the results are K times
larger. Output heights and widths must be multiples of the model's ``size_multiple`` (metadata).
Unreadable files (damaged, or gone by the time they are read)
are skipped with one warning, in the words of ``ibmd-fast sample``; none readable is an error.
``--output`` may not be the input folder (or the folder of a single input file): the results would
overwrite the inputs.

Inpainting models also take a mask (1 = the hole to fill): ``--mask`` names one mask image for all
inputs, or a folder with a mask of the same relative name (any image extension) per input; pixels
>= 128 are the hole. Without ``--mask`` the degradation's own mask is used when it has a fixed one
(``inpaint-center``: the centered square of half the side). The model fills the hole itself:
what the input holds there is never read.

Class-conditional models (``num_classes`` in the metadata; input ``class_label`` [B] int64) need
the class of each input: ``--labels FILE.csv`` (lines ``path,label``, an optional header line
``path,label``, paths relative to the input folder, as ibmd_fast's ``classes:DIR,labels.csv``) or
``--class-label N`` (one class for every input). Without either, or with a label outside
``0..num_classes-1``, the runner stops with one line.

Noise. The model is deterministic given its noise inputs, which are drawn here from ONE
``numpy.random.default_rng(seed)``, image by image in the sorted order of the (readable) inputs, and for
each image in the order of the model's ``noise_inputs`` metadata (``z``, then ``hole_noise`` for
inpainting, then ``noise_1 .. noise_{k-1}`` for k-step students), each as
``rng.standard_normal((channels, H, W), dtype=numpy.float32)`` at the output's size H x W. So an image's result does not
depend on ``--batch``, and ``draw_noises`` below reproduces it anywhere.

Outputs. ``OUT_DIR/<relative name>.png`` (uint8 ``round((x + 1) * 127.5)`` clipped to [0, 255]);
a .npy input also gets ``<relative name>.npy``, the float32 output [C, H, W].

Large models. A model over protobuf's 2 GiB (an ADM-256 student in float32) is two files,
``model.onnx`` and its weights ``model.onnx.data``, which ``ibmd-fast export`` writes side by side;
keep them together when moving them: onnxruntime reads the weights from the model's folder.

Execution. ``--provider auto`` uses CUDAExecutionProvider when onnxruntime offers it, else the CPU;
inputs and outputs go through IO binding on the device (OrtValues), batches of ``--batch``
consecutive images of one size. The feed is made from the model's ``graph_inputs`` metadata (what
each input is: the image, the mask, or noise), so the runner knows nothing of the model's kind
beyond it. Errors print one line (``run_onnx: error: ...``) and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMAT = "ibmd_fast.generator.onnx"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TENSOR_EXTENSIONS = (".npy",)


class RunnerError(Exception):
    """A problem with the user's model, inputs or options: reported in one line."""


class UnreadableInput(RunnerError):
    """An input file that cannot be read (skipped, as ``ibmd-fast sample`` skips it)."""

    def __init__(self, path, exc: BaseException, what: str = "the image"):
        self.reason = f"{type(exc).__name__}: {_first_line(exc)}"
        super().__init__(f"{path}: cannot read {what} ({_first_line(exc)})")


# ----------------------------------------------------------------------------
# The model


class Model:
    """An onnxruntime session of an ibmd-fast generator and what its metadata says."""

    def __init__(self, path: str, provider: str = "auto", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed: pip install onnxruntime-gpu (or onnxruntime)") from None
        self.ort = ort
        if not os.path.isfile(path):
            raise RunnerError(f"model file not found: {path}")
        available = ort.get_available_providers()
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise RunnerError(
                "--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
            )
        use_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about fp16 constant folding etc. are not the user's business
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            data = path + ".data"
            hint = ""
            if "external" in str(exc).lower() and not os.path.isfile(data):
                hint = (
                    f"; its weights live in {os.path.basename(data)}, which must sit beside it "
                    "(move or copy the two files together)"
                )
            raise RunnerError(f"cannot load {path} as an ONNX model: {_first_line(exc)}{hint}") from None
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RunnerError(
                "--provider cuda: onnxruntime could not start CUDA (check the CUDA and cuDNN "
                "libraries onnxruntime-gpu needs)"
            )
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.metadata = self._read_metadata(path)

    def _read_metadata(self, path: str) -> dict:
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise RunnerError(
                f"{path} is not an ibmd-fast generator (its metadata has no format={FORMAT!r}); "
                "export one with `ibmd-fast export --onnx`"
            )
        try:
            info = {
                "graph_inputs": json.loads(meta["graph_inputs"]),
                "image_channels": int(json.loads(meta["image_channels"])),
                "multiple": int(json.loads(meta["size_multiple"])),
                "upsample": json.loads(meta["upsample"]),
                "inpainting": bool(json.loads(meta["inpainting"])),
                "nfe": int(json.loads(meta["nfe"])),
                "degradation": meta.get("degradation", ""),
                "precision": meta.get("precision", "float32"),
                "num_classes": None if "num_classes" not in meta else int(json.loads(meta["num_classes"])),
            }
        except (KeyError, ValueError, TypeError) as exc:
            raise RunnerError(f"{path}: damaged ibmd-fast metadata ({type(exc).__name__}: {exc})") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != [i["name"] for i in info["graph_inputs"]]:
            raise RunnerError(
                f"{path}: the graph's inputs {names} differ from its metadata "
                f"{[i['name'] for i in info['graph_inputs']]}"
            )
        unknown = [i["name"] for i in info["graph_inputs"] if i["kind"] not in ("image", "mask", "noise", "label")]
        if unknown:
            raise RunnerError(f"{path}: the model takes inputs this runner does not know how to make: {unknown}")
        info["noise_inputs"] = [i for i in info["graph_inputs"] if i["kind"] == "noise"]
        info["divisor"] = next(i["size_divisor"] for i in info["graph_inputs"] if i["kind"] == "image")
        return info

    def run(self, feed: dict) -> np.ndarray:
        """One batch through IO binding: inputs as OrtValues on the device, x0 bound there too."""
        binding = self.session.io_binding()
        for name, array in feed.items():  # the image may be smaller than the output (srKx)
            dtype = np.int64 if name == "class_label" else np.float32
            value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=dtype), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("x0", self.device, 0)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own error types (out of memory, ...)
            shape = "x".join(str(d) for d in next(iter(feed.values())).shape)
            raise RunnerError(f"onnxruntime failed on a batch of shape {shape}: {_first_line(exc)}") from None
        return binding.copy_outputs_to_cpu()[0]


# ----------------------------------------------------------------------------
# Noise and masks (numpy)


def draw_noises(rng: np.random.Generator, noise_inputs: list, height: int, width: int) -> dict:
    """One image's noise inputs, in metadata order: ``rng.standard_normal((C, H, W), float32)`` each."""
    return {
        item["name"]: rng.standard_normal((int(item["channels"]), height, width), dtype=np.float32)
        for item in noise_inputs
    }


def center_mask(height: int, width: int) -> np.ndarray:
    """``inpaint-center``'s hole: the centered square of half the side, [1, H, W], 1 in the hole."""
    mask = np.zeros((1, height, width), np.float32)
    side_h, side_w = height // 2, width // 2
    top, left = (height - side_h) // 2, (width - side_w) // 2
    mask[:, top : top + side_h, left : left + side_w] = 1.0
    return mask


# ----------------------------------------------------------------------------
# Inputs and outputs


def list_inputs(root: str) -> list:
    """``[(relative name, path)]`` of the images and tensors under ``root`` (or ``root`` itself), sorted."""
    path = Path(root)
    if not path.exists():
        raise RunnerError(f"input not found: {root}")
    wanted = IMAGE_EXTENSIONS + TENSOR_EXTENSIONS
    if path.is_file():
        if path.suffix.lower() not in wanted:
            raise RunnerError(f"{root}: not an image or .npy file (extensions: {', '.join(wanted)})")
        return [(path.name, path)]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in wanted:
                full = Path(dirpath) / name
                found.append((full.relative_to(path).as_posix(), full))
    if not found:
        raise RunnerError(f"no images or .npy files under {root}")
    found.sort()
    outputs: dict = {}
    for relname, _ in found:
        target = Path(relname).with_suffix(".png").as_posix()
        if target in outputs:
            raise RunnerError(f"{outputs[target]} and {relname} would both be written to {target}; rename one")
        outputs[target] = relname
    return found


def _open_image(path: Path):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ...
        raise UnreadableInput(path, exc) from None


def _image_size(path: Path) -> tuple:
    """(H, W) after EXIF orientation, from the header only."""
    with _open_image(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
    return height, width


def _load_uint8(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, ImageOps

    with _open_image(path) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise UnreadableInput(path, exc) from None
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # high bit depth: scale, don't clip
            a = np.asarray(image, dtype=np.float64)
            peak = (
                1.0
                if image.mode == "F" and a.max() <= 1.0
                else (65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0)
            )
            image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


def load_input(path: Path, channels: int) -> np.ndarray:
    """An input as float32 [C, H, W] in [-1, 1]."""
    if path.suffix.lower() in TENSOR_EXTENSIONS:
        try:
            return np.load(path).astype(np.float32)
        except Exception as exc:  # gone, cut short, not a .npy file
            raise UnreadableInput(path, exc, "the .npy file") from None
    array = _load_uint8(path, channels)
    return np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _tensor_shape(path: Path, channels: int) -> tuple:
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as exc:
        raise UnreadableInput(path, exc, "the .npy file") from None
    if array.ndim != 3:
        raise RunnerError(f"{path}: a tensor input must be [C, H, W], got shape {list(array.shape)}")
    if array.shape[0] != channels:
        raise RunnerError(
            f"{path}: has {array.shape[0]} channels, the model takes {channels} "
            f"(a tensor input is float32 [C, H, W] in [-1, 1])"
        )
    return array.shape[1], array.shape[2]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [C, H, W] in [-1, 1] -> uint8 [H, W, C] (rounded, clipped), as ibmd_fast writes images."""
    return np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def save_png(x: np.ndarray, path: Path) -> None:
    from PIL import Image

    pixels = to_uint8(x)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(
            pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, "L" if pixels.shape[2] == 1 else "RGB"
        ).save(path)
    except OSError as exc:
        raise RunnerError(f"cannot write {path}: {exc.strerror or _first_line(exc)}") from None


def check_output(out_dir: str, input_root: str) -> None:
    """Refuse an --output that is the input folder (or a single input's folder); make sure it can be written."""
    out, root = Path(out_dir).expanduser(), Path(input_root).expanduser()
    if out.resolve() == root.resolve():
        raise RunnerError(f"--output {out_dir} is the input folder; results would overwrite the inputs")
    if root.is_dir() and root.resolve() in out.resolve().parents:
        raise RunnerError(
            f"--output {out_dir} is inside the input folder {input_root}: its results would be read "
            "back as inputs next time; give a folder outside it"
        )
    if root.is_file() and out.resolve() == root.resolve().parent:
        raise RunnerError(
            f"--output {out_dir} is the folder of the input {root.name}; results would overwrite the inputs"
        )
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RunnerError(f"--output {out_dir}: {parent} is a file, not a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".run_onnx-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise RunnerError(f"cannot write to --output {out_dir}: {exc.strerror or _first_line(exc)}") from None


def _skipped_message(bad: list) -> str:
    """The words of ``ibmd-fast sample`` for skipped inputs."""
    shown = "; ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"skipped {len(bad)} unreadable input image(s): {shown}"


def _size_hint(height: int, width: int, factor: int) -> str:
    def near(n):
        lo, hi = n // factor * factor, -(-n // factor) * factor
        return f"{lo} or {hi}" if lo else str(hi)

    hints = [f"{what} {near(n)}" for what, n in (("height", height), ("width", width)) if n % factor]
    return ", ".join(hints)


class MaskSource:
    """The inpainting mask of each input: one file, a folder of per-input masks, or the degradation's."""

    def __init__(self, mask: str | None, degradation: str):
        self.file = self.folder = None
        self.degradation = degradation
        if mask is not None:
            path = Path(mask)
            if not path.exists():
                raise RunnerError(f"mask not found: {mask}")
            if path.is_dir():
                self.folder = path
            else:
                self.file = path
        elif degradation != "inpaint-center":
            raise RunnerError(
                f"this inpainting model ({degradation or 'no degradation named'}) has no fixed mask: "
                "pass --mask MASK_IMAGE_OR_FOLDER (white = the hole to fill)"
            )

    def path_for(self, relname: str) -> Path | None:
        if self.file is not None:
            return self.file
        if self.folder is None:
            return None
        stem = Path(relname).with_suffix("")
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            candidate = self.folder / (stem.as_posix() + ext)
            if candidate.is_file():
                return candidate
        raise RunnerError(f"no mask for {relname} in {self.folder} (expected {stem.as_posix()}.png or similar)")

    def mask(self, relname: str, height: int, width: int) -> np.ndarray:
        path = self.path_for(relname)
        if path is None:
            return center_mask(height, width)
        pixels = _load_uint8(path, 1)[:, :, 0]
        if pixels.shape != (height, width):
            raise RunnerError(
                f"mask {path} is {pixels.shape[0]}x{pixels.shape[1]}, the image {relname} is {height}x{width}"
            )
        return (pixels >= 128).astype(np.float32)[None]


# ----------------------------------------------------------------------------
# Main


def read_labels(path: str) -> dict:
    """A labels file: lines ``path,label`` (an optional header ``path,label``) -> {relative path: label}."""
    import csv

    table = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.reader(fh), start=1):
                if not row or (n == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                    continue
                if len(row) != 2 or not row[1].strip().isdigit():
                    raise RunnerError(
                        f"labels file {path}, line {n}: expected 'path,label' with a label >= 0, got {','.join(row)!r}"
                    )
                table[Path(row[0].strip()).as_posix()] = int(row[1])
    except OSError as exc:
        raise RunnerError(f"cannot read the labels file {path}: {exc.strerror}") from None
    return table


def class_labels(info: dict, items: list, labels: dict | None, class_label: int | None) -> dict | None:
    """{relative name: class} of each input for a class-conditional model (None for another); one line
    for a missing, unneeded or out-of-range label."""
    num_classes = info.get("num_classes")
    if num_classes is None:
        if labels is not None or class_label is not None:
            raise RunnerError("--labels / --class-label: this model is not class-conditional")
        return None
    if labels is not None and class_label is not None:
        raise RunnerError("give --labels or --class-label, not both")
    if labels is None and class_label is None:
        raise RunnerError(
            f"this model is class-conditional ({num_classes} classes): give the class of each input "
            "with --labels FILE.csv (lines path,label) or --class-label N"
        )
    out = {}
    for relname, _ in items:
        label = class_label if labels is None else labels.get(relname)
        if label is None:
            raise RunnerError(f"{relname} has no label in the --labels file")
        if not 0 <= int(label) < num_classes:
            raise RunnerError(
                f"class label {label} of {relname} is out of range: the model has {num_classes} classes "
                f"(labels 0..{num_classes - 1})"
            )
        out[relname] = int(label)
    return out


def restore(
    model: Model,
    items: list,
    out_dir: str,
    batch: int = 8,
    seed: int = 0,
    mask: str | None = None,
    log=None,
    warn=None,
    input_root: str | None = None,
    labels: dict | None = None,
    class_label: int | None = None,
) -> int:
    """Run every input through the model; returns the number of images written.

    ``labels`` ({relative name: class}) or ``class_label``: the classes of a class-conditional model.

    Unreadable inputs (found in the check, or gone by the time they are read) are skipped with one
    warning through ``warn``; when none is left, ``RunnerError``.
    """
    info = model.metadata
    channels, multiple, divisor = info["image_channels"], info["multiple"], info["divisor"]
    if mask is not None and not info["inpainting"]:
        raise RunnerError(f"--mask is for inpainting models; this one restores {info['degradation'] or 'images'}")
    masks = MaskSource(mask, info["degradation"]) if info["inpainting"] else None
    label_of = class_labels(info, items, labels, class_label)

    # Check every input before running anything, so a bad file fails fast.
    sizes, bad, readable = [], [], []
    for relname, path in items:
        try:
            if path.suffix.lower() in TENSOR_EXTENSIONS:
                height, width = _tensor_shape(path, channels)
            else:
                height, width = _image_size(path)
        except UnreadableInput as exc:
            bad.append(f"{relname} ({exc.reason})")
            continue
        height, width = height * divisor, width * divisor  # the output's size
        if height % multiple or width % multiple:
            what = (
                f"size {height // divisor}x{width // divisor} (x{divisor}: {height}x{width})"
                if divisor > 1
                else f"size {height}x{width}"
            )
            raise RunnerError(
                f"{relname}: {what} does not fit the network, which gives heights and widths that are "
                f"multiples of {multiple} (nearest: {_size_hint(height, width, multiple)})"
            )
        if masks is not None:
            masks.path_for(relname)
        sizes.append((height, width))
        readable.append((relname, path))
    if not readable:
        raise RunnerError(f"no readable input image: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    items = readable
    if input_root is not None:
        check_output(out_dir, input_root)
    if log:
        log(
            f"{info['nfe']}-step {info['degradation'] or 'generator'}, {info['precision']}, on {model.device} "
            f"({', '.join(model.session.get_providers())}); {len(items)} inputs"
            + (
                f", upsampled x{info['upsample']['factor']} ({info['upsample']['mode']}) in the model"
                if info["upsample"]
                else ""
            )
        )

    rng = np.random.default_rng(seed)
    out_root = Path(out_dir)
    written = 0
    pending: list = []

    def flush():
        nonlocal written
        if not pending:
            return
        feed = {i["name"]: np.stack([p[2][i["name"]] for p in pending]) for i in info["graph_inputs"]}
        x0 = model.run(feed)
        finite = np.isfinite(x0)
        if not finite.all():  # a model with NaN/Inf weights gives black images: never write them
            names = ", ".join(p[0] for p in pending[:3])
            raise RunnerError(
                f"the model gives {int(finite.size - finite.sum())} non-finite value(s) (NaN or Inf) "
                f"for {names}; its weights are damaged or diverged, so nothing more is written"
            )
        for (relname, path, _), out in zip(pending, x0):
            target = out_root / Path(relname).with_suffix(".png")
            save_png(out, target)
            if path.suffix.lower() in TENSOR_EXTENSIONS:
                try:
                    np.save(target.with_suffix(".npy"), out.astype(np.float32))
                except OSError as exc:
                    raise RunnerError(f"cannot write {target.with_suffix('.npy')}: {exc.strerror}") from None
            written += 1
        if log:
            log(f"{written}/{len(items)} images")
        pending.clear()

    previous = None
    for (relname, path), (height, width) in zip(items, sizes):
        if pending and (len(pending) >= batch or previous != (height, width)):
            flush()  # a batch holds consecutive inputs of one size
        try:
            image = load_input(path, channels)
        except UnreadableInput as exc:  # gone or damaged since the check
            bad.append(f"{relname} ({exc.reason})")
            continue
        previous = (height, width)
        noises = draw_noises(rng, info["noise_inputs"], height, width)
        made = {
            "image": lambda i: image,
            "mask": lambda i: masks.mask(relname, height, width),
            "noise": lambda i: noises[i["name"]],
            "label": lambda i: np.int64(label_of[relname]),
        }
        pending.append((relname, path, {i["name"]: made[i["kind"]](i) for i in info["graph_inputs"]}))
    flush()
    if not written:
        raise RunnerError(f"no readable input image: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    if bad and warn:
        warn(_skipped_message(bad))
    return written


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_onnx.py", description="Restore images with an ibmd-fast ONNX generator (onnxruntime only; no torch)."
    )
    parser.add_argument("--model", required=True, metavar="MODEL.onnx", help="the exported generator")
    parser.add_argument("--input", required=True, metavar="PATH", help="an image, a .npy tensor, or a folder of them")
    parser.add_argument("--output", required=True, metavar="DIR", help="where the PNGs go (same relative names)")
    parser.add_argument("--batch", type=_positive, default=8, metavar="N", help="images per run (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise inputs (default 0)")
    parser.add_argument(
        "--provider",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="onnxruntime execution provider (default auto: CUDA when available)",
    )
    parser.add_argument("--mask", metavar="PATH", help="inpainting: a mask image, or a folder of per-input masks")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (default: onnxruntime's)")
    parser.add_argument(
        "--labels", metavar="FILE.csv", help="class-conditional models: lines path,label (paths relative to --input)"
    )
    parser.add_argument("--class-label", type=int, metavar="N", help="class-conditional models: one class for all")
    parser.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    args = parser.parse_args(argv)
    log = None if args.quiet else (lambda message: print(f"run_onnx: {message}", file=sys.stderr, flush=True))

    def warn(message):
        print(f"run_onnx: warning: {message}", file=sys.stderr, flush=True)

    try:
        if not 0 <= args.seed < 2**63:  # numpy's default_rng refuses negative seeds with a traceback
            raise RunnerError(f"--seed {args.seed}: give an integer from 0 to 2**63 - 1")
        items = list_inputs(args.input)
        model = Model(args.model, args.provider, args.threads)
        started = time.perf_counter()
        labels = None if args.labels is None else read_labels(args.labels)
        count = restore(
            model,
            items,
            args.output,
            batch=args.batch,
            seed=args.seed,
            mask=args.mask,
            log=log,
            warn=warn,
            input_root=args.input,
            labels=labels,
            class_label=args.class_label,
        )
        if log:
            seconds = time.perf_counter() - started
            per_image = seconds / max(count, 1) * 1e3
            log(f"wrote {count} images to {args.output} in {seconds:.2f} s ({per_image:.1f} ms/image)")
    except RunnerError as exc:
        print(f"run_onnx: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
