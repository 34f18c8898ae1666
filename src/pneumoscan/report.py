"""Tables, plots and the HTML report of a comparison of models on the test split."""

from __future__ import annotations

import base64
import html
import sys
from pathlib import Path

import numpy as np

from pneumoscan.evaluate import Evaluation
from pneumoscan.metrics import POINTS
from pneumoscan.model_folder import LoadedModel


def print_evaluations(results: list[Evaluation]) -> None:
    """A readable table on stdout: each model on the whole set, then on each source and view
    (when the set has several), sensitivity and specificity with their 95% intervals."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Results ({results[0].split} split, n={results[0].n})" if results else "Results"
    )
    columns = (
        "model",
        "images",
        "AUC (95% CI)",
        "ECE",
        "point",
        "thresh",
        "acc",
        "sens (95% CI)",
        "spec (95% CI)",
        "prec",
        "F1",
        "TP/FP/TN/FN",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("model", "images", "point") else "right"
        )
    for result in results:
        for r in [result, *result.breakdown]:
            first = r is result
            for i, (name, p) in enumerate(r.operating_points.items()):
                ci = r.point_cis[name]
                table.add_row(
                    (r.model if first else "") if i == 0 else "",
                    f"{r.subset} ({r.n})" if i == 0 else "",
                    f"{r.auc:.3f} ({r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f})" if i == 0 else "",
                    f"{r.ece:.3f}" if i == 0 else "",
                    name,
                    f"{p.threshold:.3f}",
                    f"{p.accuracy:.3f}",
                    f"{p.sensitivity:.3f} ({ci['sensitivity'][0]:.2f}-{ci['sensitivity'][1]:.2f})",
                    f"{p.specificity:.3f} ({ci['specificity'][0]:.2f}-{ci['specificity'][1]:.2f})",
                    f"{p.precision:.3f}",
                    f"{p.f1:.3f}",
                    f"{p.tp}/{p.fp}/{p.tn}/{p.fn}",
                )
        table.add_section()
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def shown_probability(p: float, digits: int = 3) -> str:
    """A probability as a person reads it: one that rounds to 1 or 0 at `digits` decimals is
    shown as beyond the last step ("> 0.999", "< 0.001"), since no calibration off its own
    population supports a certainty (the page does the same at 2 decimals). The JSON, CSV and
    API keep the number itself."""
    step = 10.0**-digits
    if p >= 1 - step / 2:
        return f"> {1 - step:.{digits}f}"
    if p < step / 2:
        return f"< {step:.{digits}f}"
    return f"{p:.{digits}f}"


def print_predictions(results: list) -> None:
    """Screening results as a readable table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("file", "P(pneumonia)", "threshold", "result"):
        table.add_column(
            column, justify="right" if column in ("P(pneumonia)", "threshold") else "left"
        )
    for r in results:
        if r.error:
            verdict = f"[red]error: {r.error}[/red]"
        elif r.ood:
            verdict = f"[yellow]{r.warning}[/yellow]"
        else:
            verdict = f"[bold]{r.label}[/bold]" if r.label == "PNEUMONIA" else r.label
            if r.warning:
                verdict += f" [yellow]({r.warning})[/yellow]"
        # A score of what is not a chest X-ray means nothing: not shown.
        probability = "" if r.probability is None or r.ood else shown_probability(r.probability)
        threshold = "" if r.threshold is None else f"{r.threshold:.3f}"
        table.add_row(r.file, probability, threshold, verdict)
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def write_predictions_csv(results: list, path: Path) -> None:
    """One row per file with the same fields as the JSON output."""
    import csv

    from pneumoscan.screening import FIELDS

    extra = ("heatmap",) if any(r.heatmap for r in results) else ()
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*FIELDS, *extra], extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow(r.to_dict())


