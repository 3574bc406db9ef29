"""The PyTorch UNet behind the runtime's model interface (``predict(x, t)``), used as the
full-precision reference that exported and quantized bundles are compared with."""

from __future__ import annotations

import numpy as np
from dmruntime import NoiseSchedule
from dmruntime.conditioning import CondInput, Conditioning
from dmruntime.engine import check_sample

from .load import LoadedModel


class TorchEpsModel:
    """Runs a LoadedModel's UNet on numpy arrays; same interface as ``dmruntime.Bundle``
    (``conditioning`` validates conditions; ``null`` is the guidance's null condition)."""

    def __init__(self, model: LoadedModel, null: dict | None = None, class_table=None):
        self.model = model
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.sample_shape = model.sample_shape
        self.conditioning = conditioning_of(model, null, class_table=class_table)

    def predict(self, sample: np.ndarray, t: int, cond: dict | None = None) -> np.ndarray:
        import torch

        check_sample(sample, self.sample_shape)
        cond = self.conditioning.check(cond, len(sample)) if (cond or self.conditioning) else {}
        ts = torch.full((sample.shape[0],), int(t), dtype=torch.int64)
        kw = self.model.family.call_kwargs({k: torch.from_numpy(v) for k, v in cond.items()})
        with torch.no_grad():
            return self.model.unet(torch.from_numpy(sample), ts, return_dict=False, **kw)[0].numpy()

    def decode(self, latents: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Latent models: images from the PyTorch VAE (``latents`` / scaling factor), the fp32
        reference for whatever decoder a bundle ships."""
        import torch

        if self.model.vae is None:
            raise ValueError(f"{self.model.id} has no VAE: its samples are images already")
        s = self.model.scaling_factor
        with torch.no_grad():
            return np.concatenate([self.model.vae.decode(torch.from_numpy(latents[i:i + batch_size]) / s).sample.numpy()
                                   for i in range(0, len(latents), batch_size)])


def conditioning_of(model: LoadedModel, null: dict | None = None, sequence_length: int | None = None,
                    class_table=None) -> Conditioning:
    """The runtime's description of a model's conditioning inputs (plus a null condition and
    a class table)."""
    inputs = tuple(CondInput(i.name, i.dtype, i.shape) for i in model.condition_inputs)
    if not inputs:
        return Conditioning.none()
    defaults = {k: np.asarray(v, np.float32) for k, v in model.condition_defaults.items()} or None
    return Conditioning(inputs, model.num_classes, sequence_length, null, class_table, defaults)
