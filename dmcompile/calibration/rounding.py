"""Error-compensating weight rounding (GPTQ) on the same grid as ``quant.quantize_weight``.

Round-to-nearest minimises each weight's own error; what matters is the layer's output error
on the inputs it sees, E||x (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) with H = E[x x^T] over the
layer's input columns (im2col rows for a Conv). GPTQ (Frantar et al., 2023) quantizes one input
column at a time and moves each column's rounding error onto the columns not yet quantized,
through the Cholesky factor of the damped inverse of H. The per-output-channel scale is chosen
first by an H-weighted search over clipping ratios. The result is a ``QuantWeight``: same int8
container, same symmetric per-channel grid, so storage and kernels do not change.

:data:`ROUNDING_METHODS` holds the methods the build and the RD curves call (``RoundToNearest``,
``GPTQ``), each rounding every width the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .. import scratch
from ..quant import (MAX_WEIGHT_BITS, MIN_WEIGHT_BITS, QuantWeight, dequantize, noise_power, quantize_weight,
                     weight_axis)

__all__ = ["CLIP_RATIOS", "GPTQ", "ROUNDING_METHODS", "RoundToNearest", "gptq_quantize", "hessian_factor",
           "output_error", "rounding_method", "weight_matrix"]

CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))
GPTQ_VERSION = 2  # in the cache key of rounded weights: bump when gptq_quantize's results change
GPTQ_DAMP = 0.01  # fraction of H's mean diagonal added before inverting (see hessian_factor)


def weight_matrix(w: np.ndarray, axis: int) -> np.ndarray:
    """The weight as [out, in] with ``in`` in im2col order (Conv [O, C, kh, kw] -> [O, C*kh*kw];
    Gemm [O, I] as it is; MatMul [I, O] (axis 1) transposed)."""
    w = np.asarray(w)
    if axis == 0:
        return w.reshape(w.shape[0], -1)
    if axis == 1 and w.ndim == 2:
        return w.T
    raise ValueError(f"no [out, in] view of a weight of shape {w.shape} with channel axis {axis}")


def _from_matrix(m: np.ndarray, shape: tuple, axis: int) -> np.ndarray:
    return m.reshape(shape) if axis == 0 else m.T


def output_error(w: np.ndarray, wq: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Per output channel, tr-row of (W - Q) H (W - Q)^T: the expected squared output error."""
    d = (w - wq).astype(np.float64)
    return ((d @ H) * d).sum(axis=1)  # a BLAS product: einsum's three-operand loop is 600x slower


def _round(W: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.round(W / scale[:, None]), -qmax, qmax)


def _scales(W: np.ndarray, H: np.ndarray, qmax: int, ratios) -> np.ndarray:
    """Per row: the clipping ratio r whose RTN grid (scale r * max|w| / qmax) has the least
    H-weighted error."""
    amax = np.abs(W).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best, best_err = None, None
    for r in ratios:
        s = (r * amax / qmax).astype(np.float64)
        err = output_error(W, _round(W, s, qmax) * s[:, None], H)
        if best is None:
            best, best_err = s, err
        else:
            take = err < best_err
            best, best_err = np.where(take, s, best), np.where(take, err, best_err)
    return best


def hessian_factor(H: np.ndarray, damp: float = GPTQ_DAMP, act_order: bool = True) -> tuple:
    """(H, upper Cholesky factor of the damped H's inverse, column order): what GPTQ needs of H,
    the same at every width (so computed once per layer), both in the order the columns are
    quantized. ``damp``: fraction of H's mean diagonal added to its diagonal before inverting
    (numerical stability; the errors are judged on H itself). ``act_order``: columns with the
    largest input energy first (GPTQ's act-order: their errors still have every other column
    to move to; +1.4 dB on digits16 W4A8). Columns that never see a nonzero input get a unit
    diagonal in the damped H: their errors then move nowhere."""
    H = np.array(H, np.float64)
    n = len(H)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    H = H[np.ix_(order, order)]
    Hd = H.copy()
    dead = np.diag(Hd) <= 0
    Hd[dead, dead] = 1.0
    Hd[np.diag_indices(n)] += damp * float(np.mean(np.diag(Hd)))
    # upper Cholesky factor of Hd^-1: row i holds the compensation weights of column i
    return H, np.linalg.cholesky(np.linalg.inv(Hd)).T, order


def gptq_quantize(w: np.ndarray, axis: int, bits: int, H: np.ndarray | None = None, *, damp: float = GPTQ_DAMP,
                  ratios=CLIP_RATIOS, block: int = 128, factor: tuple | None = None) -> QuantWeight:
    """Quantize ``w`` (channel axis ``axis``) to ``bits`` so that the output error on inputs with
    second moment ``H`` ([in, in], in ``weight_matrix`` column order) is small, not the weight
    error. ``factor``: :func:`hessian_factor` of H, when already computed (then H is not needed).
    Output channels are independent in tr((W - Q) H (W - Q)^T), so each keeps whichever of
    its compensated and its round-to-nearest rows (on the searched scale, which includes
    max|w|) has less error: never worse than round-to-nearest on H."""
    if not (isinstance(bits, (int, np.integer)) and MIN_WEIGHT_BITS <= bits <= MAX_WEIGHT_BITS):
        raise ValueError(f"weight bits must be an integer in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}], got {bits!r}")
    qmax = 2 ** (int(bits) - 1) - 1
    W0 = weight_matrix(w, axis).astype(np.float64)
    n = W0.shape[1]
    Hp, U, order = factor if factor is not None else hessian_factor(H, damp)
    if Hp.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight of shape {np.shape(w)} (axis {axis}), got {Hp.shape}")
    W0 = W0[:, order]
    scale = _scales(W0, Hp, qmax, ratios)
    Q = np.zeros_like(W0)
    W = W0.copy()
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err_block = np.zeros((W.shape[0], b1 - b0))
        for i in range(b0, b1):
            q = np.clip(np.round(W[:, i] / scale), -qmax, qmax)
            Q[:, i] = q
            err = (W[:, i] - q * scale) / U[i, i]
            W[:, i + 1:b1] -= np.outer(err, U[i, i + 1:b1])
            err_block[:, i - b0] = err
        W[:, b1:] -= err_block @ U[b0:b1, b1:]
    R = _round(W0, scale, qmax)
    worse = output_error(W0, Q * scale[:, None], Hp) > output_error(W0, R * scale[:, None], Hp)
    Q[worse] = R[worse]
    out = np.empty_like(Q)
    out[:, order] = Q
    q = _from_matrix(out.astype(np.int8), np.shape(w), axis)
    return QuantWeight(np.ascontiguousarray(q), scale.astype(np.float32), axis, int(bits))


