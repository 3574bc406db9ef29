"""Error-compensating weight rounding (GPTQ) on the same grid as ``quant.quantize_weight``.

Round-to-nearest minimises each weight's own error; what matters is the layer's output error
on the inputs it sees, E||x (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) with H = E[x x^T] over the
layer's input columns (im2col rows for a Conv). GPTQ (Frantar et al., 2023) quantizes one input
column at a time and moves each column's rounding error onto the columns not yet quantized,
through the Cholesky factor of the damped inverse of H. The per-output-channel scale is chosen
first by an H-weighted search over clipping ratios. The result is a ``QuantWeight``: same int8
container, same symmetric per-channel grid, so storage and kernels do not change.

Not wired into the build yet (issue 12): this module is the arithmetic and its checks.
"""

from __future__ import annotations

import numpy as np

from ..quant import MAX_WEIGHT_BITS, MIN_WEIGHT_BITS, QuantWeight

__all__ = ["CLIP_RATIOS", "gptq_quantize", "output_error", "weight_matrix"]

CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))


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
    return np.einsum("oi,ij,oj->o", d, H, d)


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


def gptq_quantize(w: np.ndarray, axis: int, bits: int, H: np.ndarray, *, damp: float = 0.01,
                  ratios=CLIP_RATIOS, block: int = 128) -> QuantWeight:
    """Quantize ``w`` (channel axis ``axis``) to ``bits`` so that the output error on inputs with
    second moment ``H`` ([in, in], in ``weight_matrix`` column order) is small, not the weight
    error. ``damp``: fraction of H's mean diagonal added to its diagonal (numerical stability).
    Columns that never see a nonzero input (zero diagonal) are rounded to nearest."""
    if not (isinstance(bits, (int, np.integer)) and MIN_WEIGHT_BITS <= bits <= MAX_WEIGHT_BITS):
        raise ValueError(f"weight bits must be an integer in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}], got {bits!r}")
    qmax = 2 ** (int(bits) - 1) - 1
    W = weight_matrix(w, axis).astype(np.float64)
    n = W.shape[1]
    H = np.asarray(H, np.float64)
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight of shape {np.shape(w)} (axis {axis}), got {H.shape}")
    H = H.copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(n)] += damp * float(np.mean(np.diag(H)))
    scale = _scales(W, H, qmax, ratios)
    # upper Cholesky factor of H^-1: row i holds the compensation weights of column i
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    W = W.copy()
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
    q = _from_matrix(Q.astype(np.int8), np.shape(w), axis)
    return QuantWeight(np.ascontiguousarray(q), scale.astype(np.float32), axis, int(bits))
