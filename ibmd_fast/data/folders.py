"""Image folders: clean images, clean/corrupted pairs, corrupted images only.

Files are found recursively by extension (png, jpg/jpeg, webp, bmp, tif/tiff,
any case), in sorted order; hidden files and folders (names starting with
".") are ignored.

A folder of any size starts in seconds: building a data set only LISTS the
folder (``check="none"``, the default); nothing is decoded up front. A file
that fails when it is read (truncated, not really an image, unsupported) is
skipped there: ``__getitem__`` falls back to the next readable index, warns
once for that file (``UnreadableImageWarning`` naming it; after ``_SHOW``
such files a process counts the rest in ``.runtime_skipped`` silently) and
never lets the exception out, so a DataLoader worker does not die of it.
``check="load"`` decodes every file once when the data set is built (on a few
threads) and drops the bad ones with ONE warning: thorough, but on ImageNet's
1.28M files it is tens of minutes; ``check="open"`` reads headers only
(catches non-images, not truncation).

Listings shared by ranks (``Listing``): under torchrun every rank would walk
the same folder; with ``listing=Listing(dir, write=True)`` rank 0 walks it and
writes the listing to ``dir``, and the other ranks, given
``Listing(dir, write=False)``, read that file after a barrier instead of
walking (``train/batches.shared_dataset`` does this in the run folder).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from ibmd_fast.data.degradations import Degradation, get_degradation
from ibmd_fast.data.images import (
    IMAGE_EXTENSIONS,
    Size,
    as_hw,
    check_channels,
    load_image,
    pil_to_tensor,
    resize_and_crop,
)

__all__ = [
    "ImageFolder",
    "LabelledFolder",
    "PairedFolders",
    "CorruptedFolder",
    "UnreadableImageWarning",
    "Listing",
    "list_images",
    "file_labels",
    "read_labels_csv",
]

PathLike = Union[str, os.PathLike]
_CHECKS = ("load", "open", "none")
_SHOW = 5  # how many unreadable files a warning names


class UnreadableImageWarning(UserWarning):
    """Some image files could not be decoded and were skipped."""


def _walk_images(root: Path, recursive: bool = True) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for name in filenames:
            # a name with a line break cannot be one line of a listing file; no image set has one
            if (
                not name.startswith(".")
                and name.lower().endswith(IMAGE_EXTENSIONS)
                and "\n" not in name
                and "\r" not in name
            ):
                found.append(prefix + name)
    return sorted(found)


class Listing:
    """Where the listings of a run's folders are kept, so a folder is walked once per run.

    ``Listing(folder, write=True)`` (rank 0): walk each image folder as usual and write what was
    found to ``folder/listing-<hash of the folder's absolute path>.txt`` (atomically).
    ``Listing(folder, write=False)`` (the other ranks, after rank 0 has written): read that file
    instead of walking; a missing or unreadable file (e.g. a run folder that is not shared between
    the machines) falls back to walking, with one warning. The file is one relative path a line
    after a header line naming the folder, so it can be read (and checked) by eye.
    """

    _HEADER = "# ibmd-fast image listing v1: "

    def __init__(self, folder: PathLike, write: bool):
        self.folder = Path(folder)
        self.write = bool(write)

    def path_for(self, root: PathLike, kind: str = "images") -> Path:
        key = hashlib.sha1(f"{kind}:{os.path.abspath(root)}".encode()).hexdigest()[:16]
        return self.folder / f"listing-{kind}-{key}.txt"

    def files(self, root: Path, kind: str, walk) -> List[str]:
        """``walk(root)`` (writing its result) or the written result of rank 0's walk."""
        path = self.path_for(root, kind)
        header = f"{self._HEADER}{os.path.abspath(root)}"
        if not self.write:
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = fh.read().split("\n")
                if lines[0] == header:
                    return [line for line in lines[1:] if line]
                reason = f"it lists {lines[0][len(self._HEADER) :]!r}"
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"the listing {str(path)!r} of {str(root)!r} written by rank 0 cannot be used ({reason}); "
                "listing the folder here instead",
                UserWarning,
                stacklevel=3,
            )
            return walk(root)
        found = walk(root)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=self.folder)
        try:  # written aside and renamed: a reader never sees half a listing
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(header + "\n" + "".join(rel + "\n" for rel in found))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return found


