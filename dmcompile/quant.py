"""Quantization arithmetic, defined once: affine activation grids, symmetric per-channel
weight quantization, the weight's channel axis, and the storage containers of low-bit
weights (defined by dmruntime, which must read what the compiler writes).

Nothing here knows graphs, calibration or backends; every stage that quantizes calls this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dmruntime.weights import encode, pack_int4, storage_bits, unpack_int4

__all__ = ["FLOAT_BITS", "MAX_WEIGHT_BITS", "MIN_WEIGHT_BITS", "QuantWeight", "dequantize", "encode", "fake_quant", "merge_ranges", "noise_power",
           "pack_int4", "qparams", "quantize_weight", "storage_bits", "unpack_int4", "weight_axis"]

# Weights live in int8 containers (4-bit ones packed two per byte on disk): 2..8 bits.
MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 8
FLOAT_BITS = 32  # a plan's width for a layer kept in float in a group: float32 weights and activations


def qparams(lo: float, hi: float, bits: int = 8, *, symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero_point) of an affine grid over [lo, hi]: unsigned [0, 2^b - 1] when
    asymmetric, signed [-(2^(b-1) - 1), 2^(b-1) - 1] with zero point 0 when symmetric."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return max(-lo, hi) / qmax, 0
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    zp = int(np.clip(np.round(-lo / scale), 0, qmax))
    return scale, zp


def pinned_zero_point(ranges: list[tuple[float, float]], bits: int = 8) -> int:
    """One unsigned zero point for a tensor whose groups have the ``ranges`` [(lo, hi), ...]: the Z
    that minimises the sum over groups of log(scale), each group's scale being the smallest that
    fits its range around Z (see :func:`qparams_at`). A per-group engine whose Conv input zero
    points are constants runs ONNX Runtime's symmetric int8 convolution (backends/onnxruntime.py)."""
    qmax = 2**bits - 1
    lo = np.minimum([r[0] for r in ranges], 0.0)
    hi = np.maximum([r[1] for r in ranges], 0.0)
    costs = [np.sum(np.log([qparams_at(a, b, z, bits) for a, b in zip(lo, hi)])) for z in range(qmax + 1)]
    return int(np.argmin(costs))


def qparams_at(lo: float, hi: float, zero_point: int, bits: int = 8) -> float:
    """The smallest scale whose unsigned grid with ``zero_point`` holds [lo, hi] (and zero): a
    range on one side of zero only fits a zero point at that end (else the scale is infinite)."""
    qmax = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    below = -lo / zero_point if zero_point > 0 else (0.0 if lo == 0 else np.inf)
    above = hi / (qmax - zero_point) if zero_point < qmax else (0.0 if hi == 0 else np.inf)
    return float(max(below, above, 1e-12))


def fake_quant(x: np.ndarray, lo: float, hi: float, bits: int = 8, *, symmetric: bool = False) -> np.ndarray:
    """Quantize-dequantize ``x`` on the grid of ``qparams(lo, hi)``."""
    scale, zp = qparams(lo, hi, bits, symmetric=symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(np.round(x / scale), -qmax, qmax) * scale
    q = np.clip(np.round(x / scale) + zp, 0, 2**bits - 1)
    return (q - zp) * scale


@dataclass(frozen=True)
class QuantWeight:
    """An int8 array on a ``bits``-bit grid with symmetric per-channel scales along ``axis``."""

    q: np.ndarray
    scale: np.ndarray
    axis: int
    bits: int


def weight_axis(op_type) -> int:
    """Output-channel axis of a weight as the exported graph stores it: MatMul weights are
    [in, out], Conv and Gemm (transB) weights [out, ...]. Takes an op type or a layer."""
    op = getattr(op_type, "op_type", op_type)
    return 1 if op == "MatMul" else 0


def quantize_weight(w: np.ndarray, axis: int, bits: int = 8) -> QuantWeight:
    """Symmetric per-channel quantization: scale_c = max|w_c| / (2^(b-1) - 1), values in
    [-(2^(b-1) - 1), 2^(b-1) - 1]. ``bits`` must be in [2, 8]: wider grids do not fit int8."""
    if not (isinstance(bits, (int, np.integer)) and MIN_WEIGHT_BITS <= bits <= MAX_WEIGHT_BITS):
        raise ValueError(f"weight bits must be an integer in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}], got {bits!r}")
    qmax = 2 ** (int(bits) - 1) - 1
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return QuantWeight(q, scale, axis, int(bits))


def dequantize(qw: QuantWeight) -> np.ndarray:
    """The float32 weight a QuantWeight stands for."""
    shape = [1] * qw.q.ndim
    shape[qw.axis] = -1
    return (qw.q.astype(np.float32) * qw.scale.reshape(shape)).astype(np.float32)


def noise_power(w: np.ndarray, axis: int, bits: int) -> float:
    """Mean squared error of quantizing a weight to ``bits`` (per-channel symmetric)."""
    return float(np.mean((w - dequantize(quantize_weight(w, axis, bits))) ** 2))


def merge_ranges(ranges: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """The union of several groups' ranges, per tensor: what every member group's values fit in
    (one engine serving several groups, ``--max-engines``)."""
    return {n: (min(r[n][0] for r in ranges), max(r[n][1] for r in ranges)) for n in ranges[0]}
