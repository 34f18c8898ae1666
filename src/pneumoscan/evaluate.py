"""Score a model on a data split at its stored operating points."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan import data, metrics, model_folder
from pneumoscan.errors import PneumoscanError


@dataclass
class Evaluation:
    """A model's results on one split; `probs` and `labels` are kept for plots."""

    model: str
    split: str
    labels: np.ndarray
    probs: np.ndarray
    auc: float
    auc_ci: tuple[float, float]
    ece: float
    operating_points: dict[str, metrics.PointMetrics]
    point_cis: dict[str, dict[str, tuple[float, float]]]  # bootstrap sensitivity/specificity

    @property
    def n(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "split": self.split,
            "n": self.n,
            "auc": self.auc,
            "auc_ci": list(self.auc_ci),
            "ece": self.ece,
            "operating_points": {
                k: {
                    **v.to_dict(),
                    "sensitivity_ci": list(self.point_cis[k]["sensitivity"]),
                    "specificity_ci": list(self.point_cis[k]["specificity"]),
                }
                for k, v in self.operating_points.items()
            },
        }


def evaluate(
    model: model_folder.LoadedModel, data_root: str | Path, split: str = "test", n_boot: int = 2000
) -> Evaluation:
    """Evaluate on `<data_root>/<split>`; the thresholds are those fixed on validation."""
    listed = data.list_split(data_root, split)
    if listed.class_names != model.class_names:
        raise PneumoscanError(
            f"{data_root}/{split}: classes {listed.class_names} differ from the model's {model.class_names}"
        )
    images, kept = data.load_images(listed, model.input_size)
    if len(np.unique(kept.labels)) < 2:
        raise PneumoscanError(f"{data_root}/{split}: needs images of both classes to compute AUC")
    probs = model.probabilities(images)
    labels = kept.labels
    return Evaluation(
        model=model.name,
        split=split,
        labels=labels,
        probs=probs,
        auc=metrics.auc(labels, probs),
        auc_ci=metrics.auc_bootstrap_ci(labels, probs, n_boot=n_boot),
        ece=metrics.expected_calibration_error(labels, probs),
        operating_points={
            name: metrics.point_metrics(labels, probs, model.threshold(name))
            for name in model.meta["operating_points"]
        },
        point_cis={
            name: metrics.point_bootstrap_ci(labels, probs, model.threshold(name), n_boot)
            for name in model.meta["operating_points"]
        },
    )
