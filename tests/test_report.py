import csv
from pathlib import Path

import numpy as np

from pneumoscan import metrics, report
from pneumoscan.evaluate import Evaluation
from pneumoscan.screening import FIELDS, Prediction


def _evaluation(name: str) -> Evaluation:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.4, 0.7, 0.3, 0.6, 0.8, 0.9, 0.95])
    thresholds = {"balanced": 0.5, "detection": 0.25}
    return Evaluation(
        model=name,
        split="test",
        labels=labels,
        probs=probs,
        auc=metrics.auc(labels, probs),
        auc_ci=(0.5, 1.0),
        ece=0.1,
        operating_points={
            p: metrics.point_metrics(labels, probs, thresholds[p]) for p in metrics.POINTS
        },
        point_cis={
            p: metrics.point_bootstrap_ci(labels, probs, thresholds[p]) for p in metrics.POINTS
        },
    )


def test_the_markdown_table_has_a_row_per_model_and_point() -> None:
    table = report.markdown_table([_evaluation("a"), _evaluation("b")])
    rows = table.strip().splitlines()
    assert len(rows) == 2 + 4
    # balanced at 0.5: 4 of 5 positives and 2 of 3 negatives right; accuracy 6/8
    assert (
        rows[2].startswith("| a | ") and "| balanced | 0.500 | 0.750 | 0.800 | 0.667 |" in rows[2]
    )
    assert "| detection | 0.250 |" in rows[3] and "| 1.000 |" in rows[3]


def test_the_printed_table_names_every_model_and_its_counts(capsys) -> None:
    report.print_evaluations([_evaluation("cnn")])
    out = capsys.readouterr().out
    assert "Results (test split, n=8)" in out and "cnn" in out
    assert "4/1/2/1" in out  # balanced: TP/FP/TN/FN


def test_the_predictions_csv_holds_the_result_fields(tmp_path: Path) -> None:
    results = [
        Prediction("a.png", 0.9, "PNEUMONIA", 0.5, "balanced", False, 1.0),
        Prediction("b.png", threshold=0.5, mode="balanced", error="not an image"),
    ]
    path = tmp_path / "out.csv"
    report.write_predictions_csv(results, path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(FIELDS)
    assert rows[0]["label"] == "PNEUMONIA" and rows[1]["error"] == "not an image"
    assert rows[1]["probability"] == ""


def test_no_probability_is_shown_as_a_certainty(capsys, tmp_path: Path) -> None:
    """What rounds to 1 or 0 is shown beyond the last step; the CSV keeps the number."""
    assert report.shown_probability(0.99951) == "> 0.999"
    assert report.shown_probability(0.9994) == "0.999"
    assert report.shown_probability(0.0004) == "< 0.001"
    assert report.shown_probability(0.0005) == "0.001"
    assert report.shown_probability(0.996, digits=2) == "> 0.99"
    assert report.shown_probability(0.004, digits=2) == "< 0.01"
    assert report.shown_probability(0.5) == "0.500"
    results = [
        Prediction("sure.png", 0.99999, "PNEUMONIA", 0.5, "detection", False, 1.0),
        Prediction("clear.png", 0.00001, "NORMAL", 0.5, "detection", False, 1.0),
    ]
    report.print_predictions(results)
    out = capsys.readouterr().out
    assert "> 0.999" in out and "< 0.001" in out and "1.000" not in out
    report.write_predictions_csv(results, tmp_path / "out.csv")
    with (tmp_path / "out.csv").open() as handle:
        assert float(next(csv.DictReader(handle))["probability"]) == 0.99999
