"""Data: image sources, degradations, and the pair / corrupted-only pipelines.

Images are float32 tensors ``[C, H, W]`` in [-1, 1], C = 1 or 3.

Sources (torch Datasets): ``ImageFolder``, ``PairedFolders``,
``CorruptedFolder``, ``SkimagePhotos`` (the embedded default),
``FashionMNIST``, DDBM's paired layouts ``EdgesToHandbags`` and ``DIODE``.
Folders are listed, never decoded, when built (``Listing`` shares a listing
between ranks). Degradations: ``get_degradation(name, masks=None)`` for the
names in ``DEGRADATIONS`` (I2SB's own operators in ``i2sb_corruptions``).
Pipelines: ``BridgePairs`` (x0, xT pairs), ``CorruptedOnly`` (xT only, for
distillation), ``make_source`` / ``make_dataset`` (CLI specs), ``collate``.
Nothing here downloads anything.
"""

from ibmd_fast.data.degradations import (
    DEGRADATIONS,
    I2SB_DEGRADATIONS,
    JPEG,
    Blur,
    CenterInpainting,
    Degradation,
    FreeformInpainting,
    Sketch,
    SuperResolution,
    canonical_name,
    get_degradation,
)
from ibmd_fast.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST, read_idx
from ibmd_fast.data.folders import (
    CorruptedFolder,
    ImageFolder,
    Listing,
    PairedFolders,
    UnreadableImageWarning,
    list_images,
)
from ibmd_fast.data.layouts import DIODE, LAYOUTS, EdgesToHandbags
from ibmd_fast.data.images import IMAGE_EXTENSIONS, pil_to_tensor, tensor_to_uint8, to_channels, uint8_to_tensor
from ibmd_fast.data.pipeline import SPEC_HELP, BridgePairs, CorruptedOnly, collate, make_dataset, make_source
from ibmd_fast.data.skimage_photos import (
    DATASET_PHOTOS,
    DEFAULT_SCALE,
    HELD_OUT_PHOTO,
    SKIMAGE_PHOTOS,
    SkimagePhotos,
    held_out_photo,
    load_skimage_photo,
)

__all__ = [
    "DEGRADATIONS",
    "I2SB_DEGRADATIONS",
    "Degradation",
    "SuperResolution",
    "JPEG",
    "Blur",
    "CenterInpainting",
    "FreeformInpainting",
    "Sketch",
    "canonical_name",
    "get_degradation",
    "ImageFolder",
    "PairedFolders",
    "CorruptedFolder",
    "UnreadableImageWarning",
    "list_images",
    "Listing",
    "LAYOUTS",
    "EdgesToHandbags",
    "DIODE",
    "SkimagePhotos",
    "SKIMAGE_PHOTOS",
    "DATASET_PHOTOS",
    "HELD_OUT_PHOTO",
    "DEFAULT_SCALE",
    "load_skimage_photo",
    "held_out_photo",
    "FashionMNIST",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "BridgePairs",
    "CorruptedOnly",
    "make_source",
    "make_dataset",
    "collate",
    "SPEC_HELP",
    "IMAGE_EXTENSIONS",
    "pil_to_tensor",
    "tensor_to_uint8",
    "to_channels",
    "uint8_to_tensor",
]
