"""Bounded-memory activation statistics and the clipping ranges chosen from them.

One :class:`HistogramObserver` per (timestep group, tensor): exact running min/max plus a
fixed-size histogram whose bin width doubles as the range grows. Memory is ``bins`` counts
whatever the number of calibration samples.
"""

from __future__ import annotations

import numpy as np

from ..config import OBSERVERS
from ..quant import fake_quant



class HistogramObserver:
    """Running min/max and an adaptive histogram of the values seen."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.lo = np.inf
        self.hi = -np.inf
        self.origin = 0.0
        self.width = 0.0
        self.hist = np.zeros(bins, np.float64)
        self.count = 0

    def update(self, values: np.ndarray, subsample: np.ndarray | None = None) -> None:
        """Add values: min/max from all of them, the histogram from ``subsample`` (default all)."""
        v = np.asarray(values).ravel()
        if v.size == 0:
            return
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))
        h = v if subsample is None else np.asarray(subsample).ravel()
        self._cover(self.lo, self.hi)
        idx = np.clip(((h - self.origin) / self.width).astype(np.int64), 0, self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)[: self.bins] * (v.size / h.size)
        self.count += v.size

    def _cover(self, lo: float, hi: float) -> None:
        if self.width == 0.0:
            span = max(hi - lo, 1e-8)
            self.origin, self.width = lo, span / self.bins
            return
        end = self.origin + self.width * self.bins
        if lo >= self.origin and hi <= end:
            return
        # Cover the data range [lo, hi] only: old bins past hi are empty, and covering the old
        # window's end instead compounds (the window grew ~2x per extension, 1e7x over 50 updates).
        new_origin = min(lo, self.origin)
        width = self.width
        while new_origin + width * self.bins < hi:
            width *= 2
        centers = self.origin + (np.arange(self.bins) + 0.5) * self.width
        idx = np.clip(((centers - new_origin) / width).astype(np.int64), 0, self.bins - 1)
        hist = np.zeros(self.bins, np.float64)
        np.add.at(hist, idx, self.hist)
        self.origin, self.width, self.hist = new_origin, width, hist

    def merge(self, other: "HistogramObserver") -> None:
        """Add another observer's values (a shard of the same pass): its bins re-binned onto this
        window, widened to cover both ranges, by their centres as ``_cover`` re-bins. Deterministic for a fixed order of
        merges, which is how shards are folded (in shard order)."""
        if not other.count:
            return
        if not self.count and self.width == 0.0:
            self.lo, self.hi, self.origin, self.width = other.lo, other.hi, other.origin, other.width
            self.hist, self.count = other.hist.copy(), other.count
            return
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self._cover(self.lo, self.hi)
        idx = np.clip(((other.centers() - self.origin) / self.width).astype(np.int64), 0, self.bins - 1)
        np.add.at(self.hist, idx, other.hist)
        self.count += other.count

    def centers(self) -> np.ndarray:
        return self.origin + (np.arange(self.bins) + 0.5) * self.width

    def state(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "origin": self.origin, "width": self.width, "count": self.count,
                "hist": self.hist}

    @classmethod
    def from_state(cls, s: dict) -> "HistogramObserver":
        o = cls(len(s["hist"]))
        o.lo, o.hi, o.origin, o.width, o.count = (float(s["lo"]), float(s["hi"]), float(s["origin"]),
                                                  float(s["width"]), int(s["count"]))
        o.hist = np.asarray(s["hist"], np.float64)
        return o

    # ---- ranges -------------------------------------------------------------------------
    def range_minmax(self) -> tuple[float, float]:
        return _with_zero(self.lo, self.hi)

    def range_percentile(self, pct: float = 99.99) -> tuple[float, float]:
        """Clip the lowest and highest (100 - pct)% of values."""
        cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1.0)
        c = self.centers()
        tail = (100.0 - pct) / 100.0
        lo = c[min(np.searchsorted(cdf, tail), self.bins - 1)]
        hi = c[min(np.searchsorted(cdf, 1.0 - tail), self.bins - 1)]
        return _with_zero(max(lo, self.lo), min(hi, self.hi))

    def range_mse(self, bits: int = 8, *, symmetric: bool = False, max_clip_pct: float = 99.99) -> tuple[float, float]:
        """The clipping range that minimises the expected squared quantization error of the
        recorded values: a search over shrunk upper ends, then shrunk lower ends, on the
        histogram (bin centres weighted by counts). It never clips more than the
        ``max_clip_pct`` percentile range would: a guard against clipping away a rare but
        important mode (the wide activations of the noisiest timesteps when one scale
        serves all timesteps)."""
        lo0, hi0 = self.range_minmax()
        lo_min, hi_min = self.range_percentile(max_clip_pct)
        keep = self.hist > 0
        c, w = self.centers()[keep], self.hist[keep]

        def best_of(cands: np.ndarray) -> tuple[float, float]:
            errs = [float(np.dot(w, (c - fake_quant(c, lo, hi, bits, symmetric=symmetric)) ** 2)) for lo, hi in cands]
            return tuple(cands[int(np.argmin(errs))])

        fracs = np.geomspace(0.01, 1.0, 121)  # outliers can sit 100x beyond the bulk
        if symmetric:
            m = max(-lo0, hi0)
            m_min = max(-lo_min, hi_min)
            return _with_zero(*best_of(np.stack([-np.maximum(m * fracs, m_min), np.maximum(m * fracs, m_min)], 1)))
        his = np.maximum(hi0 * fracs, hi_min)
        _, hi = best_of(np.stack([np.full_like(fracs, lo0), his], 1))
        los = np.minimum(lo0 * fracs, lo_min)
        lo, _ = best_of(np.stack([los, np.full_like(fracs, hi)], 1))
        return _with_zero(lo, hi)

    def range(self, kind: str, bits: int = 8, percentile: float = 99.99, *, symmetric: bool = False):
        if kind == "minmax":
            return self.range_minmax()
        if kind == "percentile":
            return self.range_percentile(percentile)
        if kind == "mse":
            return self.range_mse(bits, symmetric=symmetric, max_clip_pct=percentile)
        raise ValueError(f"unknown observer {kind!r}; use one of {OBSERVERS}")


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    """Quantized ranges must hold 0 exactly (zero padding, ReLU-like zeros)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    return lo, hi
