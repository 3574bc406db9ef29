"""Low-bit weight storage: 4-bit values packed two per byte on disk, expanded at load time
into int8 arrays holding the 4-bit grid, which ONNX Runtime's int8 kernels run as they are.

A bundle lists its stored weights in the manifest::

    "weights": {"file": "weights.npz",
                "tensors": {KEY: {"shape": [...], "storage_bits": 4 | 8, "grid_bits": b}}}

and each engine names the initializers it takes from there::

    "engines": {"unet.onnx": {"external_weights": {INITIALIZER: KEY}}}

Those initializers are marked as external data in the ONNX file (no bytes there) and handed to
the session from memory, so one expanded copy serves every engine that uses it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import BundleError


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed values in [-8, 7] -> uint8, two per byte (element 2i in the low nibble)."""
    flat = np.asarray(q).ravel().astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"values outside the 4-bit range [-8, 7]: [{flat.min()}, {flat.max()}]")
    nib = (flat & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 array of ``shape``."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    p = np.asarray(packed, np.uint8).ravel()
    if p.size != (n + 1) // 2:
        raise ValueError(f"packed 4-bit tensor has {p.size} bytes, shape {list(shape)} needs {(n + 1) // 2}")
    out = np.empty(p.size * 2, np.int8)
    out[0::2] = (p & 0x0F).astype(np.int8)
    out[1::2] = (p >> 4).astype(np.int8)
    out = np.where(out > 7, out - 16, out).astype(np.int8)  # sign-extend the nibbles
    return out[:n].reshape(shape)


def storage_bits(grid_bits: int) -> int:
    """The container a grid is stored in: 4-bit nibbles for <= 4 bits, int8 otherwise."""
    return 4 if grid_bits <= 4 else 8


def encode(q: np.ndarray, grid_bits: int) -> tuple[np.ndarray, dict]:
    """(stored array, manifest entry) for an int8 tensor on a ``grid_bits`` grid."""
    sb = storage_bits(grid_bits)
    data = pack_int4(q) if sb == 4 else np.ascontiguousarray(q, np.int8)
    return data, {"shape": [int(s) for s in q.shape], "storage_bits": sb, "grid_bits": int(grid_bits)}


def load_weights(root: Path, spec: dict) -> dict[str, np.ndarray]:
    """Every stored tensor of a bundle, expanded to int8. Raises BundleError on a bad file."""
    name = spec.get("file")
    tensors = spec.get("tensors") or {}
    try:
        with np.load(Path(root) / name, allow_pickle=False) as data:
            out = {}
            for key, t in tensors.items():
                if key not in data.files:
                    raise BundleError(f"{name} lacks weight {key!r} listed in the manifest; rebuild the bundle")
                raw = data[key]
                if t["storage_bits"] == 4:
                    out[key] = unpack_int4(raw, t["shape"])
                elif t["storage_bits"] == 8 and raw.dtype == np.int8 and list(raw.shape) == list(t["shape"]):
                    out[key] = raw
                else:
                    raise BundleError(f"weight {key!r} in {name} has dtype {raw.dtype} shape {list(raw.shape)}, "
                                      f"not what the manifest says ({t}); rebuild the bundle")
            return out
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise BundleError(f"cannot read weights {name}: {e}; the file is corrupt, rebuild the bundle") from e
