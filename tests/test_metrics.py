import numpy as np
import pytest

from pneumoscan import metrics

# 4 positives, 4 negatives; scores chosen so every count is easy to check by hand.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1])


def test_point_metrics_by_hand() -> None:
    p = metrics.point_metrics(LABELS, PROBS, 0.5)
    # >= 0.5: 0.9, 0.8, 0.6 (TP) and 0.7 (FP); 0.3 is a FN; 0.4, 0.2, 0.1 TN
    assert (p.tp, p.fp, p.tn, p.fn) == (3, 1, 3, 1)
    assert p.accuracy == pytest.approx(6 / 8)
    assert p.sensitivity == pytest.approx(3 / 4)
    assert p.specificity == pytest.approx(3 / 4)
    assert p.precision == pytest.approx(3 / 4)
    assert p.f1 == pytest.approx(3 / 4)


def test_point_metrics_edge_cases() -> None:
    nothing = metrics.point_metrics(LABELS, PROBS, 1.01)
    assert (nothing.tp, nothing.fp, nothing.sensitivity, nothing.precision, nothing.f1) == (
        0,
        0,
        0.0,
        0.0,
        0.0,
    )
    everything = metrics.point_metrics(LABELS, PROBS, 0.0)
    assert everything.sensitivity == 1.0 and everything.specificity == 0.0


def test_auc_by_hand() -> None:
    # pairs (pos, neg) ranked correctly: 0.9>all 4, 0.8>all 4, 0.6>3, 0.3>2 -> 13 of 16
    assert metrics.auc(LABELS, PROBS) == pytest.approx(13 / 16)


def test_bootstrap_interval_brackets_the_auc() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    lo, hi = metrics.auc_bootstrap_ci(labels, probs, n_boot=300)
    assert lo < metrics.auc(labels, probs) < hi
    assert 0.02 < hi - lo < 0.2


def test_youden_threshold_by_hand() -> None:
    # at 0.6: sens 3/4, spec 3/4 (J=0.5); at 0.8: sens 2/4, spec 1 (J=0.5); at 0.3: sens 1, spec 2/4 (J=0.5)
    # the first maximum on the ROC curve (highest threshold) is taken
    t = metrics.youden_threshold(LABELS, PROBS)
    assert t == pytest.approx(0.8)


def test_detection_threshold_is_the_highest_with_enough_sensitivity() -> None:
    assert metrics.detection_threshold(LABELS, PROBS, 0.98) == pytest.approx(0.3)
    assert metrics.detection_threshold(LABELS, PROBS, 0.75) == pytest.approx(0.6)
    assert metrics.point_metrics(LABELS, PROBS, 0.3).sensitivity == 1.0


def test_expected_calibration_error() -> None:
    assert metrics.expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0
    # every case at 0.8 confidence, half of them positive: |0.5 - 0.8| = 0.3
    assert metrics.expected_calibration_error(
        np.array([1, 0, 1, 0]), np.full(4, 0.8)
    ) == pytest.approx(0.3)


def test_platt_scaling_recovers_a_known_distortion() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < metrics.sigmoid(true_logit)).astype(int)
    distorted = (true_logit - 1.0) / 0.5  # overconfident and shifted
    scale, bias = metrics.fit_platt(labels, distorted)
    assert scale == pytest.approx(0.5, rel=0.15)
    assert bias == pytest.approx(1.0, abs=0.2)
    before = metrics.expected_calibration_error(labels, metrics.sigmoid(distorted))
    after = metrics.expected_calibration_error(labels, metrics.sigmoid(scale * distorted + bias))
    assert after < before / 2


def test_operating_points_are_fit_on_calibrated_validation_probabilities() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    logits = rng.normal(loc=2.0 * labels - 1.0, scale=1.0) * 3.0 + 1.0  # too sharp, shifted
    fitted = metrics.fit_operating_points(labels, logits)
    points = fitted["operating_points"]
    assert list(points) == list(metrics.POINTS)
    scale, bias = fitted["calibration"]["scale"], fitted["calibration"]["bias"]
    probs = metrics.sigmoid(scale * logits + bias)
    for point in points.values():
        assert (
            point["validation"]
            == metrics.point_metrics(labels, probs, point["threshold"]).to_dict()
        )
    assert points["balanced"]["threshold"] == metrics.youden_threshold(labels, probs)
    assert points["detection"]["threshold"] <= points["balanced"]["threshold"]
    assert points["detection"]["validation"]["sensitivity"] >= metrics.DETECTION_SENSITIVITY
    calibration = fitted["calibration"]
    assert calibration["validation_ece_after"] < calibration["validation_ece_before"]


def test_point_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_cases() -> None:
    rng = np.random.default_rng(1)
    small_labels = np.array([0] * 20 + [1] * 20)
    small_probs = np.where(small_labels == 1, 0.8, 0.2) + rng.normal(0, 0.25, 40)
    ci = metrics.point_bootstrap_ci(small_labels, small_probs, 0.5)
    point = metrics.point_metrics(small_labels, small_probs, 0.5)
    assert ci["sensitivity"][0] <= point.sensitivity <= ci["sensitivity"][1]
    assert ci["specificity"][0] <= point.specificity <= ci["specificity"][1]
    big_labels = np.repeat(small_labels, 10)
    big_probs = np.repeat(small_probs, 10)
    wide = ci["sensitivity"][1] - ci["sensitivity"][0]
    narrow = metrics.point_bootstrap_ci(big_labels, big_probs, 0.5)["sensitivity"]
    assert narrow[1] - narrow[0] < wide / 2
    # Every case called positive: sensitivity is exactly 1 in every resample.
    assert metrics.point_bootstrap_ci(small_labels, small_probs, -1.0)["sensitivity"] == (1.0, 1.0)


def test_a_grouped_bootstrap_resamples_patients_not_their_copies() -> None:
    """Twelve views of each image are one patient's evidence, not twelve: resampling by group
    gives the interval of the images alone, resampling rows a falsely narrow one."""
    rng = np.random.default_rng(2)
    labels = np.array([0] * 30 + [1] * 30)
    probs = np.where(labels == 1, 0.7, 0.3) + rng.normal(0, 0.2, 60)
    alone = metrics.point_bootstrap_ci(labels, probs, 0.5, n_boot=500)
    tiled = np.tile(labels, 12), np.tile(probs, 12)
    grouped = metrics.point_bootstrap_ci(*tiled, 0.5, n_boot=500, groups=np.tile(np.arange(60), 12))
    assert grouped == alone
    rows = metrics.point_bootstrap_ci(*tiled, 0.5, n_boot=500)
    width = lambda ci: ci["specificity"][1] - ci["specificity"][0]  # noqa: E731
    assert width(rows) < width(grouped) / 2