def list_images(root: PathLike, listing: Optional[Listing] = None, recursive: bool = True) -> List[str]:
    """Relative POSIX paths of the image files under ``root``, sorted.

    ``listing``: write this walk's result for other ranks, or read theirs (``Listing``).
    ``recursive=False``: the files directly in ``root`` only. Raises FileNotFoundError when
    ``root`` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {str(root)!r} {what}")
    walk = lambda r: _walk_images(r, recursive)  # noqa: E731
    if listing is None:
        return walk(root)
    return listing.files(root, "images" if recursive else "images-flat", walk)


def _probe(path: Path, check: str) -> Optional[str]:
    """None if ``path`` passes ``check``, else the reason it failed."""
    try:
        if check == "load":
            load_image(path)
        elif check == "open":
            with Image.open(path):
                pass
    except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, SyntaxError...
        return f"{type(exc).__name__}: {exc}"
    return None


def _scan(root: Path, relpaths: Sequence[str], check: str) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Split ``relpaths`` into readable ones and ``(relpath, reason)`` failures."""
    if check not in _CHECKS:
        raise ValueError(f"check must be one of {_CHECKS}, got {check!r}")
    if check == "none" or not relpaths:
        return list(relpaths), []
    workers = min(8, os.cpu_count() or 1, len(relpaths))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoders release the GIL
        reasons = list(pool.map(lambda rel: _probe(root / rel, check), relpaths))
    good = [rel for rel, why in zip(relpaths, reasons) if why is None]
    bad = [(rel, why) for rel, why in zip(relpaths, reasons) if why is not None]
    return good, bad


def _describe_bad(bad: Sequence[Tuple[str, str]]) -> str:
    shown = ", ".join(f"{rel} ({why})" for rel, why in bad[:_SHOW])
    more = f" and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
    return shown + more


def _warn_unreadable(owner: str, bad: Sequence[Tuple[str, str]], total: int) -> None:
    if bad:
        warnings.warn(
            f"{owner}: skipped {len(bad)} unreadable image file(s) of {total}: {_describe_bad(bad)}",
            UnreadableImageWarning,
            stacklevel=3,
        )


def _require_some(owner: str, root: Path, good: Sequence[str], bad: Sequence[Tuple[str, str]]) -> None:
    if good:
        return
    if bad:
        raise ValueError(
            f"{owner}: no readable images in folder {str(root)!r}; "
            f"all {len(bad)} failed to decode: {_describe_bad(bad)}"
        )
    raise ValueError(
        f"{owner}: folder {str(root)!r} contains no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
    )


class _FolderBase(Dataset):
    """Shared reading logic: decode, resize/crop, flip, fall back on failure."""

    def _setup(self, size: Size, channels: int, crop: str, flip: bool) -> None:
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.size = as_hw(size)
        self.channels = check_channels(channels)
        self.crop = crop
        self.flip = bool(flip)
        self.runtime_skipped: Dict[int, str] = {}  # index -> reason, for files that failed when read

    def _read_item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        index %= n
        # Fall back to the next index, so one bad file never kills an epoch (or a DataLoader worker).
        for offset in range(n):
            i = (index + offset) % n
            if i in self.runtime_skipped:
                continue
            try:
                return self._read_item(i)
            except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, SyntaxError...
                self.runtime_skipped[i] = f"{type(exc).__name__}: {exc}"
                self._warn_runtime(i)
        where = f" in {str(self.root)!r}" if getattr(self, "root", None) is not None else ""
        raise RuntimeError(f"{type(self).__name__}: none of the {n} items could be read{where}")

    def _describe_item(self, index: int) -> str:
        return f"item {index}"

    def _warn_runtime(self, index: int) -> None:
        """One warning per unreadable file, for the first ``_SHOW`` of them in this process."""
        count = len(self.runtime_skipped)
        if count > _SHOW:
            return
        more = (
            (
                f" This is the {_SHOW}th such file in this process; further ones are skipped without a warning "
                "(counted in .runtime_skipped)."
            )
            if count == _SHOW
            else ""
        )
        warnings.warn(
            f"{type(self).__name__}: skipped {self._describe_item(index)}, which could not be read "
            f"({self.runtime_skipped[index]}); using the next readable item instead.{more}",
            UnreadableImageWarning,
            stacklevel=3,
        )

    def _flip_now(self) -> bool:
        return self.flip and bool(torch.rand(()) < 0.5)


