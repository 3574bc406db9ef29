"""The manifest as a schema: the types, ranges and required keys of every manifest entry the
runtime reads, per schema version, checked once when a bundle is opened.

A spec is a small object with ``check(value, path)`` that raises :class:`BundleError` naming the
entry (``groups[0].t_end``), what it must be and what it holds. Keys the runtime does not read
(the build record, the precision table) are free-form objects, so a newer compiler may add to
them; a key the runtime reads is checked here before anything uses it. Engine runtimes and bundle
components add the schema of their own entry (``EngineRuntime.schema``, ``Component.schema``).
"""

from __future__ import annotations

import math

from .errors import BundleError

HINT = "rebuild the bundle (or undo the edit to manifest.json)"


def at(path: str, key) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


class SchemaError(ValueError):
    """A value that does not match its spec: ``path`` (``groups[0].t_end``) and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = path, reason


def fail(path: str, what: str, value) -> None:
    shown = repr(value)
    raise SchemaError(path, f"must be {what}, got {shown[:60] + '...' if len(shown) > 60 else shown}")


class Spec:
    what = "a value"

    def check(self, value, path: str) -> None:
        raise NotImplementedError


class Int(Spec):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        lo_s = "" if lo is None else f" >= {lo}"
        hi_s = "" if hi is None else f" <= {hi}"
        self.what = f"an integer{lo_s}{' and' if lo_s and hi_s else ''}{hi_s}"

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int) or \
                (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            fail(path, self.what, value)


class Num(Spec):
    """A finite number in [lo, hi] (``open_lo``: lo itself excluded)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, open_lo: bool = False):
        self.lo, self.hi, self.open_lo = lo, hi, open_lo
        bounds = [f"> {lo}" if open_lo else f">= {lo}"] if lo is not None else []
        bounds += [f"<= {hi}"] if hi is not None else []
        self.what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def check(self, value, path):
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.open_lo else value >= self.lo
        if ok and self.hi is not None:
            ok = value <= self.hi
        if not ok:
            fail(path, self.what, value)


class Bool(Spec):
    what = "true or false"

    def check(self, value, path):
        if not isinstance(value, bool):
            fail(path, self.what, value)


class Str(Spec):
    def __init__(self, choices: tuple[str, ...] | None = None, pattern=None, what: str | None = None):
        self.choices, self.pattern = choices, pattern
        self.what = what or (f"one of {', '.join(map(repr, choices))}" if choices else "a non-empty string")

    def check(self, value, path):
        if not isinstance(value, str) or not value or (self.choices and value not in self.choices) or \
                (self.pattern and not self.pattern(value)):
            fail(path, self.what, value)


class Const(Spec):
    def __init__(self, value):
        self.value = value
        self.what = repr(value)

    def check(self, value, path):
        if value != self.value or type(value) is not type(self.value):
            fail(path, self.what, value)


class Choice(Spec):
    """One of a few values (of their exact type: True is not 1)."""

    def __init__(self, *values):
        self.values = values
        self.what = " or ".join(map(repr, values))

    def check(self, value, path):
        if not any(value == v and type(value) is type(v) for v in self.values):
            fail(path, self.what, value)