def markdown_table(results: list[Evaluation]) -> str:
    """The study's "Results (Test set)" table."""
    lines = [
        "| model | AUC (95% CI) | ECE | operating point | threshold | accuracy | sensitivity | specificity | precision | F1 |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, p in r.operating_points.items():
            lines.append(
                f"| {r.model} | {r.auc:.3f} ({r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f}) | {r.ece:.3f} | {name} | {p.threshold:.3f} | "
                f"{p.accuracy:.3f} | {p.sensitivity:.3f} | {p.specificity:.3f} | {p.precision:.3f} | {p.f1:.3f} |"
            )
    return "\n".join(lines) + "\n"


def write_benchmark(results: list[tuple[LoadedModel, Evaluation]], out: Path) -> list[Path]:
    """Write results.md, the PNG plots and a self-contained report.html into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    evaluations = [e for _, e in results]
    plots = {
        "roc.png": _plot_roc(evaluations),
        "confusion.png": _plot_confusion(evaluations),
        "thresholds.png": _plot_thresholds(evaluations),
        "training.png": _plot_training([m for m, _ in results]),
        "calibration.png": _plot_calibration(evaluations),
    }
    written = []
    for name, figure in plots.items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(out / name)
    table = markdown_table(evaluations)
    (out / "results.md").write_text(f"## Results (Test set, n={evaluations[0].n})\n\n{table}")
    written.append(out / "results.md")
    (out / "report.html").write_text(_html(results, table, out, list(plots)))
    written.append(out / "report.html")
    return written


def _plot_roc(results: list[Evaluation]):
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r in results:
        fpr, tpr, _ = roc_curve(r.labels, r.probs)
        ax.plot(fpr, tpr, label=f"{r.model} (AUC {r.auc:.3f})")
        for name, marker in zip(POINTS, ("o", "s"), strict=True):
            p = r.operating_points[name]
            ax.plot(1 - p.specificity, p.sensitivity, marker, color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="ROC, test split (o balanced, s detection)",
    )
    ax.legend(loc="lower right")
    return fig


def _plot_confusion(results: list[Evaluation]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(POINTS), len(results), figsize=(3.2 * len(results), 6), squeeze=False
    )
    for col, r in enumerate(results):
        for row, name in enumerate(POINTS):
            p = r.operating_points[name]
            matrix = np.array([[p.tn, p.fp], [p.fn, p.tp]])
            ax = axes[row][col]
            ax.imshow(matrix, cmap="Blues")
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    color="white" if v > matrix.max() / 2 else "black",
                )
            ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
            ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
            ax.set(
                title=f"{r.model}: {name} @ {p.threshold:.2f}", xlabel="predicted", ylabel="true"
            )
    fig.tight_layout()
    return fig


def _plot_thresholds(results: list[Evaluation]):
    import matplotlib.pyplot as plt

    from pneumoscan import metrics

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    grid = np.linspace(0, 1, 201)
    for ax, r in zip(axes[0], results, strict=True):
        points = [metrics.point_metrics(r.labels, r.probs, t) for t in grid]
        for attr in ("sensitivity", "specificity", "accuracy"):
            ax.plot(grid, [getattr(p, attr) for p in points], label=attr)
        for name, style in zip(POINTS, ("--", ":"), strict=True):
            ax.axvline(
                r.operating_points[name].threshold, linestyle=style, color="black", label=name
            )
        ax.set(xlabel="threshold on P(pneumonia)", title=f"{r.model}, test split", ylim=(0, 1.02))
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_calibration(results: list[Evaluation]):
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r in results:
        observed, predicted = calibration_curve(r.labels, r.probs, n_bins=10, strategy="quantile")
        ax.plot(predicted, observed, marker="o", label=f"{r.model} (ECE {r.ece:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="predicted P(pneumonia)",
        ylabel="observed fraction with pneumonia",
        title="Reliability, test split (calibrated on validation)",
    )
    ax.legend(loc="upper left")
    return fig


def _plot_training(models: list[LoadedModel]):
    import matplotlib.pyplot as plt

    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in models:
        history = m.meta["training"]["history"]
        epochs = [h["epoch"] for h in history]
        line = loss_ax.plot(epochs, [h["train_loss"] for h in history], label=f"{m.name} train")[0]
        loss_ax.plot(
            epochs,
            [h["val_loss"] for h in history],
            "--",
            color=line.get_color(),
            label=f"{m.name} validation",
        )
        auc_ax.plot(epochs, [h["val_auc"] for h in history], marker=".", label=m.name)
    loss_ax.set(xlabel="epoch", ylabel="weighted BCE loss", title="Training curves")
    auc_ax.set(xlabel="epoch", ylabel="AUC", title="Validation AUC (patient-grouped, from train)")
    loss_ax.legend(fontsize=8)
    auc_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _html(
    results: list[tuple[LoadedModel, Evaluation]], table_md: str, out: Path, plots: list[str]
) -> str:
    rows = []
    for model, e in results:
        t = model.meta["training"]
        rows.append(
            f"<tr><td>{html.escape(model.name)}</td><td>{t['device']}</td><td>{t['wall_time_s']}</td>"
            f"<td>{t['best_epoch']}/{t['epochs_run']}</td><td>{model.meta['validation']['auc']:.4f}</td>"
            f"<td>{e.auc:.4f}</td><td>{e.ece:.3f}</td></tr>"
        )
    table_rows = []
    for line in table_md.strip().splitlines()[2:]:
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        table_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{name}</figcaption></figure>'
        for name in plots
    )
    n = results[0][1].n
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pneumoscan benchmark</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#111}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>pneumoscan: results on the test split (n={n})</h1>
<p>Thresholds, calibration and model selection were fixed on a validation set carved from train by
patient; the test split was scored once. <b>balanced</b> maximises Youden's J on validation;
<b>detection</b> is the highest threshold with validation sensitivity &ge; 0.98.</p>
<table><tr><th>model</th><th>AUC (95% CI)</th><th>ECE</th><th>point</th><th>threshold</th><th>accuracy</th>
<th>sensitivity</th><th>specificity</th><th>precision</th><th>F1</th></tr>{"".join(table_rows)}</table>
<h2>Training</h2>
<table><tr><th>model</th><th>hardware</th><th>wall time (s)</th><th>best epoch</th><th>validation AUC</th>
<th>test AUC</th><th>test ECE</th></tr>{"".join(rows)}</table>
{images}
<p>Research software, not a medical device.</p></body></html>
"""