class RoundToNearest:
    """Round to nearest on the symmetric per-channel grid (``quant.quantize_weight``). Every
    method rounds a width past ``max_bits`` to the ``max_bits`` grid (the target's
    ``TargetProfile.weight_grid_bits``)."""

    name = "rtn"
    needs_moments = False

    def __init__(self, max_bits: int = MAX_WEIGHT_BITS):
        self.max_bits = max_bits

    def grid(self, bits: int) -> int:
        return min(int(bits), self.max_bits)

    def quantize(self, layer, w: np.ndarray, bits: int, groups: tuple[int, ...] | None = None) -> QuantWeight:
        """``layer``'s weight ``w`` on the ``bits``-bit grid."""
        return quantize_weight(w, weight_axis(layer), self.grid(bits))

    def error_power(self, layer, w: np.ndarray, bits: int, groups: tuple[int, ...] | None = None) -> float:
        """What the RD model scales with width: the weight-noise power."""
        return noise_power(w, weight_axis(layer), self.grid(bits))

    def key(self) -> list:
        """What cached results of this method depend on besides the weights (none)."""
        return []


class GPTQ(RoundToNearest):
    """:func:`gptq_quantize` on the layer's input second moments (``moments``: a
    ``calibration.hessian.Moments``). ``groups`` selects the moments: None pools every timestep
    group (shared weights), a tuple the groups one engine serves. Results are kept in ``cache``
    (one file per layer, width and scope), so RD curves and the build round each weight once. A
    layer without moments (a grouped Conv) is rounded to nearest."""

    name = "gptq"
    needs_moments = True

    def __init__(self, moments, cache: Path | None = None, damp: float = GPTQ_DAMP, max_bits: int = MAX_WEIGHT_BITS):
        super().__init__(max_bits)
        if moments is None:
            raise ValueError("gptq rounding needs the layer inputs' second moments (a calibration with moments)")
        self.moments, self.cache, self.damp = moments, cache, damp
        self._last = (None, None, None)  # (key, H, factor): the last layer's, reused across its widths

    def key(self) -> list:
        """The method's version and parameters and the moments' identity (the rounded-weights cache key)."""
        return ["gptq", GPTQ_VERSION, self.damp, list(CLIP_RATIOS), self.moments.identity()]

    def _file(self, node: str, bits: int, groups) -> Path | None:
        if self.cache is None:
            return None
        scope = "pooled" if groups is None else "g" + "-".join(str(g) for g in groups)
        return Path(self.cache) / scope / f"{hashlib.sha1(node.encode()).hexdigest()[:16]}-{bits}.npz"

    def _moments(self, node: str, groups) -> tuple:
        """(H, its factor) of a layer, read once however many widths ask (None, None: no moments)."""
        key = (node, groups)
        if self._last[0] != key:
            H = self.moments.matrix(node, groups)
            self._last = (key, H, None if H is None else hessian_factor(H, self.damp))
        return self._last[1:]

    def quantize(self, layer, w: np.ndarray, bits: int, groups: tuple[int, ...] | None = None) -> QuantWeight:
        axis, bits = weight_axis(layer), self.grid(bits)
        path = self._file(layer.node, bits, groups)
        if path is not None and path.is_file():
            try:
                with np.load(path) as f:
                    return QuantWeight(f["q"], f["scale"], axis, int(bits))
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry: round again
        factor = self._moments(layer.node, groups)[1]
        qw = quantize_weight(w, axis, bits) if factor is None else gptq_quantize(w, axis, bits, factor=factor)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = scratch.temp_file(path, ".npz")
            np.savez(tmp, q=qw.q, scale=qw.scale)
            os.replace(tmp, path)
        return qw

    def error_power(self, layer, w: np.ndarray, bits: int, groups: tuple[int, ...] | None = None) -> float:
        """GPTQ's H-weighted output error per output channel (the quantity it minimises)."""
        qw = self.quantize(layer, w, bits, groups)
        H = self._moments(layer.node, groups)[0]
        if H is None:
            return noise_power(w, weight_axis(layer), self.grid(bits))
        axis = weight_axis(layer)
        return float(np.mean(output_error(weight_matrix(w, axis), weight_matrix(dequantize(qw), axis), H)))


# name -> method; config.ROUNDINGS lists these names for the CLI (a test keeps them equal)
ROUNDING_METHODS = {m.name: m for m in (RoundToNearest, GPTQ)}


def rounding_method(name: str) -> type[RoundToNearest]:
    """The registered rounding method ``name`` (its class: ``needs_moments``, and the constructor)."""
    if name not in ROUNDING_METHODS:
        raise ValueError(f"rounding must be one of {tuple(ROUNDING_METHODS)}, got {name!r}")
    return ROUNDING_METHODS[name]
