"""Conditioning inputs of a UNet beyond (sample, timestep): class labels and cross-attention
embeddings, their validation, the null condition of classifier-free guidance, and default
(random) conditions for calibration.

A bundle's manifest describes them::

    "conditioning": {"inputs": [{"name": "class_labels", "dtype": "int64", "shape": [null]},
                                {"name": "encoder_hidden_states", "dtype": "float32",
                                 "shape": [null, null, 768]}],
                     "num_classes": 10 | null, "sequence_length": 77 | null,
                     "null": {"file": "null_condition.npz"} | null,
                     "class_table": {"file": "class_table.npz"} | null,
                     "defaults": {"time_ids": [1024, 1024, 0, 0, 1024, 1024]}}   # optional

``defaults`` holds inputs the pipeline derives rather than the user gives (SDXL's ``time_ids``
from the image size): one row each, used wherever the input is not given (conditions, the null
condition, calibration).

A class table ([K, L, D], one embedding per class) lets a cross-attention model be asked for a
class: ``{"class_labels": [3, 1]}`` becomes ``{"encoder_hidden_states": table[[3, 1]]}``.

Conditions are dicts of arrays keyed by input name with one row per sample; one row (batch
axis 1) is repeated for every sample, and class labels may also be one scalar.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, InputError

COND_STREAM = 0xC0D  # default calibration conditions: a random stream of their own
NULL_FILE = "null_condition.npz"
TABLE_FILE = "class_table.npz"


@dataclass(frozen=True)
class CondInput:
    """One conditioning input: name, dtype and shape (None: the batch or a free axis)."""

    name: str
    dtype: str
    shape: tuple

    def row_shape(self, sequence_length: int | None) -> tuple[int, ...]:
        return tuple((sequence_length or 1) if s is None else int(s) for s in self.shape[1:])


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of a model; ``Conditioning.none()`` for an unconditional one."""

    inputs: tuple[CondInput, ...] = ()
    num_classes: int | None = None
    sequence_length: int | None = None
    null: dict | None = None  # input name -> one row (no batch axis): the guidance's null condition
    class_table: np.ndarray | None = None  # [K, L, D] embeddings of K classes, for the one float input
    defaults: dict | None = None  # input name -> one row, used where that input is not given

    @classmethod
    def none(cls) -> Conditioning:
        return cls()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def __bool__(self) -> bool:
        return bool(self.inputs)

    @classmethod
    def from_manifest(cls, manifest: dict, root: Path | None = None) -> Conditioning:
        """Read the manifest's "conditioning" entry (and its null-condition file)."""
        c = manifest.get("conditioning")
        if not c:
            return cls()
        try:
            inputs = tuple(CondInput(i["name"], i["dtype"], tuple(i["shape"])) for i in c["inputs"])
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest conditioning is malformed ({e}); rebuild the bundle") from None
        null = table = None
        defaults = {}
        for name, row in (c.get("defaults") or {}).items():
            spec = next((i for i in inputs if i.name == name), None)
            if spec is None:
                raise BundleError(f"manifest conditioning defaults name {name!r}, which is not an input; rebuild the "
                                  "bundle")
            defaults[name] = np.asarray(row, np.dtype(spec.dtype))
        if c.get("null") and root is not None:
            null = _load_npz(Path(root) / c["null"]["file"])
        if c.get("class_table") and root is not None:
            table = _load_npz(Path(root) / c["class_table"]["file"]).get("class_table")
        return cls(inputs, c.get("num_classes"), c.get("sequence_length"), null, table, defaults or None)

    def to_manifest(self, null_file: str | None, table_file: str | None = None) -> dict:
        out = {"inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs],
               "num_classes": self.num_classes, "sequence_length": self.sequence_length,
               "null": {"file": null_file} if null_file else None,
               "class_table": {"file": table_file} if table_file else None}
        if self.defaults:
            out["defaults"] = {k: np.asarray(v).tolist() for k, v in self.defaults.items()}
        return out

    def with_defaults(self, cond: dict, n: int) -> dict:
        """``cond`` with every input it lacks that has a default, repeated for ``n`` rows."""
        missing = {k: v for k, v in (self.defaults or {}).items() if k not in cond}
        return {**cond, **{k: np.repeat(np.asarray(v)[None], n, axis=0) for k, v in missing.items()}}

    @property
    def embedded_classes(self) -> bool:
        """Whether class labels are looked up in a class table (no class_labels input)."""
        return self.class_table is not None and "class_labels" not in self.names

    def _from_classes(self, cond: dict) -> dict:
        """{"class_labels": ...} -> the class table's embeddings for the float input."""
        labels = np.asarray(cond["class_labels"])
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"class_labels must hold integers, got {labels.dtype}")
        k = len(self.class_table)
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise InputError(f"class labels must be in [0, {k}), got [{labels.min()}, {labels.max()}]")
        name = next(i.name for i in self.inputs if i.dtype != "int64")
        rows = self.class_table[labels.astype(np.int64)]
        return {**{k_: v for k_, v in cond.items() if k_ != "class_labels"}, name: rows}

    def check(self, cond: dict | None, n: int) -> dict:
        """Validated conditions for ``n`` rows (single rows repeated). Raises InputError with
        what is wrong: a missing or unknown input, a wrong dtype or shape, a class out of range."""
        if not self.inputs:
            if cond:
                raise InputError(f"this model is unconditional; it takes no {sorted(cond)}")
            return {}
        if cond is None:
            raise InputError(f"this model needs conditioning: {', '.join(self.describe())}; pass them "
                             "(e.g. class_labels=... or encoder_hidden_states=...)")
        if self.embedded_classes and "class_labels" in cond:
            cond = self._from_classes(cond)
        cond = self.with_defaults(cond, n)
        unknown = sorted(set(cond) - set(self.names))
        if unknown:
            raise InputError(f"unknown conditioning input(s) {unknown}; this model takes {', '.join(self.describe())}")
        out = {}
        for spec in self.inputs:
            if spec.name not in cond:
                raise InputError(f"missing conditioning input {spec.name} ({self._describe(spec)})")
            out[spec.name] = self._check_one(spec, np.asarray(cond[spec.name]), n)
        return out

    def _check_one(self, spec: CondInput, a: np.ndarray, n: int) -> np.ndarray:
        rank = len(spec.shape)
        if a.ndim == 0 and rank == 1:  # one class label for every sample
            a = np.broadcast_to(a, (n,))
        if a.ndim != rank:
            raise InputError(f"{spec.name} must have shape {self._describe(spec)}, got {list(a.shape)} "
                             f"({rank} axes needed, {a.ndim} given)")
        if a.shape[0] == 1 and n > 1:  # one row for every sample
            a = np.broadcast_to(a, (n, *a.shape[1:]))
        if a.shape[0] != n:
            raise InputError(f"{spec.name} has {a.shape[0]} rows for {n} samples; give one row per sample or one "
                             "row (batch axis 1) for all")
        for axis, (want, got) in enumerate(zip(spec.shape[1:], a.shape[1:]), 1):
            if want is not None and int(want) != got:
                raise InputError(f"{spec.name} axis {axis} has size {got}, the model wants {want} "
                                 f"({self._describe(spec)})")
        if spec.dtype == "int64":
            if not np.issubdtype(a.dtype, np.integer):
                raise InputError(f"{spec.name} must hold integers (int64), got {a.dtype}")
            a = a.astype(np.int64, copy=False)  # no copy per call when it already fits (the sampler's hot path)
            if self.num_classes is not None and spec.name == "class_labels" and a.size and (
                    a.min() < 0 or a.max() >= self.num_classes):
                raise InputError(f"class labels must be in [0, {self.num_classes}), got [{a.min()}, {a.max()}]")
        else:
            if not np.issubdtype(a.dtype, np.floating):
                raise InputError(f"{spec.name} must be float32, got {a.dtype}")
            a = a.astype(np.float32, copy=False)
            if not np.isfinite(a).all():
                raise InputError(f"{spec.name} holds NaN or inf values; check the conditions' file or encoder")
        return np.ascontiguousarray(a)

    def _describe(self, spec: CondInput) -> str:
        dims = ", ".join("B" if i == 0 else ("L" if s is None else str(s)) for i, s in enumerate(spec.shape))
        return f"{spec.dtype} [{dims}]"

    def describe(self) -> list[str]:
        defaults = self.defaults or {}
        return [f"{i.name} {self._describe(i)}" + (f" (default {np.asarray(defaults[i.name]).tolist()})"
                                                   if i.name in defaults else "") for i in self.inputs]

    def null_rows(self, n: int) -> dict:
        """The null condition repeated for ``n`` rows; InputError if the bundle has none."""
        if not self.null:
            raise InputError("guidance needs a null (unconditional) condition, and this bundle has none; rebuild "
                             "it with one (--null-class, or null_<input> in --calib-conditions), or sample "
                             "without --guidance")
        return self.with_defaults({k: np.repeat(np.asarray(v)[None], n, axis=0) for k, v in self.null.items()}, n)

    def random(self, n: int, rng: np.random.Generator) -> dict:
        """Default calibration conditions: class labels uniform over the classes (the null
        class excluded), embeddings standard normal of the reference sequence length."""
        if self.embedded_classes:
            return self._from_classes({"class_labels": rng.integers(0, len(self.class_table), n)})
        out = {}
        for spec in self.inputs:
            if spec.name in (self.defaults or {}):
                out[spec.name] = np.repeat(np.asarray(self.defaults[spec.name])[None], n, axis=0)
            elif spec.dtype == "int64":
                hi = self.num_classes or 1
                null = None if not self.null else self.null.get(spec.name)
                labels = [c for c in range(hi) if null is None or c != int(null)] or [0]
                out[spec.name] = rng.choice(np.array(labels, np.int64), size=n)
            else:
                out[spec.name] = rng.standard_normal((n, *spec.row_shape(self.sequence_length)), dtype=np.float32)
        return out

    def dummy(self, n: int) -> dict:
        """Zeros of the right shapes and dtypes for ``n`` rows (shape probing)."""
        zeros = {s.name: np.zeros((n, *s.row_shape(self.sequence_length)), np.dtype(s.dtype)) for s in self.inputs
                 if s.name not in (self.defaults or {})}
        return self.with_defaults(zeros, n)


