"""ibmd-fast: Inverse Bridge Matching Distillation, fast.

Distill a diffusion bridge model (I2SB, DDBM) into a one-step generator and ship
it as ONNX. See README.md; the formulas the docstrings cite are in docs/MATH.md.
"""

__version__ = "0.1.0"
