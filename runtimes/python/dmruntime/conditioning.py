"""Conditioning inputs of a UNet beyond (sample, timestep): class labels and cross-attention
embeddings, their validation, the null condition of classifier-free guidance, and default
(random) conditions for calibration.

A bundle's manifest describes them::

    "conditioning": {"inputs": [{"name": "class_labels", "dtype": "int64", "shape": [null]},
                                {"name": "encoder_hidden_states", "dtype": "float32",
                                 "shape": [null, null, 768]}],
                     "num_classes": 10 | null, "sequence_length": 77 | null,
                     "null": {"file": "null_condition.npz"} | null}

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
        null = None
        if c.get("null"):
            null = _load_npz(Path(root) / c["null"]["file"]) if root is not None else None
        return cls(inputs, c.get("num_classes"), c.get("sequence_length"), null)

    def to_manifest(self, null_file: str | None) -> dict:
        return {"inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs],
                "num_classes": self.num_classes, "sequence_length": self.sequence_length,
                "null": {"file": null_file} if null_file else None}

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
            a = a.astype(np.int64)
            if self.num_classes is not None and spec.name == "class_labels" and a.size and (
                    a.min() < 0 or a.max() >= self.num_classes):
                raise InputError(f"class labels must be in [0, {self.num_classes}), got [{a.min()}, {a.max()}]")
        else:
            if not np.issubdtype(a.dtype, np.floating):
                raise InputError(f"{spec.name} must be float32, got {a.dtype}")
            a = a.astype(np.float32)
        return np.ascontiguousarray(a)

    def _describe(self, spec: CondInput) -> str:
        dims = ", ".join("B" if i == 0 else ("L" if s is None else str(s)) for i, s in enumerate(spec.shape))
        return f"{spec.dtype} [{dims}]"

    def describe(self) -> list[str]:
        return [f"{i.name} {self._describe(i)}" for i in self.inputs]

    def null_rows(self, n: int) -> dict:
        """The null condition repeated for ``n`` rows; InputError if the bundle has none."""
        if not self.null:
            raise InputError("guidance needs a null (unconditional) condition, and this bundle has none; rebuild "
                             "it with one (--null-class, or null_<input> in --calib-conditions), or sample "
                             "without --guidance")
        return {k: np.repeat(np.asarray(v)[None], n, axis=0) for k, v in self.null.items()}

    def random(self, n: int, rng: np.random.Generator) -> dict:
        """Default calibration conditions: class labels uniform over the classes (the null
        class excluded), embeddings standard normal of the reference sequence length."""
        out = {}
        for spec in self.inputs:
            if spec.dtype == "int64":
                hi = self.num_classes or 1
                null = None if not self.null else self.null.get(spec.name)
                labels = [c for c in range(hi) if null is None or c != int(null)] or [0]
                out[spec.name] = rng.choice(np.array(labels, np.int64), size=n)
            else:
                out[spec.name] = rng.standard_normal((n, *spec.row_shape(self.sequence_length)), dtype=np.float32)
        return out

    def dummy(self, n: int) -> dict:
        """Zeros of the right shapes and dtypes for ``n`` rows (shape probing)."""
        return {s.name: np.zeros((n, *s.row_shape(self.sequence_length)), np.dtype(s.dtype)) for s in self.inputs}


def take_rows(cond: dict | None, rows: slice | np.ndarray) -> dict | None:
    """The same rows of every conditioning array."""
    return None if cond is None else {k: v[rows] for k, v in cond.items()}


def concat_rows(a: dict, b: dict) -> dict:
    """Conditions of ``a``'s rows followed by ``b``'s."""
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"cannot read {Path(path).name}: {e}; the file is corrupt, rebuild the bundle") from e
