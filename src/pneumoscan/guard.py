"""The not-a-chest-X-ray guard: how far an image lies from the training X-rays.

The distance is Mahalanobis (Ledoit-Wolf shrunk covariance) on the mean- and std-pooled
outputs of EfficientNet-Lite0's frozen ImageNet stages, on the image as `INPUT` prepares it (a
Gaussian low-pass, no equalisation): generic image features, in which photographs, documents,
noise and blank frames lie far from radiographs whatever the classifier. Every model's guard
reads the same features; a `transfer` trunk that prepares its input the same way is that
extractor, so for it the guard costs almost nothing.
Its threshold lets at least 99% of validation X-rays pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FROZEN_STAGES = 5  # stem + the first five stages of EfficientNet-Lite0 (112 channels, stride 16)
# How the guard's stages prepare their input, in model_args' terms (models.Standardize). The
# 1-px low-pass tells a packaged MRI slice from a shifted chest X-ray (docs/experiments.md,
# section 28). Equalised like the `transfer` trunk, it would bring photographs close to the adult
# films (section 30), so the equalised trunk is not the guard's.
INPUT = {"input_blur": 1.0, "equalize": False}
FEATURES = 2 * 112
PASS_QUANTILE = 0.995  # of validation X-rays under the threshold (the target is >= 0.99)
DESCRIPTION = (
    "Mahalanobis distance (Ledoit-Wolf) of mean+std pooled EfficientNet-Lite0 ImageNet features "
    f"(stem + {FROZEN_STAGES} stages, input blur {INPUT['input_blur']} px), fit on the training "
    "X-rays"
)


class Guard(nn.Module):
    """Distance of trunk features from the training distribution."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(FEATURES))
        self.register_buffer("precision", torch.eye(FEATURES))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        flat = features.float().flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], 1)

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of pooled features from the training mean."""
        centred = pooled - self.mean
        return ((centred @ self.precision) * centred).sum(1).clamp_min(0).sqrt()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.distance(self.pool(features))


def fit(train_pooled: np.ndarray, val_pooled: np.ndarray) -> tuple[Guard, float, float]:
    """Fit on training features; return the guard, its threshold and the validation pass rate."""
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(train_pooled)
    guard = Guard()
    guard.mean.copy_(torch.from_numpy(estimate.location_).float())
    guard.precision.copy_(torch.from_numpy(estimate.precision_).float())
    with torch.no_grad():
        val_scores = guard.distance(torch.from_numpy(val_pooled).float()).numpy()
    threshold = float(np.quantile(val_scores, PASS_QUANTILE, method="higher"))
    return guard, threshold, float((val_scores <= threshold).mean())
