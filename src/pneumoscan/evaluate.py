"""Score a model on labelled images at its stored operating points: the whole set, and each
source and each view on its own, with intervals from a bootstrap over patients."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pneumoscan import data, metrics, model_folder
from pneumoscan.errors import PneumoscanError


@dataclass
class Evaluation:
    """A model's results on one set of images; `probs` and `labels` are kept for plots.

    `subset` names the images: `all`, a source (`nih_adult`), or a source's view
    (`nih_adult AP`); `breakdown` holds the evaluations of each source and view, when the set
    has more than one or gives views."""

    model: str
    split: str
    labels: np.ndarray
    probs: np.ndarray
    auc: float
    auc_ci: tuple[float, float]
    ece: float
    operating_points: dict[str, metrics.PointMetrics]
    point_cis: dict[str, dict[str, tuple[float, float]]]  # bootstrap sensitivity/specificity
    subset: str = "all"
    patients: int = 0
    domains: dict[str, int] = field(default_factory=dict)
    breakdown: list[Evaluation] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        out = {
            "model": self.model,
            "split": self.split,
            "subset": self.subset,
            "n": self.n,
            "patients": self.patients,
            "auc": self.auc,
            "auc_ci": list(self.auc_ci),
            "ece": self.ece,
            "domains": self.domains,
            "operating_points": {
                k: {
                    **v.to_dict(),
                    "sensitivity_ci": list(self.point_cis[k]["sensitivity"]),
                    "specificity_ci": list(self.point_cis[k]["specificity"]),
                }
                for k, v in self.operating_points.items()
            },
        }
        if self.breakdown:
            out["breakdown"] = [b.to_dict() for b in self.breakdown]
        return out


def evaluate(
    model: model_folder.ModelCard,
    data_root: data.DataSets,
    split: str = "test",
    n_boot: int = 2000,
) -> Evaluation:
    """Evaluate on the `split` of each data set (a Kermany-layout folder's `split`/ folder; a
    class-folder set or CSV whole); the thresholds are those fixed on validation."""
    listed = data.read_all(data_root, split)
    if listed.class_names != model.class_names:
        raise PneumoscanError(
            f"--data {data_root}: classes {listed.class_names} differ from the model's "
            f"{model.class_names}"
        )
    images, kept = data.load_images(listed, model.input_size)
    logits, distances = model.raw_scores(np.asarray(images))
    probs = model.calibrate(logits)
    tiers = np.asarray(model.assess(distances)[0])
    whole = _scored(model, split, kept, probs, tiers, np.arange(len(kept)), "all", n_boot)
    subsets = []
    for source in kept.source_names:
        index = kept.of_source(source)
        subsets.append((source, index))
        views = sorted({kept.views[i] for i in index} - {""})
        if len(views) > 1:
            for view in views:
                subsets.append((f"{source} {view}", index[np.asarray(kept.views)[index] == view]))
    if len(subsets) > 1:
        whole.breakdown = [
            _scored(model, split, kept, probs, tiers, index, name, n_boot)
            for name, index in subsets
            if len(np.unique(kept.labels[index])) == 2
        ]
    return whole


def _scored(
    model: model_folder.ModelCard,
    split: str,
    kept: data.Manifest,
    probs: np.ndarray,
    tiers: np.ndarray,
    index: np.ndarray,
    subset: str,
    n_boot: int,
) -> Evaluation:
    labels, probs, groups = kept.labels[index], probs[index], kept.groups[index]
    if len(np.unique(labels)) < 2:
        raise PneumoscanError(f"{split} ({subset}): needs images of both classes to compute AUC")
    points = model.meta["operating_points"]
    return Evaluation(
        model=model.name,
        split=split,
        labels=labels,
        probs=probs,
        auc=metrics.auc(labels, probs),
        auc_ci=metrics.auc_bootstrap_ci(labels, probs, n_boot=n_boot, groups=groups),
        ece=metrics.expected_calibration_error(labels, probs),
        operating_points={
            name: metrics.point_metrics(labels, probs, model.threshold(name)) for name in points
        },
        point_cis={
            name: metrics.point_bootstrap_ci(
                labels, probs, model.threshold(name), n_boot, groups=groups
            )
            for name in points
        },
        subset=subset,
        patients=len(set(groups)),
        domains=dict(Counter(tiers[index].tolist())),
    )
