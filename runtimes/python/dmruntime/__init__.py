"""dmruntime: run dmcompile bundles with numpy and ONNX Runtime only (no torch, no diffusers).

    from dmruntime import Bundle, DDIMSampler
    images = DDIMSampler(Bundle.open("out/"), steps=50).sample(16, seed=0)
"""

from .bundle import Bundle, Group, group_lookup, sha256_file, validate_manifest
from .conditioning import Conditioning
from .engine import OnnxEngine
from .errors import BundleError, DmRuntimeError, InputError
from .sampler import DDIMSampler, EpsModel, to_uint8
from .schedule import NoiseSchedule, ddim_step

__version__ = "0.1.0"

__all__ = [
    "Bundle", "BundleError", "Conditioning", "DDIMSampler", "DmRuntimeError", "EpsModel", "Group", "InputError",
    "NoiseSchedule", "OnnxEngine", "ddim_step", "group_lookup", "sha256_file", "to_uint8",
    "validate_manifest",
]
