"""Frozen, validated configuration of each stage, versioned to and from plain dicts.

Every option has one definition here: its type, default, allowed values and check. The CLI
reads its choices and defaults from these classes (:func:`default`), never repeats them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from dmruntime import InputError, SamplerChoice
from dmruntime.sampler import DEFAULT_BATCH, DEFAULT_N, choose_sampler

from .budget import Budget, parse_budget
from .errors import ConfigError
from .quant import MAX_WEIGHT_BITS, MIN_WEIGHT_BITS
from .targets import PROFILES

# Each config class carries its own SCHEMA_VERSION (1 unless its fields changed); see
# BuildConfig for the history of the one that changed.
CONFIG_SCHEMA_VERSION = 1

OBSERVERS = ("mse", "minmax", "percentile")
CALIB_TIMESTEPS = ("trajectory", "ptq4dm")
DISTORTIONS = ("ssim+mse", "mse", "sqnr")
SWEEPS = ("full", "model")
ALLOCATORS = ("dp", "lagrange")
ROUNDINGS = ("rtn", "gptq")  # the names of calibration.rounding.ROUNDING_METHODS (config sits below it)
SPEED_CHECK_MACS = 1e9  # speed_check="auto": UNets under this many MACs per sample (the digits models, not ddpm-cifar10-32)


def default(cls, name: str):
    """The default of option ``name`` of config class ``cls`` (for the CLI's help and flags)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(name, steps, karras, eta=0.0) -> SamplerChoice:
    """The runtime's check of a sampler choice (unknown names, --karras or eta where the sampler
    has neither), as a ConfigError."""
    try:
        return SamplerChoice(name, steps, bool(karras), eta)
    except InputError as e:
        raise ConfigError(str(e)) from None


def _check_seed(seed) -> None:
    _check(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0,
           f"seed must be an integer >= 0 (numpy's generators take no negative seeds), got {seed!r}")


class _Versioned:
    """to_dict / from_dict with a schema_version, shared by the stage configs."""

    SCHEMA_VERSION = CONFIG_SCHEMA_VERSION

    def to_dict(self) -> dict:
        # options added after caches and bundles keyed on these dicts existed are left out at
        # their default (metadata ``omit_default``), so those keys stay what they were
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("omit_default") and d[f.name] == f.default:
                del d[f.name]
        return {"schema_version": self.SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        version = d.pop("schema_version", cls.SCHEMA_VERSION)
        _check(version == cls.SCHEMA_VERSION,
               f"{cls.__name__} schema_version {version} is not supported (expected {cls.SCHEMA_VERSION}); "
               "it was written by another dmcompile version: rebuild or re-run that stage")
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
    sequence_length: for cross-attention UNets, the length L of encoder_hidden_states
    [B, L, D] used for the parity check, the layer map's MACs and default conditions (the
    engine itself takes any L); 77 is CLIP's. clip_skip: text-to-image pipelines: the text
    encoder's output is the hidden state this many layers before the last, through the final
    layer norm (diffusers' ``clip_skip``); None: the last hidden state.
    """

    opset: int = 17
    parity_tol: float = 1e-4
    parity_batch: int = 2
    seed: int = 0
    sequence_length: int = 77
    clip_skip: int | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self):
        _check_seed(self.seed)
        _check(self.clip_skip is None or (isinstance(self.clip_skip, int) and self.clip_skip >= 1),
               f"clip_skip must be an integer >= 1 (layers skipped from the end of the text encoder), got "
               f"{self.clip_skip!r}")
        _check(13 <= self.opset <= 23, f"opset must be in [13, 23], got {self.opset}")
        _check(self.parity_tol > 0, f"parity_tol must be > 0, got {self.parity_tol}")
        _check(self.parity_batch >= 1, f"parity_batch must be >= 1, got {self.parity_batch}")
        _check(self.sequence_length >= 1, f"sequence_length must be >= 1, got {self.sequence_length}")


@dataclass(frozen=True)
class SampleConfig(_Versioned):
    """Sampling: number of images, the sampler (``sampler`` a name such as ``dpmpp-2m`` or a
    diffusers class name, ``steps``, ``karras``, DDIM's ``eta``; None: what the bundle was
    calibrated with, else the model's scheduler class and 50 steps), seed, the UNet batch size,
    and for conditional models the classifier-free guidance scale (None: no guidance)."""

    n: int = DEFAULT_N  # the runtime's defaults: both command lines draw the same samples
    steps: int | None = None
    eta: float = 0.0
    seed: int = 0
    batch_size: int = DEFAULT_BATCH
    guidance_scale: float | None = None
    sampler: str | None = None
    karras: bool | None = None

    def __post_init__(self):
        _check_seed(self.seed)
        _check(self.n >= 1, f"n must be >= 1, got {self.n}")
        _check(self.steps is None or 1 <= self.steps <= 100_000, f"steps must be >= 1, got {self.steps}")
        _check(0 <= self.eta <= 1, f"eta must be in [0, 1], got {self.eta}: past 1 DDIM's noise term is the square "
               "root of a negative variance (NaN samples)")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.guidance_scale is None or self.guidance_scale > 0,
               f"guidance scale must be > 0, got {self.guidance_scale}")
        choice = _choice(self.sampler, self.steps or 1, self.karras, self.eta)
        object.__setattr__(self, "sampler", choice.name)

    def resolved(self, model) -> SampleConfig:
        """This config with the sampler, steps and Karras setting filled in for ``model`` (a
        Bundle defaults to what it was calibrated with), so a reference model samples the same."""
        try:
            c = choose_sampler(model, self.sampler, self.steps, self.karras, self.eta)
        except InputError as e:
            raise ConfigError(str(e)) from None
        return dataclasses.replace(self, sampler=c.name, steps=c.steps, karras=c.karras)

    def choice(self, model) -> SamplerChoice:
        """The sampler choice of a run of ``model``."""
        c = self.resolved(model)
        return SamplerChoice(c.sampler, c.steps, c.karras, c.eta)


@dataclass(frozen=True)
class EvalConfig(_Versioned):
    """Fidelity evaluation: ``sample`` drives the evaluated model; the reference set uses the
    same seed (paired PSNR/SSIM), the noise-floor set ``seed + floor_seed_offset``.
    prompts: text-to-image bundles: a UTF-8 file of prompts, one per line, cycled over the
    samples; None: dmcompile's digit evaluation prompts for digits-shaped models (which gives
    prompt accuracy), else the default calibration prompts."""

    sample: SampleConfig = SampleConfig(n=1000)
    floor_seed_offset: int = 1_000_003
    confident_threshold: float = 0.9
    prompts: str | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self):
        _check(0 < self.confident_threshold < 1, "confident_threshold must be in (0, 1)")
        _check(self.floor_seed_offset != 0, "floor_seed_offset must not be 0 (the floor needs other seeds)")



@dataclass(frozen=True)
class CalibrationConfig(_Versioned):
    """Calibration along sampling trajectories of the full-precision model.

    size trajectories x steps steps of ``sampler`` (a name such as ``dpmpp-2m`` or a diffusers
    class name; None: the model's scheduler class, DDIM for a DDPMScheduler config; ``karras``:
    Karras sigmas) from seeded noise; the bundle's sampling defaults to the same sampler and
    steps; statistics per timestep group
    (``groups`` equal ranges of the training timesteps; 1 = one scale for all timesteps).
    observer: how a tensor's clipping range is chosen (minmax, percentile, mse).
    timesteps: ``trajectory`` records every step; ``ptq4dm`` records each trajectory at
    one timestep drawn from a normal distribution (PTQ4DM's calibration).
    guidance_scale: conditional models only: run the classifier-free guided sampler (both
    branches recorded) at this scale; None runs the conditional branch alone.
    conditions: conditional models only: an .npz of conditions, one row per trajectory
    (cycled), keyed by input name (class_labels, encoder_hidden_states), optionally with the
    null condition as null_<name>; None draws class labels uniformly (embeddings: normal).
    prompts: text-to-image models: a UTF-8 file of prompts, one per line, encoded by the
    model's text encoder (one per trajectory, a seeded selection); None: the pipeline folder's
    ``calibration_prompts.txt``, else dmcompile's default set. negative_prompt: the null branch
    of guidance (None: the empty prompt, as diffusers).
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
    guidance_scale: float | None = None
    conditions: str | None = None
    sampler: str | None = None
    karras: bool = False
    prompts: str | None = field(default=None, metadata={"omit_default": True})
    negative_prompt: str | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self):
        _check_seed(self.seed)
        _check(self.size >= 1, f"calib size must be >= 1, got {self.size}")
        _check(isinstance(self.steps, int) and self.steps >= 1, f"calib steps must be an integer >= 1, got {self.steps}")
        object.__setattr__(self, "sampler", _choice(self.sampler, self.steps, self.karras).name)
        _check(1 <= self.groups <= 1000, f"groups must be in [1, 1000], got {self.groups}")
        _check(self.observer in OBSERVERS, f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        _check(50 < self.percentile < 100, f"percentile must be in (50, 100), got {self.percentile}")
        _check(self.timesteps in CALIB_TIMESTEPS,
               f"calibration timesteps must be one of {CALIB_TIMESTEPS}, got {self.timesteps!r}")
        _check(self.batch_size >= 1 and self.bins >= 16 and self.sample_per_tensor >= 1024,
               "batch_size >= 1, bins >= 16 and sample_per_tensor >= 1024 are required")
        _check(self.guidance_scale is None or (self.guidance_scale == self.guidance_scale and self.guidance_scale > 0),
               f"guidance_scale must be > 0, got {self.guidance_scale}")
        _check(self.guidance_scale is None or self.timesteps == "trajectory",
               "PTQ4DM timestep sampling with guidance is not supported; use --calib-timesteps trajectory")
        if self.conditions is not None:
            object.__setattr__(self, "conditions", str(self.conditions))
        _check(self.prompts is None or self.conditions is None,
               "give either prompts (text-to-image models) or conditions (an .npz of embeddings), not both")
        if self.prompts is not None:
            object.__setattr__(self, "prompts", str(self.prompts))
        _check(self.negative_prompt is None or isinstance(self.negative_prompt, str),
               f"negative_prompt must be a string, got {self.negative_prompt!r}")

    def sampling(self, schedule) -> SamplerChoice:
        """The sampler the trajectories take over ``schedule`` (the model's default filled in);
        a model whose scheduler dmruntime lacks, with no sampler named, is a ConfigError."""
        try:
            return SamplerChoice(self.sampler, self.steps, self.karras).resolved(schedule)
        except InputError as e:
            raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class AnalysisConfig(_Versioned):
    """Rate-distortion curves: samples_per_group inputs per timestep group (from fp32
    trajectories), the distortion measure of the UNet output, the candidate weight and
    activation widths, and the sweep: ``full`` measures every weight width, ``model`` measures
    ``model_bits`` and fits the rest from the weight-quantization noise power. max_rows: rows
    per ONNX Runtime call (memory bound). rounding: how weights are rounded onto their grid,
    here and in the bundle the build writes: ``gptq`` (error-compensating, on the layer inputs'
    second moments gathered during calibration) or ``rtn`` (round to nearest).

    Schema history: 1 had no ``rounding`` (weights were rounded to nearest; read as ``rtn``)."""

    SCHEMA_VERSION = 2
    samples_per_group: int = 16
    distortion: str = "ssim+mse"
    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_bits: tuple[int, ...] = (6, 8)
    sweep: str = "full"
    model_bits: tuple[int, ...] = (3, 6)
    max_rows: int = 256
    seed: int = 0
    rounding: str = "gptq"

    def __post_init__(self):
        _check_seed(self.seed)
        object.__setattr__(self, "weight_bits", tuple(sorted(int(b) for b in self.weight_bits)))
        _check(self.rounding in ROUNDINGS, f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        object.__setattr__(self, "act_bits", tuple(sorted(int(b) for b in self.act_bits)))
        object.__setattr__(self, "model_bits", tuple(int(b) for b in self.model_bits))
        _check(self.samples_per_group >= 1, f"samples_per_group must be >= 1, got {self.samples_per_group}")
        _check(self.distortion in DISTORTIONS, f"distortion must be one of {DISTORTIONS}, got {self.distortion!r}")
        _check(all(MIN_WEIGHT_BITS <= b <= MAX_WEIGHT_BITS for b in self.weight_bits) and self.weight_bits,
               f"weight bits must be in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}], got {self.weight_bits}")
        _check(all(2 <= b <= 8 for b in self.act_bits), f"activation bits must be in [2, 8], got {self.act_bits}")
        _check(self.sweep in SWEEPS, f"sweep must be one of {SWEEPS}, got {self.sweep!r}")
        _check(self.sweep == "full" or len(self.model_bits) == 2 and set(self.model_bits) <= set(self.weight_bits)
               and self.model_bits[0] != self.model_bits[1],
               f"model_bits must be two different widths among the weight bits, got {self.model_bits}")
        _check(self.max_rows >= 1, "max_rows must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> AnalysisConfig:
        """Schema 2, or 1 (before ``rounding``: round to nearest)."""
        if d.get("schema_version") == 1:
            d = {**d, "schema_version": cls.SCHEMA_VERSION, "rounding": d.get("rounding", "rtn")}
        return super().from_dict(d)



@dataclass(frozen=True)
class Override:
    """One per-layer precision rule. ``pattern``: a node name, a torch module name or prefix
    (``time_embedding`` covers ``time_embedding.linear_1``), an op type (Conv, Gemm, MatMul),
    ``first_conv`` / ``last_conv``, or ``*`` (every layer). ``precision``: weight bits
    (2-8) or ``"float"`` (the layer is not quantized). When several rules match a layer the
    most specific wins: node name (or alias) > module name > module prefix (longer first) >
    op type > ``*`` (coremltools' OptimizationConfig, torchao's FqnToConfig)."""

    pattern: str
    precision: int | str

    def __post_init__(self):
        _check(isinstance(self.pattern, str) and self.pattern.strip() and not any(c in self.pattern for c in "=,"),
               f"override pattern must be a layer name, module prefix, op type, first_conv, last_conv or *, "
               f"got {self.pattern!r}")
        p = self.precision
        if isinstance(p, str) and p.strip().isdigit():
            p = int(p)
        if isinstance(p, str):
            _check(p.strip().lower() == "float",
                   f"override {self.pattern}={p}: precision must be weight bits "
                   f"({MIN_WEIGHT_BITS}-{MAX_WEIGHT_BITS}) or float")
            p = "float"
        else:
            _check(isinstance(p, int) and not isinstance(p, bool) and MIN_WEIGHT_BITS <= p <= MAX_WEIGHT_BITS,
                   f"override {self.pattern}={p}: weight bits must be in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}] "
                   "(weights are stored in int8 containers), or float")
        object.__setattr__(self, "pattern", self.pattern.strip())
        object.__setattr__(self, "precision", p)

    def __str__(self):
        return f"{self.pattern}={self.precision}"


def parse_overrides(spec: str | None, default_precision: int | str | None = None) -> tuple[Override, ...]:
    """'*=4,first_conv=8,time_embedding=float' -> Overrides. Entries without '=' take
    ``default_precision`` (so ``--float-layer conv_out`` is ``conv_out=float``)."""
    if not spec:
        return ()
    out = []
    for part in str(spec).split(","):
        name, eq, value = part.strip().rpartition("=")
        if not eq:
            name, value = value, default_precision
        _check(bool(name) and value not in (None, ""),
               f"cannot read override {part!r}; write NAME=BITS or NAME=float, e.g. *=4,first_conv=8")
        out.append(Override(name, value))
    return tuple(out)


def _overrides(value) -> tuple[Override, ...]:
    """Overrides from a tuple of Override, dicts, 'NAME=VALUE' strings or a {NAME: VALUE} dict."""
    if isinstance(value, dict):
        return tuple(Override(k, v) for k, v in value.items())
    out = []
    for o in value or ():
        if isinstance(o, Override):
            out.append(o)
        elif isinstance(o, dict):
            out.append(Override(o["pattern"], o["precision"]))
        else:
            out.extend(parse_overrides(str(o)))
    _check(not any(o.pattern == "*" and o.precision == "float" for o in out),
           "override *=float keeps every layer float; for an fp32 bundle use `dmcompile export`")
    patterns = [o.pattern for o in out]
    dup = sorted({p for p in patterns if patterns.count(p) > 1})
    _check(not dup, f"override pattern(s) {dup} given more than once; keep one rule per pattern")
    return tuple(out)


@dataclass(frozen=True)
class W8A8Recipe(_Versioned):
    """Every quantizable layer at 8-bit weights and 8-bit activations, except where an
    override keeps it in float (an override of 8 bits is allowed and changes nothing)."""

    overrides: tuple[Override, ...] = ()
    name = "w8a8"

    def __post_init__(self):
        object.__setattr__(self, "overrides", _overrides(self.overrides))
        bad = [str(o) for o in self.overrides if o.precision not in ("float", 8)]
        _check(not bad, f"w8a8 quantizes every weight to 8 bits, so {bad} cannot apply; "
               "use --format mixed for other widths")

    def to_dict(self) -> dict:
        return {"name": self.name, **super().to_dict()}


@dataclass(frozen=True)
class MixedRecipe(_Versioned):
    """Per-layer weight widths (8-bit activations): chosen by rate-distortion allocation under
    ``budget``, with layers that an override names pinned (or kept float); without a budget
    every weighted layer needs a width from the overrides (e.g. ``*=4``).

    allocator: ``dp`` (exact knapsack, default) or ``lagrange`` (the paper's multiplier
    sweep). share_weights: one allocation for all timestep groups (weights stored once, one
    engine) or one per group. allow_simulated_bits: allow widths the target cannot store
    natively (kept in 4- or 8-bit containers with the narrower grid). allow_float: keeping a
    layer in float is one more option per (layer, group), at no weight distortion and a float32
    layer's cost (32-bit weights; BOPs 32 x 32); with per-group weights the allocation is then
    joint over the groups (the budget bounds the step-weighted average), so float goes to the
    groups that need it; groups with different choices get different engines."""

    budget: Budget | None = None
    allocator: str = "dp"
    share_weights: bool = True
    allow_simulated_bits: bool = False
    overrides: tuple[Override, ...] = ()
    allow_float: bool = False
    name = "mixed"

    def __post_init__(self):
        if self.budget is not None and not isinstance(self.budget, Budget):
            b = self.budget
            b = Budget(b["kind"], float(b["value"]), b.get("text", "")) if isinstance(b, dict) else parse_budget(b)
            object.__setattr__(self, "budget", b)
        object.__setattr__(self, "overrides", _overrides(self.overrides))
        _check(self.allocator in ALLOCATORS, f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        widths = [o for o in self.overrides if o.precision != "float"]
        _check(self.budget is not None or widths,
               "format mixed needs --budget (e.g. 5.0bits, 1MB, BOPs=4e9) or explicit weight widths "
               "(e.g. --weight-bits '*=4,first_conv=8')")
        star = next((o for o in self.overrides if o.pattern == "*"), None)
        _check(self.budget is None or star is None,
               f"override {star} fixes every layer, leaving nothing for the budget to allocate; drop one of them")
        _check(not self.allow_float or self.budget is not None,
               "allow_float lets the budget's allocator keep layers float; it needs --budget (to keep named layers "
               "float, use an override NAME=float)")

    def to_dict(self) -> dict:
        return {"name": self.name, **super().to_dict()}


RECIPES = {r.name: r for r in (W8A8Recipe, MixedRecipe)}
# BuildConfig keys of config schema 1 (dmcompile 0.1), translated by BuildConfig.from_dict
LEGACY_BUILD_KEYS = ("format", "float_layers", "budget", "allocator", "share_weights", "allow_simulated_bits",
                     "weight_bits")


def recipe_from_dict(d: dict):
    """A recipe from its to_dict form ({"name": "w8a8" | "mixed", ...})."""
    d = dict(d)
    name = d.pop("name", None)
    _check(name in RECIPES, f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    cls = RECIPES[name]
    d.pop("schema_version", None)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    _check(not unknown, f"{cls.__name__} has no option(s) {unknown}")
    return cls(**d)


def _legacy_recipe(legacy: dict):
    """The recipe a schema-1 BuildConfig (format, float_layers, weight_bits, budget, ...) meant."""
    overrides = tuple(Override(n, "float") for n in legacy.get("float_layers") or ())
    overrides += tuple(Override(k, v) for k, v in (legacy.get("weight_bits") or {}).items())
    fmt = legacy.get("format", "w8a8")
    if fmt == "mixed":
        return MixedRecipe(budget=legacy.get("budget"), allocator=legacy.get("allocator", "dp"),
                           share_weights=legacy.get("share_weights", True),
                           allow_simulated_bits=legacy.get("allow_simulated_bits", False), overrides=overrides)
    _check(fmt == "w8a8", f"format must be one of {sorted(RECIPES)}, got {fmt!r}")
    _check(not legacy.get("budget") and not legacy.get("weight_bits"), "--budget applies to --format mixed only")
    return W8A8Recipe(overrides=overrides)


@dataclass(frozen=True, init=False)
class BuildConfig(_Versioned):
    """Compiling a model into a bundle.

    recipe: W8A8Recipe (default) or MixedRecipe, each with its overrides. profile: the
    target profile (``ort-cpu``, ``openvino-cpu`` or ``tensorrt``). calibration: how activation statistics are gathered.
    analysis: RD curves (mixed allocation) and the step-aware check's inputs.
    eval_samples: samples of the fidelity check in the manifest (0 skips it).
    correction: estimate PTQD noise-correction statistics (correction_size trajectories).
    step_aware: report PTQD's step-aware activation widths per group.
    null_class: class-conditional models: the class label that means "no class", stored in the
    bundle as the null condition of classifier-free guidance (embeddings: null_<name> in the
    calibration's conditions file).
    decoder: latent models: the VAE decoder in the bundle, ``fp32`` (the export's, as it is) or
    ``w8a8`` (the same lowering as the UNet, calibrated on latents the fp32 model samples;
    decoder_calib_size of them).
    residual_int8: tensorrt: Q/DQ on the skip input of each residual Add after an int8 Conv, so
    TensorRT fuses the Add into the Conv with an int8 residual (its recommended placement); False
    keeps the residual stream FP16 (measured on digits16: 5 dB closer to full precision).
    max_engines: openvino-cpu and tensorrt: at most this many engines; adjacent timestep
    groups with the closest activation scales share one, with the union of their ranges.
    text_encoder: text-to-image models: the text encoders in the bundle, ``fp32`` (default) or
    ``int8`` (ONNX Runtime's dynamic quantization; its error on the calibration prompts in the
    manifest). clip_skip: text-to-image models: diffusers' ``clip_skip`` (see ExportConfig).
    shared_engine: openvino-cpu: one engine for every group, fed each group's scalars (the memory of
    one compiled model) instead of one engine per group with its scales compiled in.
    constant_conv_params: ort-cpu with several groups: True gives each Conv input one zero point for
    all groups and adds Conv biases in float (ONNX Runtime's symmetric int8 Conv in the shared
    engine); False feeds every group's own zero points and int32 biases (its generic int8 Conv);
    ``"auto"`` (default) picks the faster on the build machine's CPU: False where it has AMX.
    float_precision: openvino-cpu: the precision OpenVINO runs the layers left float in, ``f32``
    (default) or ``bf16`` (OpenVINO's own default where the CPU has bf16: AVX512-BF16 / AMX; the
    attention MatMuls, normalisations and the rest then run in bf16).
    speed_check: time the written engines against the fp32 export on this machine and record the
    ratio in the manifest (``speed``): ``"auto"`` (default) does it for models that build in about a
    minute (a UNet under SPEED_CHECK_MACS multiply-accumulates per sample) on CPU targets; True or
    False force it.
    ray: run the RD probes as Ray tasks: ``"local"`` starts a Ray cluster in this process, ``"auto"``
    joins the one running on this node, else a cluster address; None (default) runs them here.
    The engines are the same bytes either way (:mod:`dmcompile.parallel`). ray_workers: the CPUs of
    the cluster ``"local"`` starts (default all).

    Schema history: 1 (dmcompile 0.1): flat ``format``, ``float_layers``, ``weight_bits``,
    ``budget``, ``allocator``, ``share_weights``, ``allow_simulated_bits``; 2: ``recipe``.
    ``from_dict`` still reads schema-1 dicts (what bundles built then record); the constructor
    takes schema 2 only.
    """

    recipe: W8A8Recipe | MixedRecipe = W8A8Recipe()
    profile: str = "ort-cpu"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    eval_samples: int = 16
    seed: int = 0
    correction: bool = True
    correction_size: int = 32
    step_aware: bool = False
    null_class: int | None = None
    decoder: str = "fp32"
    decoder_calib_size: int = 32
    max_engines: int | None = None
    residual_int8: bool = True
    text_encoder: str = field(default="fp32", metadata={"omit_default": True})
    clip_skip: int | None = field(default=None, metadata={"omit_default": True})
    speed_check: bool | str = field(default="auto", metadata={"omit_default": True})
    constant_conv_params: bool | str = field(default="auto", metadata={"omit_default": True})
    shared_engine: bool = field(default=False, metadata={"omit_default": True})
    float_precision: str = field(default="f32", metadata={"omit_default": True})
    ray: str | None = field(default=None, metadata={"omit_default": True})
    ray_workers: int | None = field(default=None, metadata={"omit_default": True})
    SCHEMA_VERSION = 2

    def __init__(self, **options):
        # Keyword-only, defaults from the fields above.
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            hint = "; pass recipe=W8A8Recipe(...) or MixedRecipe(...)" if set(unknown) & set(LEGACY_BUILD_KEYS) else ""
            raise TypeError(f"BuildConfig got unexpected keyword(s) {unknown}{hint}")
        if isinstance(options.get("recipe"), dict):
            options["recipe"] = recipe_from_dict(options["recipe"])
        for name in names:
            value = options.get(name)
            object.__setattr__(self, name, default(type(self), name) if value is None else value)
        self.__post_init__()

    def __post_init__(self):
        _check_seed(self.seed)
        _check(isinstance(self.recipe, tuple(RECIPES.values())),
               f"recipe must be a W8A8Recipe or MixedRecipe, got {type(self.recipe).__name__}")
        _check(self.profile in PROFILES, f"profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        _check(self.eval_samples >= 0, f"eval_samples must be >= 0, got {self.eval_samples}")
        _check(self.correction_size >= 1, f"correction_size must be >= 1, got {self.correction_size}")
        _check(self.null_class is None or (isinstance(self.null_class, int) and self.null_class >= 0),
               f"null_class must be a class label >= 0, got {self.null_class!r}")
        _check(self.decoder in ("fp32", "w8a8"), f"decoder must be 'fp32' or 'w8a8', got {self.decoder!r}")
        _check(self.text_encoder in ("fp32", "int8"), f"text_encoder must be 'fp32' or 'int8', got {self.text_encoder!r}")
        ExportConfig(clip_skip=self.clip_skip)  # its check
        _check(isinstance(self.shared_engine, bool), f"shared_engine must be True or False, got {self.shared_engine!r}")
        _check(not self.shared_engine or PROFILES[self.profile].scalar_group_inputs,
               f"shared_engine (--shared-engine) applies to --target "
               f"{' and '.join(p.name for p in PROFILES.values() if p.scalar_group_inputs)}; {self.profile} "
               f"{'compiles scales into its engines' if PROFILES[self.profile].scales_in_engines else 'runs every group on one engine already'}")
        _check(not (self.shared_engine and self.max_engines), "shared_engine runs every group on one engine: "
               "max_engines does not apply")
        known = sorted({x for p in PROFILES.values() for x in p.float_precisions})
        _check(self.float_precision in known, f"float_precision must be one of {known}, got {self.float_precision!r}")
        _check(self.ray is None or (isinstance(self.ray, str) and self.ray.strip() != ""),
               f"ray must be a Ray cluster address, 'auto' or 'local' (or None), got {self.ray!r}")
        _check(self.ray_workers is None or (isinstance(self.ray_workers, int) and self.ray_workers >= 1),
               f"ray_workers must be >= 1, got {self.ray_workers!r}")
        _check(self.float_precision in PROFILES[self.profile].float_precisions,
               f"float_precision (--float-precision) {self.float_precision} applies to --target "
               f"{' and '.join(p.name for p in PROFILES.values() if self.float_precision in p.float_precisions)}; "
               f"{self.profile} runs its float layers in {'fp16' if PROFILES[self.profile].float16 else 'fp32'}")
        _check(isinstance(self.constant_conv_params, bool) or self.constant_conv_params == "auto",
               f"constant_conv_params must be True, False or 'auto', got {self.constant_conv_params!r}")
        _check(self.speed_check in (True, False, "auto"),
               f"speed_check must be True, False or 'auto', got {self.speed_check!r}")
        _check(self.decoder_calib_size >= 1, f"decoder_calib_size must be >= 1, got {self.decoder_calib_size}")
        _check(self.max_engines is None or (isinstance(self.max_engines, int) and self.max_engines >= 1),
               f"max_engines must be an integer >= 1, got {self.max_engines!r}")
        _check(isinstance(self.residual_int8, bool), f"residual_int8 must be True or False, got {self.residual_int8!r}")
        _check(self.residual_int8 or PROFILES[self.profile].quantize_residual_skip,
               f"residual_int8=False (--no-residual-int8) applies to --target tensorrt; {self.profile} quantizes no "
               "residual input")
        _check(self.max_engines is None or PROFILES[self.profile].scales_in_engines,
               f"max_engines applies to --target {' and '.join(p.name for p in PROFILES.values() if p.scales_in_engines)}"
               f" (one engine per group); {self.profile} already runs every timestep group on one engine")

    @property
    def format(self) -> str:
        """The recipe's name: ``w8a8`` or ``mixed``."""
        return self.recipe.name

    @property
    def overrides(self) -> tuple[Override, ...]:
        return self.recipe.overrides

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["recipe"] = self.recipe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        """Schema 2, or schema 1 (flat format / float_layers / budget / ...) translated."""
        d = dict(d)
        version = d.pop("schema_version", cls.SCHEMA_VERSION)
        _check(version in (1, cls.SCHEMA_VERSION),
               f"BuildConfig schema_version {version} is not supported (reads 1 and {cls.SCHEMA_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)} | (set(LEGACY_BUILD_KEYS) if version == 1 else set())
        unknown = sorted(set(d) - known)
        _check(not unknown, f"BuildConfig has no option(s) {unknown}; known: {sorted(known)}")
        if version == 1:
            d["recipe"] = _legacy_recipe({k: d.pop(k) for k in LEGACY_BUILD_KEYS if k in d})
        for name, sub in (("calibration", CalibrationConfig), ("analysis", AnalysisConfig)):
            if isinstance(d.get(name), dict):
                d[name] = sub.from_dict(d[name])
        return cls(**d)
