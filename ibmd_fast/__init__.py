"""ibmd-fast: Inverse Bridge Matching Distillation, fast.

Distill a diffusion bridge model (I2SB, DDBM) into a one-step generator and ship
it as ONNX. See README.md; the formulas are in MATH.md of the design card.
"""
__version__ = "0.1.0"
