"""The VAE decoder of a latent bundle (manifest key ``decoder``)."""

from __future__ import annotations

import numpy as np

from .components import Component
from .engine import check_sample


class Decoder(Component):
    """``latents`` [B, C, h, w] (the UNet's space; the scaling factor is divided out inside the
    graph) to ``image`` [B, 3, H, W] in [-1, 1]."""

    key = "decoder"
    inputs = ("latents",)
    outputs = ("image",)

    @classmethod
    def input_shape(cls, manifest: dict) -> tuple[int, ...]:
        return tuple(int(s) for s in manifest["model"]["sample_shape"])

    def decode(self, latents: np.ndarray, batch_size: int = 64) -> np.ndarray:
        check_sample(latents, self.engine.sample_shape)
        out = [self.run({"latents": latents[i:i + batch_size]})["image"] for i in range(0, len(latents), batch_size)]
        return np.concatenate(out)