def read_conditions(path: Path, spec: Conditioning) -> tuple[dict | None, dict | None, np.ndarray | None]:
    """(rows, null condition, class table) from an .npz: arrays named by input (one row per
    sample), ``null_<name>`` (the null condition, no batch axis) and ``class_table`` ([K, L, D]
    embeddings per class). Raises InputError saying what does not fit ``spec``."""
    if not Path(path).is_file():
        raise InputError(f"conditions file {path} does not exist")
    if not zipfile.is_zipfile(path):  # numpy's own message would suggest allow_pickle (unsafe)
        raise InputError(f"conditions file {path} is not an .npz archive; write one with numpy.savez(path, "
                         "encoder_hidden_states=..., ...)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read conditions {path}: {e}; write it with numpy.savez") from None
    known = set(spec.names) | {f"null_{n}" for n in spec.names} | {"class_table"}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise InputError(f"conditions file {path} has array(s) {unknown}; this model takes "
                         f"{', '.join(spec.describe())} (and null_<name>, class_table)")
    rows = {k: v for k, v in arrays.items() if k in spec.names} or None
    null = {k[len("null_"):]: v for k, v in arrays.items() if k.startswith("null_")} or None
    table = arrays.get("class_table")
    if table is not None:
        floats = [i for i in spec.inputs if i.dtype != "int64"]
        if len(floats) != 1:
            raise InputError(f"conditions file {path}: a class_table needs a model with one embedding input")
        spec._check_one(floats[0], table, len(table))  # [K, L, D] like K rows of the input
        table = table.astype(np.float32)
    if rows is not None:
        n = {len(v) if v.ndim else 0 for v in rows.values()}
        if len(n) != 1 or 0 in n:
            raise InputError(f"conditions file {path}: every array needs the same number of rows, got {sorted(n)}")
        rows = spec.check(rows, n.pop())
    if null is not None:
        missing = [i for i in spec.names if i not in null and i not in (spec.defaults or {})]
        if missing:
            raise InputError(f"conditions file {path}: the null condition lacks null_{missing[0]}")
        null = {k: v[0] for k, v in spec.check({k: np.asarray(v)[None] for k, v in null.items()}, 1).items()}
    return rows, null, table


def take_rows(cond: dict | None, rows: slice | np.ndarray) -> dict | None:
    """The same rows of every conditioning array."""
    return None if cond is None else {k: v[rows] for k, v in cond.items()}


def cycle_rows(cond: dict | None, n: int) -> dict | None:
    """``n`` rows taken cyclically from ``cond``."""
    if cond is None:
        return None
    return take_rows(cond, np.arange(n) % len(next(iter(cond.values()))))


def concat_rows(a: dict, b: dict) -> dict:
    """Conditions of ``a``'s rows followed by ``b``'s; an input ``a`` lacks takes ``b``'s rows on both
    sides (guidance: the null branch sees the condition's own time_ids, as diffusers' negative sizes
    default to the positive ones)."""
    return {**{k: np.concatenate([a[k], b[k]]) for k in a}, **{k: np.concatenate([v, v]) for k, v in b.items()
                                                                  if k not in a}}


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"cannot read {Path(path).name}: {e}; the file is corrupt, rebuild the bundle") from e
