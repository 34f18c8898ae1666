"""What site calibration gains, measured honestly: cross-fitted by patient halves of a labelled set.

    python bench/site_calibration.py --data DIR [--split test] [--models ensemble,dense,cnn,transfer]

The split's images are cut into two halves by patient (stratified by class, seed 0). The
calibration and both operating points are refitted on one half exactly as `pneumoscan calibrate`
does (`metrics.fit_operating_points` on the site's logits, detection target 0.98) and scored on
the other half, then the other way round; the two scored halves are pooled, so every image is
scored by a fit that never saw it. "before" is the shipped model (fitted on the training split's
validation) on the same images. Prints a markdown table; appends to
bench/results/cpu_site_calibration.jsonl.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np
import record
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscan import data, metrics, runtime


def cross_fitted(labels: np.ndarray, logits: np.ndarray, groups: list[str]) -> dict:
    """Pooled out-of-half calibrated probabilities and the thresholds that scored each image."""
    folds = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=0)
    probs = np.zeros(len(labels))
    thresholds = {name: np.zeros(len(labels)) for name in metrics.POINTS}
    for fit, score in folds.split(logits, labels, groups):
        fitted = metrics.fit_operating_points(labels[fit], logits[fit], source="site images")
        c = fitted["calibration"]
        probs[score] = metrics.sigmoid(c["scale"] * logits[score] + c["bias"])
        for name in metrics.POINTS:
            thresholds[name][score] = fitted["operating_points"][name]["threshold"]
    return {"probs": probs, "thresholds": thresholds}


def point(labels: np.ndarray, probs: np.ndarray, threshold) -> dict:
    called = probs >= threshold  # a threshold per image: each half's own
    sens = float(called[labels == 1].mean())
    spec = float((~called[labels == 0]).mean())
    # The interval: the same bootstrap as `evaluate`, on the calls (threshold 0.5 of 0/1).
    ci = metrics.point_bootstrap_ci(labels, called.astype(float), 0.5)
    return {"sensitivity": sens, "specificity": spec, **{f"{k}_ci": v for k, v in ci.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", default="ensemble,dense,cnn,transfer")
    args = parser.parse_args()

    listed = data.list_split(args.data, args.split)
    groups = [data.patient_id(f.name) for f in listed.files]
    rows, lines = [], []
    lines.append(
        "| model | | ECE | balanced: sensitivity / specificity (95% CI) | detection: sensitivity / specificity (95% CI) |"
    )
    lines.append("|---|---|---:|---|---|")
    for name in args.models.split(","):
        model = runtime.load(name)
        images, kept = data.load_images(listed, model.input_size)
        labels = kept.labels
        logits, _ = model.raw_scores(images)
        shipped = model.calibrate(logits)
        site = cross_fitted(labels, logits, [groups[listed.files.index(f)] for f in kept.files])
        for when, probs, thresholds in (
            ("before", shipped, {n: model.threshold(n) for n in metrics.POINTS}),
            ("after site calibration", site["probs"], site["thresholds"]),
        ):
            ece = metrics.expected_calibration_error(labels, probs)
            points = {n: point(labels, probs, thresholds[n]) for n in metrics.POINTS}
            cells = [
                f"{p['sensitivity']:.3f} ({p['sensitivity_ci'][0]:.3f}-{p['sensitivity_ci'][1]:.3f})"
                f" / {p['specificity']:.3f} ({p['specificity_ci'][0]:.3f}-{p['specificity_ci'][1]:.3f})"
                for p in points.values()
            ]
            lines.append(f"| {name} | {when} | {ece:.3f} | {cells[0]} | {cells[1]} |")
            rows.append(
                {
                    "date": date.today().isoformat(),
                    "model": name,
                    "split": args.split,
                    "when": when,
                    "n": len(labels),
                    "ece": round(ece, 4),
                    **{f"{n}_{k}": v for n, p in points.items() for k, v in p.items()},
                }
            )
    print("\n".join(lines))
    record.append("cpu_site_calibration.jsonl", rows)


if __name__ == "__main__":
    main()
