"""The `pneumoscan` command: a thin layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

from pneumoscan.errors import PneumoscanError

app = typer.Typer(
    help="Pneumonia detection in chest X-rays: train, evaluate and compare the study's models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DATA_OPTION = typer.Option(
    ..., "--data", help="Data root holding {train,val,test}/{NORMAL,PNEUMONIA}/."
)


def _stderr(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="dense, cnn or transfer."),
    data: Path = DATA_OPTION,
    out: Path = typer.Option(..., "--out", help="Folder to write the trained model to."),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Override the config's epochs."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", min=32, help="Input size (default 128)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Random seed (training is deterministic on CPU)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    config: Path | None = typer.Option(
        None, "--config", help="A YAML config instead of the bundled one."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop after this many steps."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    force: bool = typer.Option(False, "--force", help="Overwrite a model already in OUT."),
) -> None:
    """Train one model; validation is carved from train by patient, test is never read."""
    from pneumoscan import train as training

    cfg = training.load_config(
        model, config, epochs=epochs, image_size=image_size, seed=seed, max_steps=max_steps
    )
    loaded = training.train(
        cfg,
        data,
        out,
        device_name=device,
        resume=resume,
        force=force,
        log=_stderr,
        progress=sys.stderr.isatty(),
    )
    points = loaded.meta["operating_points"]
    typer.echo(
        f"{out}: validation AUC {loaded.meta['validation']['auc']:.4f}; thresholds "
        + ", ".join(f"{k} {v['threshold']:.3f}" for k, v in points.items())
    )


@app.command()
def evaluate(
    model: list[str] = typer.Option(
        ["transfer"],
        "--model",
        help="Bundled model (dense, cnn, transfer) or a model folder; repeatable.",
    ),
    data: Path = DATA_OPTION,
    split: str = typer.Option("test", "--split", help="Split to score: test, val or train."),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON (one object per model) instead of a table."
    ),
) -> None:
    """Score models on a split at their operating points (fixed on validation beforehand)."""
    from pneumoscan import bundle, report
    from pneumoscan.evaluate import evaluate as run

    models = [bundle.load(m) for m in model]
    results = [run(m, data, split) for m in models]
    if as_json:
        payload = [r.to_dict() for r in results]
        typer.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        report.print_evaluations(results)


@app.command()
def benchmark(
    data: Path = DATA_OPTION,
    out: Path = typer.Option(..., "--out", help="Folder for the models, tables, plots and report."),
    models: str = typer.Option(
        "dense,cnn,transfer", "--models", help="Comma-separated models to train."
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Override every config's epochs."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop each training after N steps."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Overwrite models already in OUT."),
) -> None:
    """Train and evaluate the models; write results.md, PNG plots and report.html to OUT."""
    from pneumoscan import report
    from pneumoscan import train as training
    from pneumoscan.evaluate import evaluate as run

    names = [m.strip() for m in models.split(",") if m.strip()]
    results = []
    for name in names:
        cfg = training.load_config(name, epochs=epochs, max_steps=max_steps)
        _stderr(f"== training {name}")
        loaded = training.train(
            cfg,
            data,
            out / name,
            device_name=device,
            force=force,
            log=_stderr,
            progress=sys.stderr.isatty(),
        )
        results.append((loaded, run(loaded, data, "test")))
    written = report.write_benchmark(results, out)
    report.print_evaluations([r for _, r in results])
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and a non-zero exit."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    except PneumoscanError as exc:
        _stderr(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        _stderr("interrupted")
        sys.exit(130)
