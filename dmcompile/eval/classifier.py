"""The small digit classifier that gives the feature space for Frechet distance on digits.

Trained by ``benchmarks/train_classifier.py``; weights ship in ``dmcompile/zoo/classifier``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..zoo import CLASSIFIER_DIR

WEIGHTS = "digits_classifier.safetensors"
INFO = "info.json"
FEATURE_DIM = 128


def make_classifier():
    """CNN for [N, 1, 16, 16] digits in [-1, 1]: features() gives the 128-d penultimate layer."""
    import torch
    from torch import nn

    class DigitClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
                nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
            )
            self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(FEATURE_DIM, 10))

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    return DigitClassifier()


class DigitScorer:
    """Loads the shipped classifier; maps image arrays to features and class probabilities."""

    def __init__(self, folder: Path = CLASSIFIER_DIR):
        from safetensors.torch import load_file

        path = Path(folder) / WEIGHTS
        if not path.is_file():
            raise ModelError(f"digit classifier weights {path} are missing; run benchmarks/train_classifier.py")
        self.net = make_classifier()
        self.net.load_state_dict(load_file(str(path)))
        self.net.eval().requires_grad_(False)
        info = Path(folder) / INFO
        self.info = json.loads(info.read_text()) if info.is_file() else {}

    def __call__(self, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, 128] float64, probabilities [N, 10]) of [N, 1, 16, 16] images in [-1, 1]."""
        import torch

        imgs = np.asarray(images, np.float32)
        if imgs.ndim != 4 or imgs.shape[1:] != (1, 16, 16):
            raise ModelError(f"the digit classifier scores [N, 1, 16, 16] images, got {list(imgs.shape)}: "
                             "FD and class rates apply to digits models only")
        feats, probs = [], []
        with torch.no_grad():
            for s in range(0, len(imgs), batch):
                x = torch.from_numpy(np.clip(imgs[s:s + batch], -1, 1))
                f = self.net.features(x)
                feats.append(f.double().numpy())
                probs.append(torch.softmax(self.net.head(f), 1).double().numpy())
        return np.concatenate(feats), np.concatenate(probs)
