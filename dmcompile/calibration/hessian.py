"""Second moments of a layer's inputs, H = E[x x^T] over its input columns, for GPTQ rounding.

A Conv's columns are its im2col rows (C * kh * kw values per output position, in the order of
``lowering.rounding.weight_matrix``); a Gemm / MatMul's are the last axis. Not wired into the
calibration pass yet (issue 12): this is the arithmetic and its checks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SecondMoment", "im2col"]


def im2col(x: np.ndarray, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """[B, C, H, W] -> [B * Ho * Wo, C * kh * kw]: each row the input patch one output position
    of a (group 1) Conv reads, columns ordered (C, kh, kw) like a flattened Conv weight. ``pads``
    in ONNX order (top, left, bottom, right)."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    B, C, H, W = x.shape
    ho = (H - dh * (kh - 1) - 1) // sh + 1
    wo = (W - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((B, C, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(B * ho * wo, C * kh * kw)


class SecondMoment:
    """Running E[x x^T] (float64) over the rows added; ``max_rows`` per call subsamples rows
    (seeded) so that a large feature map costs a bounded matmul."""

    def __init__(self, n: int, max_rows: int | None = None, seed: int = 0):
        self.sum = np.zeros((n, n), np.float64)
        self.count = 0
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float64).reshape(-1, self.sum.shape[0])
        if self.max_rows is not None and len(rows) > self.max_rows:
            rows = rows[self.rng.choice(len(rows), self.max_rows, replace=False)]
        self.sum += rows.T @ rows
        self.count += len(rows)

    def matrix(self) -> np.ndarray:
        if not self.count:
            raise ValueError("no rows were added")
        return self.sum / self.count

    @staticmethod
    def pooled(parts: list[SecondMoment], weights: list[float]) -> np.ndarray:
        """The weighted mean of several groups' moments (e.g. by sampling steps per group)."""
        w = np.asarray(weights, np.float64)
        return sum(wi * p.matrix() for wi, p in zip(w / w.sum(), parts))
