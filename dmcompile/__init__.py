"""dmcompile: compile trained diffusion models into low-bit inference bundles.

Importing the package does no work; the heavy modules (torch, diffusers, onnx)
are imported by the stages that need them.
"""

__version__ = "0.1.0"
