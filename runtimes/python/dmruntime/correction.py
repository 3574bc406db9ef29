"""PTQD noise correction (He et al., NeurIPS 2023), per timestep group.

The quantized noise prediction is modelled as eps_q = (1 + k) * eps + r, r uncorrelated with
eps, with per-channel mean ``bias`` and variance ``var``. The runtime undoes the correlated
part, eps = (eps_q - bias) / (1 + k), and, for eta > 0, takes the residual's variance that the
step carries into x_{t-1} out of the noise the sampler adds (variance schedule calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BundleError


@dataclass(frozen=True)
class GroupCorrection:
    k: float
    bias: np.ndarray  # [C]
    var: np.ndarray  # [C], residual variance before dividing by (1 + k)

    def apply(self, eps_q: np.ndarray) -> np.ndarray:
        shape = (1, -1) + (1,) * (eps_q.ndim - 2)
        return ((eps_q - self.bias.reshape(shape)) / np.float32(1.0 + self.k)).astype(np.float32, copy=False)

    def residual_var(self, ndim: int) -> np.ndarray:
        """Variance of the residual left in the corrected eps, per channel, broadcastable."""
        return (self.var / (1.0 + self.k) ** 2).reshape((1, -1) + (1,) * (ndim - 2)).astype(np.float32)


def load_corrections(manifest: dict, channels: int) -> list[GroupCorrection] | None:
    """Per group index, from manifest["correction"]; None when the bundle has none."""
    spec = manifest.get("correction")
    if not spec:
        return None
    out = {}
    for g in spec.get("groups", []):
        bias, var = np.asarray(g["bias"], np.float32), np.asarray(g["var"], np.float32)
        if bias.shape != (channels,) or var.shape != (channels,) or not np.isfinite(g["k"]) or g["k"] <= -1:
            raise BundleError(f"manifest correction of group {g.get('index')} is malformed (k {g.get('k')}, "
                              f"{bias.shape[0] if bias.ndim else 0} bias values for {channels} channels); rebuild")
        out[int(g["index"])] = GroupCorrection(float(g["k"]), bias, np.maximum(var, 0))
    if sorted(out) != list(range(len(manifest["groups"]))):
        raise BundleError("manifest correction does not cover every group; rebuild the bundle")
    return [out[i] for i in range(len(out))]
