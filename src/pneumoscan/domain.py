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

from collections import Counter
from pathlib import Path

import numpy as np

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


def outer_section(view_distances: np.ndarray, n_images: int) -> dict:
    """The entries model.json's `ood` section gains: the outer tier, from the guard distances of
    `n_images` validation X-rays under every shift view, and how it was fitted."""
    from pneumoscan import shift

    largest = float(np.max(view_distances))
    return {
        "outer_threshold": outer_threshold(view_distances),
        "outer_rule": OUTER_RULE,
        "outer_fitted_on": {
            "validation_images": n_images,
            "views": list(shift.VIEWS),
            "largest_distance": largest,
        },
    }


def external_summary(results: list, no_finding: set[str] = frozenset()) -> dict:
    """What a model did on chest X-rays from elsewhere (`predict.Prediction`s): how many it
    recognised as chest X-rays, how many it marked `shifted`, and how its labels fell, overall
    and on the films whose own metadata says "No finding" (named by file stem in `no_finding`).
    """

    def labels(rs: list) -> dict[str, int]:
        return dict(sorted(Counter(r.label for r in rs if r.label is not None).items()))

    scored = [r for r in results if r.error is None]
    tiers = {tier: sum(r.domain == tier for r in scored) for tier in DOMAINS}
    return {
        "images": len(results),
        "unreadable": len(results) - len(scored),
        "recognised": tiers[IN_DOMAIN] + tiers[SHIFTED],
        "domain": tiers,
        "labels": labels(scored),
        "no_finding": labels([r for r in scored if Path(r.file).stem in no_finding]),
    }
