"""Frozen, validated configuration of each stage, versioned to and from plain dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

CONFIG_SCHEMA_VERSION = 1


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class _Versioned:
    """to_dict / from_dict with a schema_version, shared by the stage configs."""

    def to_dict(self) -> dict:
        return {"schema_version": CONFIG_SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        version = d.pop("schema_version", CONFIG_SCHEMA_VERSION)
        _check(version == CONFIG_SCHEMA_VERSION,
               f"{cls.__name__} schema_version {version} is not supported (expected {CONFIG_SCHEMA_VERSION})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        _check(not unknown, f"{cls.__name__} has no option(s) {unknown}; known: {sorted(fields)}")
        for name, f in fields.items():  # nested stage configs come back as their dataclass
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, _Versioned) and isinstance(d.get(name), dict):
                d[name] = type(default).from_dict(d[name])
        return cls(**d)


@dataclass(frozen=True)
class ExportConfig(_Versioned):
    """Tracing a UNet to ONNX.

    opset: ONNX opset of the exported graph. parity_tol: the largest max-abs difference
    between ONNX Runtime and PyTorch accepted at export. parity_batch: rows in the parity check.
    """

    opset: int = 17
    parity_tol: float = 1e-4
    parity_batch: int = 2
    seed: int = 0

    def __post_init__(self):
        _check(13 <= self.opset <= 23, f"opset must be in [13, 23], got {self.opset}")
        _check(self.parity_tol > 0, f"parity_tol must be > 0, got {self.parity_tol}")
        _check(self.parity_batch >= 1, f"parity_batch must be >= 1, got {self.parity_batch}")


@dataclass(frozen=True)
class SampleConfig(_Versioned):
    """DDIM sampling: number of images, steps, eta, seed and the UNet batch size."""

    n: int = 64
    steps: int = 50
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self):
        _check(self.n >= 1, f"n must be >= 1, got {self.n}")
        _check(1 <= self.steps <= 1000, f"steps must be in [1, 1000], got {self.steps}")
        _check(self.eta >= 0, f"eta must be >= 0, got {self.eta}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvalConfig(_Versioned):
    """Fidelity evaluation: ``sample`` drives the evaluated model; the reference set uses the
    same seed (paired PSNR/SSIM), the noise-floor set ``seed + floor_seed_offset``."""

    sample: SampleConfig = SampleConfig(n=1000)
    floor_seed_offset: int = 1_000_003
    confident_threshold: float = 0.9

    def __post_init__(self):
        _check(0 < self.confident_threshold < 1, "confident_threshold must be in (0, 1)")
        _check(self.floor_seed_offset != 0, "floor_seed_offset must not be 0 (the floor needs other seeds)")



@dataclass(frozen=True)
class CalibrationConfig(_Versioned):
    """Calibration along DDIM trajectories of the full-precision model.

    size trajectories x steps DDIM steps from seeded noise; statistics per timestep group
    (``groups`` equal ranges of the training timesteps; 1 = one scale for all timesteps).
    observer: how a tensor's clipping range is chosen (minmax, percentile, mse).
    timesteps: ``trajectory`` records every step; ``ptq4dm`` records each trajectory at
    one timestep drawn from a normal distribution (PTQ4DM's calibration).
    """

    size: int = 64
    steps: int = 50
    seed: int = 0
    groups: int = 10
    observer: str = "mse"
    percentile: float = 99.99
    timesteps: str = "trajectory"
    batch_size: int = 64
    bins: int = 2048
    sample_per_tensor: int = 65536

    def __post_init__(self):
        _check(self.size >= 1, f"calib size must be >= 1, got {self.size}")
        _check(1 <= self.steps <= 1000, f"calib steps must be in [1, 1000], got {self.steps}")
        _check(1 <= self.groups <= 1000, f"groups must be in [1, 1000], got {self.groups}")
        _check(self.observer in ("minmax", "percentile", "mse"),
               f"observer must be minmax, percentile or mse, got {self.observer!r}")
        _check(50 < self.percentile < 100, f"percentile must be in (50, 100), got {self.percentile}")
        _check(self.timesteps in ("trajectory", "ptq4dm"),
               f"calibration timesteps must be trajectory or ptq4dm, got {self.timesteps!r}")
        _check(self.batch_size >= 1 and self.bins >= 16 and self.sample_per_tensor >= 1024,
               "batch_size >= 1, bins >= 16 and sample_per_tensor >= 1024 are required")


DISTORTIONS = ("ssim+mse", "mse", "sqnr")


@dataclass(frozen=True)
class AnalysisConfig(_Versioned):
    """Rate-distortion curves: samples_per_group inputs per timestep group (from fp32 DDIM
    trajectories), the distortion measure of the UNet output, the candidate weight and
    activation widths, and the sweep: ``full`` measures every weight width, ``model`` measures
    ``model_bits`` and fits the rest from the weight-quantization noise power. max_rows: rows
    per ONNX Runtime call (memory bound)."""

    samples_per_group: int = 16
    distortion: str = "ssim+mse"
    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_bits: tuple[int, ...] = (6, 8)
    sweep: str = "full"
    model_bits: tuple[int, ...] = (3, 6)
    max_rows: int = 256
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "weight_bits", tuple(sorted(int(b) for b in self.weight_bits)))
        object.__setattr__(self, "act_bits", tuple(sorted(int(b) for b in self.act_bits)))
        object.__setattr__(self, "model_bits", tuple(int(b) for b in self.model_bits))
        _check(self.samples_per_group >= 1, f"samples_per_group must be >= 1, got {self.samples_per_group}")
        _check(self.distortion in DISTORTIONS, f"distortion must be one of {DISTORTIONS}, got {self.distortion!r}")
        _check(all(2 <= b <= 8 for b in self.weight_bits) and self.weight_bits,
               f"weight bits must be in [2, 8], got {self.weight_bits}")
        _check(all(2 <= b <= 8 for b in self.act_bits), f"activation bits must be in [2, 8], got {self.act_bits}")
        _check(self.sweep in ("full", "model"), f"sweep must be full or model, got {self.sweep!r}")
        _check(self.sweep == "full" or len(self.model_bits) == 2 and set(self.model_bits) <= set(self.weight_bits)
               and self.model_bits[0] != self.model_bits[1],
               f"model_bits must be two different widths among the weight bits, got {self.model_bits}")
        _check(self.max_rows >= 1, "max_rows must be >= 1")


FORMATS = ("w8a8", "mixed")


@dataclass(frozen=True)
class BuildConfig(_Versioned):
    """Compiling a model into a bundle.

    format: the precision recipe (w8a8: int8 weights, uint8/int8 activations per profile).
    profile: the target profile (ort-cpu). float_layers: layers kept in float, each a node
    name, torch module name (or prefix, e.g. ``time_embedding``), op type (``Gemm``), or the
    aliases ``first_conv`` / ``last_conv``. eval_samples: samples for the fidelity check
    recorded in the manifest (0 skips it).
    """

    format: str = "w8a8"
    profile: str = "ort-cpu"
    float_layers: tuple[str, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval_samples: int = 16
    seed: int = 0
    budget: str | None = None
    allocator: str = "dp"
    share_weights: bool = True
    allow_simulated_bits: bool = False
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    weight_bits: dict | None = None  # explicit per-layer widths (node or module -> bits), mixed only
    correction: bool = True
    correction_size: int = 32
    step_aware: bool = False  # PTQD's step-aware activation width selection, reported in the manifest

    def __post_init__(self):
        from .lowering.profiles import PROFILES

        _check(self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}")
        _check(self.profile in PROFILES, f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        _check(self.eval_samples >= 0, f"eval_samples must be >= 0, got {self.eval_samples}")
        _check(self.correction_size >= 1, f"correction_size must be >= 1, got {self.correction_size}")
        _check(self.allocator in ("dp", "lagrange"), f"allocator must be dp or lagrange, got {self.allocator!r}")
        _check(self.format != "mixed" or bool(self.budget) != bool(self.weight_bits),
               "format mixed needs exactly one of --budget (e.g. 5.0bits, 20MB, BOPs=1e9) or explicit weight bits")
        _check(self.format == "mixed" or not (self.budget or self.weight_bits),
               "--budget applies to --format mixed only")
        if self.budget:
            from .analysis.allocate import parse_budget

            parse_budget(self.budget)
        object.__setattr__(self, "float_layers", tuple(self.float_layers))
