"""dmruntime: run dmcompile bundles with numpy and ONNX Runtime only (no torch, no diffusers).

    from dmruntime import Bundle, DDIMSampler, SamplingLoop
    images = DDIMSampler(Bundle.open("out/"), steps=50).sample(16, seed=0)
    images = SamplingLoop(Bundle.open("out/"), "dpmpp-2m", steps=20).sample(16, seed=0)
    images = Text2Image(Bundle.open("t2i/")).generate("a handwritten seven", n=4)  # text-to-image bundles
"""

from .bundle import Bundle, Group, group_lookup, sha256_file, validate_manifest
from .components import COMPONENTS, Component
from .conditioning import Conditioning
from .engine import OnnxEngine
from .engines import ENGINE_RUNTIMES, Engine, EngineRuntime
from .errors import BundleError, DmRuntimeError, InputError
from .guidance import Guided
from .sampler import DDIMSampler, EpsModel, SamplingLoop, to_uint8
from .samplers import CLASS_NAMES, SAMPLERS, Sampler, SamplerChoice, default_sampler, make_sampler, sampler_for
from .samplers.ddim import DDIM, ddim_step, ddim_timesteps
from .schedule import NoiseSchedule
from .text import TextEncoders
from .text2image import Text2Image

__version__ = "0.1.0"

__all__ = [
    "CLASS_NAMES", "COMPONENTS", "DDIM", "ENGINE_RUNTIMES", "SAMPLERS", "Bundle", "BundleError", "Component", "Conditioning",
    "DDIMSampler", "DmRuntimeError", "Engine", "EngineRuntime", "EpsModel", "Group", "Guided", "InputError",
    "NoiseSchedule", "OnnxEngine", "Sampler", "SamplerChoice", "SamplingLoop", "Text2Image", "TextEncoders", "ddim_step", "ddim_timesteps", "default_sampler",
    "group_lookup", "make_sampler", "sampler_for", "sha256_file", "to_uint8", "validate_manifest",
]