class ImageFolder(_FolderBase):
    """Every image under ``root`` (recursively) as a ``[channels, H, W]`` tensor in [-1, 1].

    ``size`` (int or (height, width)): resize so the image covers it (aspect
    kept, antialiased bicubic), then crop ``"center"`` or ``"random"``. None
    keeps each image's own size (batch with batch_size=1 or equal-size files).
    ``flip``: random horizontal flip. ``check`` and ``listing``: see the module
    docstring. Random crops and flips use torch's default generator (seeded per
    worker by DataLoader).
    """

    def __init__(
        self,
        root: PathLike,
        size: Size = None,
        channels: int = 3,
        crop: str = "center",
        flip: bool = False,
        check: str = "none",
        listing: Optional[Listing] = None,
    ):
        self._setup(size, channels, crop, flip)
        self.root = Path(root)
        relpaths = list_images(self.root, listing)
        good, bad = _scan(self.root, relpaths, check)
        _require_some("ImageFolder", self.root, good, bad)
        _warn_unreadable(f"ImageFolder({str(self.root)!r})", bad, len(relpaths))
        self.files: List[str] = good
        self.skipped: List[Tuple[str, str]] = bad

    def __len__(self) -> int:
        return len(self.files)

    def _describe_item(self, index: int) -> str:
        return repr(self.files[index])

    def _read_item(self, index: int) -> torch.Tensor:
        image = load_image(self.root / self.files[index])
        image, _ = resize_and_crop(image, self.size, self.crop)
        x = pil_to_tensor(image, self.channels)
        return x.flip(-1) if self._flip_now() else x

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, size={self.size}, "
            f"channels={self.channels}, crop={self.crop!r}, flip={self.flip}, skipped={len(self.skipped)})"
        )


class LabelledFolder(ImageFolder):
    """Images with class labels: items ``(image, label)``.

    ``labels=None``: an ImageNet-style folder (``root/n01440764/*.JPEG``, ...): the class of an image is
    the index of its first-level folder in sorted order, as torchvision's ``ImageFolder`` numbers them
    (images directly in ``root`` are an error). ``labels=FILE.csv``: lines ``path,label`` (a header
    line ``path,label`` is allowed), paths relative to ``root``; images the file does not name are an
    error, so no image is silently unlabelled.
    """

    def __init__(self, root: PathLike, labels: Optional[PathLike] = None, **kwargs):
        super().__init__(root, **kwargs)
        self.classes, self.labels = file_labels(self.root, self.files, labels)

    def _read_item(self, index: int):
        return super()._read_item(index), self.labels[index]


def file_labels(
    root: PathLike, files: Sequence[str], labels: Optional[PathLike] = None
) -> Tuple[Optional[List[str]], List[int]]:
    """``(classes, labels)`` of image files (paths relative to ``root``), the rules of ``LabelledFolder``:
    ``labels=None``: the index of each file's first-level folder among the sorted folder names
    (``classes``); else the CSV file ``labels`` (``path,label``; ``classes`` None). One line when a
    file has no label."""
    if labels is None:
        classes = sorted({rel.split("/", 1)[0] for rel in files if "/" in rel})
        loose = [rel for rel in files if "/" not in rel]
        if loose or not classes:
            raise ValueError(
                f"{str(root)!r} must hold one folder per class "
                f"(class index = sorted folder name); {loose[:3] or 'no class folders'} found"
            )
        index = {name: i for i, name in enumerate(classes)}
        return classes, [index[rel.split("/", 1)[0]] for rel in files]
    table = read_labels_csv(Path(labels))
    missing = [rel for rel in files if rel not in table]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) of {str(root)!r} have no label in {str(labels)!r}, e.g. {missing[:3]}"
        )
    return None, [table[rel] for rel in files]


