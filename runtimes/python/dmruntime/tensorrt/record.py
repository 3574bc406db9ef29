"""What the engine build writes next to a bundle (``tensorrt/engines.json``) and what the runtime
checks before it touches a GPU: plans per engine, batch profiles, the I/O shapes of each call.
Pure Python and numpy: everything here is tested without TensorRT."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError

PLANS_FOLDER = "tensorrt"
ENGINES_RECORD = "engines.json"
RECORD_SCHEMA_VERSION = 1
RECORD_KIND = "dmruntime-tensorrt-engines"


class TensorRTUnavailable(BundleError):
    """TensorRT, CUDA or a GPU is missing, or the engines are not built for this machine."""


def manifest_entry(manifest: dict) -> dict:
    """The manifest's ``engine.tensorrt`` entry, checked; raises BundleError naming what is wrong."""
    engine = manifest.get("engine") or {}
    entry = engine.get("tensorrt")
    if engine.get("runtime") != "tensorrt" or not isinstance(entry, dict):
        raise BundleError("not a TensorRT bundle (manifest engine.runtime is not 'tensorrt'); build it with "
                          "dmcompile build --target tensorrt")
    sizes = entry.get("batch_sizes")
    if not (isinstance(sizes, list) and sizes and all(isinstance(b, int) and b >= 1 for b in sizes)):
        raise BundleError(f"manifest engine.tensorrt.batch_sizes must be a non-empty list of batch sizes >= 1, "
                          f"got {sizes!r}; rebuild the bundle")
    onnx_files = entry.get("onnx")
    if not (isinstance(onnx_files, list) and onnx_files):
        raise BundleError("manifest engine.tensorrt.onnx must list the engines' ONNX files; rebuild the bundle")
    missing = [f for f in onnx_files if f not in manifest.get("files", {})]
    if missing:
        raise BundleError(f"manifest engine.tensorrt.onnx names {missing[0]}, which 'files' does not list")
    return entry


def plan_name(onnx_file: str) -> str:
    return f"{PLANS_FOLDER}/{Path(onnx_file).stem}.plan"


def profile_for(batch: int, sizes: list[int] | tuple[int, ...]) -> int:
    """The smallest engine batch size that holds ``batch`` rows (a call is padded up to it).
    Raises InputError when the batch is larger than every profile the engines were built for."""
    fit = [b for b in sorted(sizes) if b >= batch]
    if not fit:
        raise InputError(f"batch of {batch} is larger than the engines' largest batch size {max(sizes)}; "
                         f"split the batch, or rebuild the engines with python -m dmruntime.tensorrt.build BUNDLE "
                         f"--batch-sizes ... {batch}")
    return fit[0]


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output at one batch size: name, numpy dtype, full shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def io_specs(sample_shape, conditioning, batch: int) -> tuple[list[TensorSpec], TensorSpec]:
    """The inputs (sample, timestep, conditioning) and the output ``eps`` of one engine call at
    ``batch`` rows: static shapes, as the engine's optimization profile and its CUDA graph fix
    them."""
    inputs = [TensorSpec("sample", "float32", (batch, *map(int, sample_shape))),
              TensorSpec("timestep", "int64", (batch,))]
    for c in conditioning.inputs if conditioning else ():
        inputs.append(TensorSpec(c.name, c.dtype, (batch, *c.row_shape(conditioning.sequence_length))))
    return inputs, TensorSpec("eps", "float32", (batch, *map(int, sample_shape)))


def read_record(root: Path) -> dict:
    """The engine build's record, checked; TensorRTUnavailable when the engines are not built."""
    path = Path(root) / PLANS_FOLDER / ENGINES_RECORD
    if not path.is_file():
        raise TensorRTUnavailable(f"{root} has no TensorRT engines yet ({PLANS_FOLDER}/{ENGINES_RECORD} is missing): "
                                  f"build them on this GPU machine with python -m dmruntime.tensorrt.build {root} "
                                  "(or open the bundle with device='cpu' to run its ONNX on ONNX Runtime)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); build the engines again") from None
    if record.get("kind") != RECORD_KIND or record.get("schema_version") != RECORD_SCHEMA_VERSION:
        raise BundleError(f"{path} is not an engine record this dmruntime reads (kind {record.get('kind')!r}, "
                          f"schema_version {record.get('schema_version')!r}); build the engines again")
    return record


def check_record(record: dict, entry: dict, manifest_sha: str, device: dict, tensorrt_version: str) -> None:
    """Raise TensorRTUnavailable unless the record's engines were built from this bundle, on this
    GPU model, with this TensorRT (serialized engines are not portable across either)."""
    if record.get("manifest_sha256") != manifest_sha:
        raise TensorRTUnavailable("the TensorRT engines were built for another version of this bundle's manifest; "
                                  "build them again (python -m dmruntime.tensorrt.build BUNDLE)")
    if set(record.get("plans", {})) != set(entry["onnx"]):
        raise TensorRTUnavailable(f"the engine record lists plans for {sorted(record.get('plans', {}))}, the bundle "
                                  f"has engines {entry['onnx']}; build the engines again")
    if record.get("tensorrt_version") != tensorrt_version:
        raise TensorRTUnavailable(f"the engines were built with TensorRT {record.get('tensorrt_version')}, this is "
                                  f"{tensorrt_version}; serialized engines only load in the version that built them: "
                                  "build them again here")
    built_on = record.get("device") or {}
    if built_on.get("compute_capability") != device.get("compute_capability"):
        raise TensorRTUnavailable(f"the engines were built on {built_on.get('name')} (compute capability "
                                  f"{built_on.get('compute_capability')}), this GPU is {device.get('name')} "
                                  f"({device.get('compute_capability')}); build them again on this machine")
