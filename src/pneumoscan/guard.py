"""The not-a-chest-X-ray guard: how far an image lies from the training X-rays.

The distance is Mahalanobis (Ledoit-Wolf shrunk covariance) on the mean- and std-pooled
outputs of EfficientNet-Lite0's frozen ImageNet stages, on the image as `INPUT` prepares it (a
Gaussian low-pass, no equalisation): generic image features, in which photographs, documents,
noise and blank frames lie far from radiographs whatever the classifier. Every model's guard
reads the same features; a `transfer` trunk that prepares its input the same way is that
extractor, so for it the guard costs almost nothing.
Its threshold lets at least 99% of validation X-rays pass.

A guard holds one Gaussian per population: each source the model was trained and validated on
(its own), and reference populations of chest X-rays it was not (e.g. adults, for a model of
children). With one Gaussian the guard gives one distance per image; with several, one per
population, and the domain check (domain.py) says which population an image is most like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    """Distances of trunk features from each population's training distribution."""

    def __init__(self, populations: int = 1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(populations, FEATURES))
        self.register_buffer("precision", torch.eye(FEATURES).repeat(populations, 1, 1))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        flat = features.float().flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], 1)

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances of pooled features from each population's mean: (N,) with one
        population, (N, populations) with several."""
        # One matrix product per population: the same sums whatever the batch, as one einsum
        # over the batch is not (an image's score would depend on its neighbours' count).
        distances = []
        for mean, precision in zip(self.mean, self.precision, strict=True):
            centred = pooled - mean
            distances.append(((centred @ precision) * centred).sum(1).clamp_min(0).sqrt())
        return distances[0] if len(distances) == 1 else torch.stack(distances, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.distance(self.pool(features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A guard saved before populations holds one Gaussian without the population axis.
        for name in ("mean", "precision"):
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == getattr(self, name).dim() - 1:
                state_dict[key] = state_dict[key][None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class Population:
    """One population's Gaussian as fitted: its threshold (PASS_QUANTILE of its validation
    images' distances) and the share of them it passes."""

    name: str
    own: bool  # validated on (a source of the model's), or a reference population
    threshold: float
    pass_rate: float
    n_train: int
    n_val: int

    def to_dict(self) -> dict:
        return asdict(self)


def fit(train_pooled: np.ndarray, val_pooled: np.ndarray) -> tuple[Guard, float, float]:
    """Fit one population; return the guard, its threshold and the validation pass rate."""
    fitted, (population,) = fit_populations({"": (train_pooled, val_pooled, True)})
    return fitted, population.threshold, population.pass_rate


def fit_populations(
    sets: dict[str, tuple[np.ndarray, np.ndarray, bool]],
) -> tuple[Guard, list[Population]]:
    """One Gaussian per population from {name: (train features, validation features, own)}."""
    from sklearn.covariance import LedoitWolf

    fitted = Guard(len(sets))
    populations = []
    for k, (name, (train_pooled, val_pooled, own)) in enumerate(sets.items()):
        estimate = LedoitWolf().fit(train_pooled)
        fitted.mean[k] = torch.from_numpy(estimate.location_).float()
        fitted.precision[k] = torch.from_numpy(estimate.precision_).float()
        one = Guard()
        one.mean[0], one.precision[0] = fitted.mean[k], fitted.precision[k]
        with torch.no_grad():
            val_scores = one.distance(torch.from_numpy(val_pooled).float()).numpy()
        threshold = float(np.quantile(val_scores, PASS_QUANTILE, method="higher"))
        rate = float((val_scores <= threshold).mean())
        populations.append(
            Population(name, own, threshold, rate, len(train_pooled), len(val_pooled))
        )
    return fitted, populations
