"""The domain check: is this image like the training X-rays, a chest X-ray from elsewhere, or no
chest X-ray at all? Three tiers of the guard's distance (guard.py), no torch needed.

- `in_domain`: within the distance that 99.5% of validation X-rays stay under (the guard's
  threshold, as before).
- `shifted`: farther, yet within the outer threshold: a chest X-ray unlike the training
  population (adults, other equipment, lines and tubes). Scored and labelled, with a warning.
- `not_chest_xray`: beyond the outer threshold: photographs, documents, screenshots, other
  modalities, noise, blank frames. No label.

The outer threshold is fitted on validation X-rays alone, under views that imitate other
hospitals' films (shift.VIEWS): the largest distance any of them reaches (docs/experiments.md,
sections 26 and 27).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pneumoscan.model_folder import ModelCard

IN_DOMAIN, SHIFTED, NOT_CHEST_XRAY = "in_domain", "shifted", "not_chest_xray"
DOMAINS = (IN_DOMAIN, SHIFTED, NOT_CHEST_XRAY)
POPULATION = "children aged 1-5 from one hospital in Guangzhou"
TRAINED_ON = (
    "5,232 paediatric chest X-rays (anterior-posterior films) of children aged 1-5 from "
    "Guangzhou Women and Children's Medical Center (Kermany et al., 2018)"
)
WARNINGS = {
    SHIFTED: f"unlike the training images ({POPULATION}): less reliable",
    NOT_CHEST_XRAY: "not a chest X-ray? (no label)",
}
OUTER_MARGIN = 1.0  # section 26's 1.1 let a packaged MRI slice and a terrain map through
OUTER_RULE = (
    "the largest guard distance of a validation X-ray under any shift view "
    "(exposure, gain, gamma, blur, noise, crop, rotation, low contrast)"
)


def outer_threshold(view_distances: np.ndarray) -> float:
    """The not-a-chest-X-ray threshold from validation X-rays' distances under the shift views."""
    return float(OUTER_MARGIN * np.max(view_distances))


def outcome(distance: float, inner: float | None, outer: float | None) -> str:
    """The tier of one guard distance. A model without an outer threshold has two tiers."""
    if inner is None or distance <= inner:
        return IN_DOMAIN
    if outer is not None and distance <= outer:
        return SHIFTED
    return NOT_CHEST_XRAY


def validation_files(meta: dict, data_root: Path) -> list[Path]:
    """The model's own validation split: carved from train by patient, as it was trained."""
    from pneumoscan import data

    cfg = meta["training"]["config"]
    train = data.list_split(data_root, "train")
    _, val = data.train_val_split(
        train,
        cfg.get("val_fraction", 0.1),
        cfg.get("split_seed", 0),
        cfg.get("val_design", "random"),
    )
    return val.files


def fit_outer(model: ModelCard, data_root: Path) -> dict:
    """The outer tier for `model`'s guard, from its validation X-rays under every shift view:
    the entries model.json's `ood` section gains."""
    from pneumoscan import reader, shift

    files = validation_files(model.meta, data_root)
    originals = [reader.read_image(f) for f in files]
    largest = 0.0
    for view in shift.VIEWS.values():
        batch = np.stack([reader.resize(view(image), model.input_size) for image in originals])
        largest = max(largest, float(np.max(model.raw_scores(batch)[1])))
    return {
        "outer_threshold": outer_threshold(np.array([largest])),
        "outer_rule": OUTER_RULE,
        "outer_fitted_on": {
            "validation_images": len(files),
            "views": list(shift.VIEWS),
            "largest_distance": largest,
        },
    }
