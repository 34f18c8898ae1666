"""Metrics, operating points and calibration: plain functions on labels and probabilities.

Labels are 1 for PNEUMONIA (the positive class) and 0 for NORMAL. scikit-learn is imported
inside the functions: scoring a file needs only `sigmoid`, and start-up time matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DETECTION_SENSITIVITY = 0.98
# The operating points every model carries, in the order tables list them.
POINTS = ("balanced", "detection")


@dataclass(frozen=True)
class PointMetrics:
    """Metrics at one decision threshold (probability >= threshold means PNEUMONIA)."""

    threshold: float
    accuracy: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else 0.0


def point_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> PointMetrics:
    """Accuracy, sensitivity, specificity, precision, F1 and the confusion counts."""
    predicted = (np.asarray(probs) >= threshold).astype(int)
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    sensitivity = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    return PointMetrics(
        threshold=float(threshold),
        accuracy=_ratio(tp + tn, tp + tn + fp + fn),
        sensitivity=sensitivity,
        specificity=_ratio(tn, tn + fp),
        precision=precision,
        f1=2 * precision * sensitivity / (precision + sensitivity) if tp else 0.0,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs))


def within_source_auc(labels: np.ndarray, scores: np.ndarray, sources: np.ndarray) -> float:
    """The mean of each source's own validation AUC: never an AUC pooled over sources, whose
    class mixes differ (the hospital could carry the label, Zech et al. 2018)."""
    return float(
        np.mean([auc(labels[sources == s], scores[sources == s]) for s in np.unique(sources)])
    )


def auc_bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ROC AUC, resampling cases with replacement, or, with
    `groups` (a patient per image), whole patients."""
    from sklearn.metrics import roc_auc_score

    labels, probs = np.asarray(labels), np.asarray(probs)
    members = None
    if groups is not None:
        _, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    count = len(labels) if members is None else len(members)
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n_boot):
        picked = rng.integers(0, count, count)
        idx = picked if members is None else np.concatenate([members[g] for g in picked])
        if labels[idx].min() == labels[idx].max():
            continue  # a one-class resample has no AUC
        scores.append(roc_auc_score(labels[idx], probs[idx]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(scores, [alpha, 1 - alpha])
    return float(lo), float(hi)


def point_bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of sensitivity and specificity at `threshold` (the same
    resamples for both). Cases are resampled with replacement, or, with `groups` (a patient per
    row, e.g. one image under several views), whole groups are."""
    labels = np.asarray(labels)
    called = np.asarray(probs) >= threshold
    _, members = np.unique(
        np.arange(len(labels)) if groups is None else groups, return_inverse=True
    )
    # Per group: its positives called, positives, negatives called negative, negatives.
    counts = np.stack(
        [
            np.bincount(members, (labels == 1) & called, members.max() + 1),
            np.bincount(members, labels == 1, members.max() + 1),
            np.bincount(members, (labels == 0) & ~called, members.max() + 1),
            np.bincount(members, labels == 0, members.max() + 1),
        ],
        1,
    )
    rng = np.random.default_rng(seed)
    sens, spec = [], []
    for _ in range(n_boot):
        tp, pos, tn, neg = counts[rng.integers(0, len(counts), len(counts))].sum(0)
        if pos == 0 or neg == 0:
            continue  # a one-class resample has no sensitivity or specificity
        sens.append(tp / pos)
        spec.append(tn / neg)
    alpha = (1 - level) / 2
    return {
        "sensitivity": tuple(float(v) for v in np.quantile(sens, [alpha, 1 - alpha])),
        "specificity": tuple(float(v) for v in np.quantile(spec, [alpha, 1 - alpha])),
    }


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the balanced point)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def detection_threshold(
    labels: np.ndarray, probs: np.ndarray, min_sensitivity: float = DETECTION_SENSITIVITY
) -> float:
    """The highest threshold whose sensitivity is at least `min_sensitivity`."""
    from sklearn.metrics import roc_curve

    _, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= min_sensitivity)
    return float(min(thresholds[ok[0]], 1.0))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: mean |accuracy - confidence| weighted by bin size."""
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(labels[mask].mean() - probs[mask].mean())
    return float(total)


def fit_platt(
    labels: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the (weighted) log-loss of sigmoid(a * logit + b).

    A bias term as well as a temperature, because class-weighted training shifts the
    logits by the log prior ratio; with a > 0 the ranking (and so AUC) is unchanged.
    """
    from scipy.optimize import minimize

    y = np.asarray(labels, dtype=float)
    z = np.asarray(logits, dtype=float)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=float)
    w = w / w.mean()

    def nll(params: np.ndarray) -> float:
        s = np.exp(params[0]) * z + params[1]
        return float(np.mean(w * (np.logaddexp(0, s) - y * s)))

    result = minimize(
        nll, x0=np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9}
    )
    return float(np.exp(result.x[0])), float(result.x[1])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def fit_operating_points(
    labels: np.ndarray,
    logits: np.ndarray,
    min_sensitivity: float | dict[str, float] = DETECTION_SENSITIVITY,
    source: str = "validation",
    groups: np.ndarray | None = None,
    populations: np.ndarray | None = None,
) -> dict:
    """Platt calibration and both thresholds, all from `source` (validation, validation under
    shift views, or a site's own images): model.json's sections. Each point carries its metrics
    on `source` and their 95% bootstrap intervals, resampling `groups` (patients) if given.

    With `populations` (the data set each row came from), each population weighs the same in
    the calibration, `balanced` maximises the mean of the populations' Youden's J, `detection`
    is the highest threshold that keeps each population's sensitivity at its target
    (`min_sensitivity`: one for all, or per population with `default`), and each point gives
    every population's own metrics and intervals.
    """
    labels, logits = np.asarray(labels), np.asarray(logits)
    pops = np.zeros(len(labels), dtype=object) if populations is None else np.asarray(populations)
    names = list(dict.fromkeys(pops.tolist()))
    weights = np.ones(len(labels))
    for name in names:
        weights[pops == name] = len(labels) / (len(names) * (pops == name).sum())
    scale, bias = fit_platt(labels, logits, weights)
    raw = sigmoid(logits)
    probs = sigmoid(scale * logits + bias)
    if len(names) == 1:
        balanced = youden_threshold(labels, probs)
        targets = {names[0]: _target(min_sensitivity, names[0])}
        detection = detection_threshold(labels, probs, targets[names[0]])
    else:
        balanced = _mean_youden_threshold(labels, probs, pops, names)
        targets = {n: _target(min_sensitivity, n) for n in names}
        detection = min(
            detection_threshold(labels[pops == n], probs[pops == n], targets[n]) for n in names
        )
    # Detection trades accuracy for sensitivity, so it is never less sensitive than balanced.
    detection = min(detection, balanced)
    wanted = (
        f"sensitivity >= {targets[names[0]]}"
        if len(names) == 1
        else "each population's sensitivity >= its target ("
        + ", ".join(f"{n} {t}" for n, t in targets.items())
        + ")"
    )
    rules = {
        "balanced": (
            balanced,
            f"max Youden's J on {source}"
            if len(names) == 1
            else f"max mean of the populations' Youden's J on {source}",
        ),
        "detection": (
            detection,
            f"highest threshold with {source} {wanted} (and at most the balanced threshold)",
        ),
    }
    points = {}
    for name in POINTS:
        threshold, rule = rules[name]
        ci = point_bootstrap_ci(labels, probs, threshold, groups=groups)
        points[name] = {
            "threshold": threshold,
            "rule": rule,
            "validation": point_metrics(labels, probs, threshold).to_dict(),
            "sensitivity_ci": list(ci["sensitivity"]),
            "specificity_ci": list(ci["specificity"]),
        }
        if len(names) > 1:
            points[name]["populations"] = {
                n: _population_point(labels, probs, threshold, groups, pops == n, targets[n])
                for n in names
            }
    return {
        "operating_points": points,
        "calibration": {
            "method": f"Platt scaling of the logit, fit on {source}"
            + (", each population weighing the same" if len(names) > 1 else ""),
            "scale": scale,
            "bias": bias,
            "validation_ece_before": expected_calibration_error(labels, raw),
            "validation_ece_after": expected_calibration_error(labels, probs),
        },
    }


def _target(min_sensitivity: float | dict[str, float], population: str) -> float:
    if isinstance(min_sensitivity, dict):
        return float(
            min_sensitivity.get(population, min_sensitivity.get("default", DETECTION_SENSITIVITY))
        )
    return float(min_sensitivity)


def _mean_youden_threshold(
    labels: np.ndarray, probs: np.ndarray, pops: np.ndarray, names: list
) -> float:
    """The threshold (one of the probabilities) maximising the mean of each population's
    sensitivity + specificity - 1."""
    candidates = np.unique(probs)
    total = np.zeros(len(candidates))
    for name in names:
        mine = pops == name
        positives = np.sort(probs[mine & (labels == 1)])
        negatives = np.sort(probs[mine & (labels == 0)])
        sensitivity = 1 - np.searchsorted(positives, candidates, side="left") / max(
            len(positives), 1
        )
        specificity = np.searchsorted(negatives, candidates, side="left") / max(len(negatives), 1)
        total += sensitivity + specificity - 1
    return float(min(candidates[int(np.argmax(total))], 1.0))


def _population_point(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    groups: np.ndarray | None,
    mine: np.ndarray,
    target: float,
) -> dict:
    ci = point_bootstrap_ci(
        labels[mine], probs[mine], threshold, groups=None if groups is None else groups[mine]
    )
    return {
        "validation": point_metrics(labels[mine], probs[mine], threshold).to_dict(),
        "sensitivity_ci": list(ci["sensitivity"]),
        "specificity_ci": list(ci["specificity"]),
        "detection_target": target,
    }
