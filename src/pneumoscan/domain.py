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
# Who the known sources' X-rays are of, by the names `data.read` gives them; any other source
# is named as it is.
KNOWN_POPULATIONS = {
    "chest_xray": "children aged 1-5 from one hospital in Guangzhou",
    "nih_adult": "adults from one hospital in Bethesda (NIH Clinical Center)",
}
POPULATION = KNOWN_POPULATIONS["chest_xray"]  # of every model trained before populations
NOT_A_CHEST_XRAY = "not a chest X-ray? (no label)"
OUTER_MARGIN = 1.0  # section 26's 1.1 let a packaged MRI slice and a terrain map through
OUTER_RULE = (
    "the largest guard distance of a validation X-ray under any shift view "
    "(exposure, gain, gamma, blur, noise, crop, rotation, low contrast)"
)


def outer_threshold(view_distances: np.ndarray) -> float:
    """The not-a-chest-X-ray threshold from validation X-rays' distances under the shift views."""
    return float(OUTER_MARGIN * np.max(view_distances))


def describe(populations: list[str]) -> str:
    """Who a model's training images are of, e.g. "children aged 1-5 from one hospital in
    Guangzhou; adults from one hospital in Bethesda (NIH Clinical Center)"."""
    return "; ".join(KNOWN_POPULATIONS.get(p, f"the images of {p}") for p in populations)


def warning(tier: str, populations: list[str], nearest: str | None = None) -> str | None:
    """The result's warning for a domain tier, naming the populations the model knows and,
    when the image is most like a reference population (one it was not trained on), that one."""
    if tier == SHIFTED:
        like = (
            f"; most like {describe([nearest])}" if nearest and nearest not in populations else ""
        )
        return f"unlike the training images ({describe(populations)}): less reliable{like}"
    return NOT_A_CHEST_XRAY if tier == NOT_CHEST_XRAY else None


def assess(
    distances: np.ndarray, ood: dict | None
) -> tuple[list[str], list[str | None], np.ndarray]:
    """Per image, from the guard's distances (N,) or (N, populations) and model.json's `ood`
    section: its tier, the population it is most like (None with one Gaussian) and its score.

    With one Gaussian the score is the distance and the tiers are `outcome`'s. With several,
    each distance is divided by its population's threshold; the image is most like the
    population nearest so; `in_domain` when that is one of the model's own populations and
    within its threshold, `not_chest_xray` when even the nearest lies beyond `outer_ratio`,
    `shifted` otherwise (a reference population, such as adults for a model of children,
    is never in domain). The score is that smallest ratio (1: the in-domain boundary).
    """
    distances = np.asarray(distances, dtype=np.float64)
    if ood is None:
        return [IN_DOMAIN] * len(distances), [None] * len(distances), distances
    populations = ood.get("populations")
    if not populations or distances.ndim == 1:
        inner, outer = ood["threshold"], ood.get("outer_threshold")
        return (
            [outcome(float(d), inner, outer) for d in distances],
            [None] * len(distances),
            distances,
        )
    ratios = distances / np.asarray([p["threshold"] for p in populations])
    nearest = ratios.argmin(1)
    score = ratios.min(1)
    tiers = []
    for k, r in zip(nearest, score, strict=True):
        if populations[k]["own"] and r <= 1:
            tiers.append(IN_DOMAIN)
        elif r <= ood["outer_ratio"]:
            tiers.append(SHIFTED)
        else:
            tiers.append(NOT_CHEST_XRAY)
    return tiers, [populations[k]["name"] for k in nearest], score


def outcome(distance: float, inner: float | None, outer: float | None) -> str:
    """The tier of one guard distance. A model without an outer threshold has two tiers."""
    if inner is None or distance <= inner:
        return IN_DOMAIN
    if outer is not None and distance <= outer:
        return SHIFTED
    return NOT_CHEST_XRAY


def outer_section(view_distances: np.ndarray, n_images: int, ood: dict | None = None) -> dict:
    """The entries model.json's `ood` section gains: the outer tier, from the guard distances of
    `n_images` validation X-rays under every shift view, and how it was fitted. With several
    populations (`ood` holds them) the tier is a ratio: of each image's distance to the
    population nearest it, to that population's threshold."""
    from pneumoscan import shift

    fitted_on = {"validation_images": n_images, "views": list(shift.VIEWS)}
    if ood is not None and ood.get("populations") and np.ndim(view_distances) == 2:
        ratios = assess(view_distances, {**ood, "outer_ratio": np.inf})[2]
        return {
            "outer_ratio": outer_threshold(ratios),
            "outer_rule": OUTER_RULE + ", as a ratio to the nearest population's threshold",
            "outer_fitted_on": {**fitted_on, "largest_ratio": float(np.max(ratios))},
        }
    largest = float(np.max(view_distances))
    return {
        "outer_threshold": outer_threshold(view_distances),
        "outer_rule": OUTER_RULE,
        "outer_fitted_on": {**fitted_on, "largest_distance": largest},
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
