"""The PyTorch UNet behind the runtime's model interface (``predict(x, t)``), used as the
full-precision reference that exported and quantized bundles are compared with."""

from __future__ import annotations

import numpy as np
from dmruntime import NoiseSchedule
from dmruntime.engine import check_sample

from .load import LoadedModel


class TorchEpsModel:
    """Runs a LoadedModel's UNet on numpy arrays; same interface as ``dmruntime.Bundle``."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.schedule = NoiseSchedule.from_config(model.scheduler_config)
        self.sample_shape = model.sample_shape

    def predict(self, sample: np.ndarray, t: int) -> np.ndarray:
        import torch

        check_sample(sample, self.sample_shape)
        ts = torch.full((sample.shape[0],), int(t), dtype=torch.int64)
        with torch.no_grad():
            return self.model.unet(torch.from_numpy(sample), ts, return_dict=False)[0].numpy()