def read_labels_csv(path: Path) -> Dict[str, int]:
    """A labels file: lines ``path,label`` (an optional header line ``path,label``) -> {path: label}."""
    import csv

    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {str(path)!r}")
    table: Dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row or (n == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[1].strip().lstrip("-").isdigit() or int(row[1]) < 0:
                raise ValueError(
                    f"labels file {str(path)!r}, line {n}: expected 'path,label' with a label >= 0, "
                    f"got {','.join(row)!r}"
                )
            table[Path(row[0].strip()).as_posix()] = int(row[1])
    return table


def _hole_mask_for(degradation, owner: str, crop: str) -> Optional[Degradation]:
    """The inpainting degradation whose fixed mask items carry, or None."""
    if degradation is None:
        return None
    degradation = get_degradation(degradation)
    if not degradation.is_inpainting:
        return None
    if not degradation.fixed_mask:
        raise ValueError(
            f"{owner}: {degradation.name} draws a random mask per image, which corrupted image "
            "files do not record; train on clean images (folder:, skimage) instead"
        )
    if crop != "center":
        raise ValueError(
            f"{owner}: inpainting ({degradation.name}) uses a mask fixed in the image frame, "
            "so crop must be 'center' (a random crop would move the hole)"
        )
    return degradation


def _stem(relpath: str) -> str:
    return relpath.rsplit(".", 1)[0]


class PairedFolders(_FolderBase):
    """Clean/corrupted pairs matched by relative path without extension.

    ``clean_root/a/b.png`` pairs with ``corrupted_root/a/b.jpg``. Items are
    ``{"x0": clean, "xT": corrupted}`` plus ``"mask"`` (float ``[1, H, W]``,
    1 in the hole, hole of ``xT`` set to 0) when ``degradation`` names an
    inpainting degradation. A corrupted image of another size (e.g. a
    low-resolution input) is resized (bicubic) to its clean partner's size
    first; both then get the same crop and flip. Files present on one side
    only raise a ValueError with the counts, unless ``allow_unmatched=True``
    (then they are dropped with a warning).
    """

    yields_pairs = True  # BridgePairs needs no degradation for it

    def __init__(
        self,
        clean_root: PathLike,
        corrupted_root: PathLike,
        size: Size = None,
        channels: int = 3,
        crop: str = "center",
        flip: bool = False,
        check: str = "none",
        degradation=None,
        allow_unmatched: bool = False,
        listing: Optional[Listing] = None,
    ):
        self._setup(size, channels, crop, flip)
        self.clean_root, self.corrupted_root = Path(clean_root), Path(corrupted_root)
        self.hole = _hole_mask_for(degradation, "PairedFolders", crop)
        sides = {}
        for label, root in (("clean", self.clean_root), ("corrupted", self.corrupted_root)):
            relpaths = list_images(root, listing)
            if not relpaths:
                _require_some(f"PairedFolders ({label} side)", root, [], [])
            by_stem: Dict[str, str] = {}
            for rel in relpaths:
                stem = _stem(rel)
                if stem in by_stem:
                    raise ValueError(
                        f"PairedFolders: {label} folder {str(root)!r} has two files for one pair key "
                        f"{stem!r}: {by_stem[stem]} and {rel}"
                    )
                by_stem[stem] = rel
            sides[label] = by_stem
        clean, corrupted = sides["clean"], sides["corrupted"]
        only_clean = sorted(set(clean) - set(corrupted))
        only_corrupted = sorted(set(corrupted) - set(clean))
        if only_clean or only_corrupted:
            message = (
                f"PairedFolders: {len(only_clean)} clean file(s) in {str(self.clean_root)!r} have no "
                f"corrupted partner (e.g. {[clean[s] for s in only_clean[:_SHOW]]}) and "
                f"{len(only_corrupted)} corrupted file(s) in {str(self.corrupted_root)!r} have no clean "
                f"partner (e.g. {[corrupted[s] for s in only_corrupted[:_SHOW]]}); pairs are matched by "
                "relative path without extension"
            )
            if not allow_unmatched:
                raise ValueError(message)
            warnings.warn(message + "; dropping them (allow_unmatched=True)", UserWarning, stacklevel=2)
        stems = sorted(set(clean) & set(corrupted))
        if not stems:
            raise ValueError(
                f"PairedFolders: no pairs between {str(self.clean_root)!r} and {str(self.corrupted_root)!r}"
            )
        good_clean, bad_clean = _scan(self.clean_root, [clean[s] for s in stems], check)
        good_corrupted, bad_corrupted = _scan(self.corrupted_root, [corrupted[s] for s in stems], check)
        readable = {_stem(r) for r in good_clean} & {_stem(r) for r in good_corrupted}
        bad = [(f"clean/{r}", why) for r, why in bad_clean] + [(f"corrupted/{r}", why) for r, why in bad_corrupted]
        self.pairs: List[Tuple[str, str]] = [(clean[s], corrupted[s]) for s in stems if s in readable]
        if not self.pairs:
            raise ValueError(f"PairedFolders: no pair is readable on both sides: {_describe_bad(bad)}")
        _warn_unreadable(f"PairedFolders({str(self.clean_root)!r}, {str(self.corrupted_root)!r})", bad, 2 * len(stems))
        self.skipped: List[Tuple[str, str]] = bad

    def __len__(self) -> int:
        return len(self.pairs)

    def _describe_item(self, index: int) -> str:
        return "the pair {!r} / {!r}".format(*self.pairs[index])

    def _read_item(self, index: int) -> Dict[str, torch.Tensor]:
        clean_rel, corrupted_rel = self.pairs[index]
        clean = load_image(self.clean_root / clean_rel)
        corrupted = load_image(self.corrupted_root / corrupted_rel)
        if corrupted.size != clean.size:
            corrupted = corrupted.resize(clean.size, Image.BICUBIC)
        clean, box = resize_and_crop(clean, self.size, self.crop)
        corrupted, _ = resize_and_crop(corrupted, self.size, self.crop, box=box)
        x0 = pil_to_tensor(clean, self.channels)
        xT = pil_to_tensor(corrupted, self.channels)
        if self._flip_now():
            x0, xT = x0.flip(-1), xT.flip(-1)
        item = {"x0": x0, "xT": xT}
        if self.hole is not None:
            mask = self.hole.hole_mask(*xT.shape[-2:])
            item["xT"] = xT * (1.0 - mask)
            item["mask"] = mask
        return item

    def __repr__(self) -> str:
        return (
            f"PairedFolders(clean_root={str(self.clean_root)!r}, corrupted_root={str(self.corrupted_root)!r}, "
            f"n={len(self)}, size={self.size}, channels={self.channels}, skipped={len(self.skipped)})"
        )


class CorruptedFolder(Dataset):
    """Corrupted images only: items are ``{"xT": ...}`` (plus ``"mask"`` for inpainting).

    Reads nothing but the images under ``root``; this is what distillation on
    real data uses (IBMD never needs clean images). ``degradation``, when it is
    an inpainting one, gives the fixed hole mask (e.g. the centered square of
    ``inpaint-center``); the hole of ``xT`` is set to 0, as in the synthetic
    corruption, so both sources agree. Other arguments as in ImageFolder.
    """

    def __init__(
        self,
        root: PathLike,
        size: Size = None,
        channels: int = 3,
        degradation=None,
        crop: str = "center",
        flip: bool = False,
        check: str = "none",
        listing: Optional[Listing] = None,
    ):
        self.hole = _hole_mask_for(degradation, "CorruptedFolder", crop)
        self.degradation_name = None if degradation is None else get_degradation(degradation).name
        self.images = ImageFolder(
            root, size=size, channels=channels, crop=crop, flip=flip, check=check, listing=listing
        )
        self.root = self.images.root

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        xT = self.images[index]
        if self.hole is None:
            return {"xT": xT}
        mask = self.hole.hole_mask(*xT.shape[-2:])
        return {"xT": xT * (1.0 - mask), "mask": mask}

    def __repr__(self) -> str:
        return f"CorruptedFolder(root={str(self.root)!r}, n={len(self)}, degradation={self.degradation_name!r})"