class Opt(Spec):
    """``spec`` or null."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.what = f"{spec.what} or null"

    def check(self, value, path):
        if value is not None:
            self.spec.check(value, path)


class List(Spec):
    def __init__(self, item: Spec, min_len: int = 0, max_len: int | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len
        size = f" of {min_len} to {max_len}" if max_len is not None else (" non-empty" if min_len else "")
        self.what = f"a{size} list" + ("" if max_len is None else " items")

    def check(self, value, path):
        if not isinstance(value, list) or len(value) < self.min_len or \
                (self.max_len is not None and len(value) > self.max_len):
            fail(path, self.what, value)
        for i, v in enumerate(value):
            self.item.check(v, at(path, i))


class Map(Spec):
    """An object with any keys (non-empty strings) and values of one spec."""

    def __init__(self, value: Spec, min_len: int = 0):
        self.value, self.min_len = value, min_len
        self.what = "a non-empty object" if min_len else "an object"

    def check(self, value, path):
        if not isinstance(value, dict) or len(value) < self.min_len:
            fail(path, self.what, value)
        for k, v in value.items():
            if not k:
                fail(path, "an object with non-empty keys", value)
            self.value.check(v, at(path, k))


class Obj(Spec):
    """An object with required and optional keys; other keys are allowed (newer compilers may
    record more) and not read."""

    what = "an object"

    def __init__(self, required: dict[str, Spec] | None = None, optional: dict[str, Spec] | None = None):
        self.required, self.optional = dict(required or {}), dict(optional or {})

    def check(self, value, path):
        if not isinstance(value, dict):
            fail(path, self.what, value)
        for key, spec in self.required.items():
            if key not in value:
                raise SchemaError(at(path, key), "is missing (a required key)")
            spec.check(value[key], at(path, key))
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], at(path, key))


def is_sha256(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def is_relative_file(s: str) -> bool:
    """A relative path inside the bundle, spelt without '..' or a leading '/'."""
    return not s.startswith(("/", "\\")) and ".." not in s.replace("\\", "/").split("/") and "\x00" not in s


FILE = Str(pattern=is_relative_file, what="a relative file name inside the bundle")
DIM = Int(1, 1 << 20)

SCHEDULER = Obj(optional={
    "num_train_timesteps": Int(2, 100_000),
    "beta_start": Num(0, 1), "beta_end": Num(0, 1),
    "beta_schedule": Str(("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": Opt(List(Num(0, 1), min_len=2)),
    "clip_sample": Bool(), "clip_sample_range": Num(0, open_lo=True),
    "set_alpha_to_one": Bool(), "steps_offset": Int(0, 100_000),
    "prediction_type": Str(("epsilon", "v_prediction", "sample")),
    "timestep_spacing": Str(("leading", "trailing", "linspace")),
    "thresholding": Bool(),
    "_class_name": Str(),  # the diffusers class, which picks the default sampler
})

CONDITIONING = Obj(required={
    "inputs": List(Obj(required={"name": Str(), "dtype": Str(("int64", "float32")),
                                 "shape": List(Opt(DIM), min_len=1, max_len=8)}), min_len=1),
}, optional={
    "num_classes": Opt(DIM), "sequence_length": Opt(DIM),
    "null": Opt(Obj(required={"file": FILE})), "class_table": Opt(Obj(required={"file": FILE})),
    "calibration_guidance_scale": Opt(Num(0)),
    "defaults": Opt(Map(List(Num(), min_len=1))),
})

CORRECTION = Obj(required={"groups": List(Obj(required={
    "index": Int(0), "k": Num(-1, open_lo=True),
    "bias": List(Num(), min_len=1), "var": List(Num(0), min_len=1)}))})

WEIGHTS = Obj(required={"file": FILE, "tensors": Map(Obj(required={
    "shape": List(Int(0, 1 << 31), max_len=8), "storage_bits": Choice(4, 8)}, optional={"grid_bits": Int(2, 8)}))})

ENGINE = Obj(optional={"runtime": Str(), "file": Opt(FILE), "group_inputs": List(Str()),
                       "onnxruntime_version": Opt(Str()), "inference_precision": Opt(Str())})

MANIFEST_V1 = Obj(required={
    "schema_version": Const(1),
    "kind": Const("dmcompile-bundle"),
    "model": Obj(required={"sample_shape": List(DIM, min_len=1, max_len=6)}),
    "scheduler": SCHEDULER,
    "groups": List(Obj(required={"index": Int(0), "t_start": Int(0), "t_end": Int(1), "engine": FILE},
                       optional={"inputs": Opt(FILE)}), min_len=1),
    "files": Map(Obj(required={"bytes": Int(0), "sha256": Str(pattern=is_sha256, what="a sha256 hex digest")}),
                 min_len=1),
}, optional={
    "engine": Opt(ENGINE),
    "engines": Opt(Map(Obj(optional={"external_weights": Map(Str())}))),
    "weights": Opt(WEIGHTS),
    "conditioning": Opt(CONDITIONING),
    "correction": Opt(CORRECTION),
    # the sampler the bundle was calibrated with, which sampling runs default to
    "sampler": Opt(Obj(required={"name": Str(), "steps": Int(1, 100_000)}, optional={"karras": Bool()})),
    # written by the compiler for people and tools; the runtime reads none of them
    **{key: Opt(Obj()) for key in ("precision", "calibration", "build", "plan", "memory")},
})

SCHEMAS = {1: MANIFEST_V1}


def check_manifest(manifest) -> None:
    """Raise BundleError unless ``manifest`` matches the schema of its ``schema_version``."""
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest.json must hold a JSON object, got {type(manifest).__name__}; {HINT}")
    # schema_version first: a newer bundle gets "upgrade dmruntime", not a complaint about its keys
    version = manifest.get("schema_version")
    schema = SCHEMAS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if schema is None:
        raise BundleError(f"manifest schema_version {version!r} is not supported by this dmruntime "
                          f"(supports {sorted(SCHEMAS)}); upgrade dmruntime or rebuild the bundle")
    check_entry(schema, manifest, "")


def check_entry(spec: Spec, value, path: str) -> None:
    """``spec.check`` with a SchemaError turned into the BundleError a bad manifest raises."""
    try:
        spec.check(value, path)
    except SchemaError as e:
        raise BundleError(f"manifest {e}; {HINT}") from None
