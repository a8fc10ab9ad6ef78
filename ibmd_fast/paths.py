"""Default file locations, kept free of torch so that ``ibmd-fast --help`` imports nothing heavy.

``DEFAULT_TEACHER``: the embedded teacher release that ships in the package (ibmd_fast/assets/);
``DEFAULT_GENERATOR``: what a plain ``ibmd-fast distill`` writes, and what ``sample``, ``eval`` and
``export`` read by default; ``EMBEDDED_CLASSIFIER``: the FID/CA classifier that ships for the
embedded default's data (scikit-image crops, 32 px, RGB), so ``eval`` trains none there. Every other
module imports them from here.
"""

import os

DEFAULT_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "teacher-inpaint.safetensors")
DEFAULT_GENERATOR = os.path.join("runs", "distill", "generator.safetensors")
EMBEDDED_CLASSIFIER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "classifier-skimage.safetensors"
)

__all__ = ["DEFAULT_TEACHER", "DEFAULT_GENERATOR", "EMBEDDED_CLASSIFIER"]
