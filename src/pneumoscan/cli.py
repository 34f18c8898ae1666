"""The `pneumoscan` command: a thin layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

import pneumoscan
from pneumoscan import DEFAULT_MODEL
from pneumoscan.errors import PneumoscanError
from pneumoscan.extras import require_train

app = typer.Typer(
    help="Pneumonia detection in chest X-rays: screen images, serve a web app, run a DICOM node, "
    "calibrate on a site's images, and train, join, evaluate and export models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_OPTION = typer.Option(
    DEFAULT_MODEL,
    "--model",
    help="Bundled model (ensemble, children-adults, dense, cnn, transfer) or a model folder.",
)
MODE_OPTION = typer.Option(
    "detection", "--mode", help="Operating point: detection (sensitive) or balanced."
)
DATA_OPTION = typer.Option(
    ...,
    "--data",
    help="A data set: a folder in the Kermany layout ({train,val,test}/{NORMAL,PNEUMONIA}/), "
    "a folder with NORMAL/ and PNEUMONIA/, or a CSV (file,label[,patient_id,source,view]); "
    "NAME=PATH names it. Repeatable.",
)


PRECISION_OPTION = typer.Option(
    "fp32",  # runtime.DEFAULT_PRECISION, not imported here: the CLI starts without onnxruntime
    "--precision",
    help="fp32, or int8: the model folder's quantized graph (faster; see docs/performance.md).",
)


EXAMPLE_NOTE = (
    "the examples are test X-rays of Kermany et al. (CC BY 4.0; NOTICE beside them); for the "
    "full study get the data set (Kaggle 'paultimothymooney/chest-xray-pneumonia', or Mendeley "
    "doi:10.17632/rscbjbr9sj.2) and run `pneumoscan evaluate --data DIR` or "
    "`PNEUMOSCAN_DATA=DIR make run`"
)


def _stderr(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def train(
    model: str | None = typer.Option(
        None,
        "--model",
        help="A recipe (dense, cnn, transfer, transfer-wide), or several to train and join: "
        "cnn,transfer (a mixture), transfer+transfer-wide (heads on one frozen trunk); "
        "ensemble: the bundled default's plan. Not with --init.",
    ),
    data: list[str] = typer.Option(
        ...,
        "--data",
        help="Training images: a folder in the Kermany layout (its train/ is read), a folder "
        "with NORMAL/ and PNEUMONIA/, or a CSV (file,label[,patient_id,source,view]); NAME=PATH "
        "names the source. Repeat it to train on several.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder to write the trained model to."),
    init: str | None = typer.Option(
        None,
        "--init",
        help="Fine-tune this trained model (bundled name or folder) on --data: its weights, "
        "recipe and network, at a fifth of the learning rate; validation carved from --data.",
    ),
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
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Train one member per seed (e.g. 0,1,2) and ship their mean: an ensemble.",
    ),
    val_fraction: float | None = typer.Option(
        None,
        "--val-fraction",
        min=0.01,
        max=0.9,
        help="Share of each source's images carved out, by patient, for validation "
        "(recipes: 0.1; --init: 0.2).",
    ),
    val_design: str | None = typer.Option(
        None,
        "--val-design",
        help="How validation is carved from train, by patient: random (default) or earliest "
        "(the first-numbered patients of each series, a hold-out in time).",
    ),
    devices: int = typer.Option(
        1,
        "--devices",
        min=1,
        help="Train in N processes with DDP (GPUs, or CPU processes); several machines: torchrun.",
    ),
) -> None:
    """Train a model, or several and join them, or fine-tune one (--init) on your own images;
    validation is carved from the training images by patient, test is never read."""
    require_train("pneumoscan train")
    from pneumoscan import train as training
    from pneumoscan.config import PLANS, finetune_config, load_plan
    from pneumoscan.join import train_plan

    overrides = {
        "epochs": epochs,
        "image_size": image_size,
        "seed": seed,
        "max_steps": max_steps,
        "val_fraction": val_fraction,
        "val_design": val_design,
    }
    options = {"device_name": device, "progress": sys.stderr.isatty(), "devices": devices}
    if init is not None:
        if model is not None or seeds is not None or config is not None:
            raise PneumoscanError(
                "--init fine-tunes one model: not with --model, --seeds, --config"
            )
        cfg = finetune_config(init, **overrides)
        loaded = training.train(cfg, data, out, resume=resume, force=force, log=_stderr, **options)
    else:
        if model is None:
            raise PneumoscanError("--model: name a recipe (e.g. cnn) or a plan, or give --init")
        members = None
        if seeds is not None:
            try:
                members = [int(s) for s in seeds.split(",")]
            except ValueError:
                raise PneumoscanError(f"--seeds {seeds!r}: write integers, e.g. 0,1,2") from None
        plan = load_plan(model, config, **overrides)
        if len(plan) == 1 and len(plan[0]) == 1 and members is None:
            (cfg,) = plan[0].values()
            loaded = training.train(
                cfg, data, out, resume=resume, force=force, log=_stderr, **options
            )
        else:
            loaded = train_plan(
                plan,
                members or [seed or 0],
                data,
                out,
                resume=resume,
                force=force,
                log=_stderr,
                name=model if model in PLANS else None,
                **options,
            )
    if loaded is None:
        return  # a rank other than 0 under torchrun: rank 0 wrote the model
    points = loaded.meta["operating_points"]
    typer.echo(
        f"{out}: validation AUC {loaded.meta['validation']['auc']:.4f}; thresholds "
        + ", ".join(f"{k} {v['threshold']:.3f}" for k, v in points.items())
    )


@app.command()
def join(
    folders: list[Path] | None = typer.Argument(
        None, help="Model folders trained on the same data (any of dense, cnn, transfer)."
    ),
    data: list[str] = DATA_OPTION,
    out: Path = typer.Option(..., "--out", help="Folder for the joined model."),
    name: str | None = typer.Option(None, "--name", help="The joined model's name."),
    population: list[str] | None = typer.Option(
        None,
        "--population",
        help="SOURCE=MODEL: the model trained on that source is its population's expert, and a "
        "gate scores each image by the expert of the population it is like. Repeat it; give "
        "--data once per population, in the same order.",
    ),
    target_sensitivity: str | None = typer.Option(
        None,
        "--target-sensitivity",
        help="With --population: the detection point's validation sensitivity, one for all "
        "(0.98) or per population (nih_adult=0.92,default=0.98).",
    ),
    reference: list[str] | None = typer.Option(
        None,
        "--reference",
        help="Chest X-rays of a population the model was not trained on (e.g. adults, for a "
        "model of children): an image most like them is never in domain. Repeatable.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a model already in OUT."),
) -> None:
    """Join trained models into one (their mean logit), or models of different populations as
    experts with a gate (--population); refit the guard and thresholds on validation."""
    require_train("pneumoscan join")
    from pneumoscan.join import join_models, join_populations

    if population:
        if folders:
            raise PneumoscanError("--population names every model: give no folders besides")
        experts = dict(_pair(p, "--population") for p in population)
        joined = join_populations(
            experts, data, out, name, _targets(target_sensitivity), reference, force
        )
    else:
        if reference or target_sensitivity:
            raise PneumoscanError("--reference and --target-sensitivity work with --population")
        joined = join_models(folders or [], data, out, name, force)
    points = joined.meta["operating_points"]
    typer.echo(
        f"{out}: {joined.description}, validation AUC {joined.meta['validation']['auc']:.4f}; "
        "thresholds " + ", ".join(f"{k} {v['threshold']:.3f}" for k, v in points.items())
    )


def _pair(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise PneumoscanError(f"{option} {text!r}: write NAME=VALUE")
    return key, value


def _targets(text: str | None) -> float | dict | None:
    """--target-sensitivity: one share, or NAME=share pairs separated by commas."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return float(text)
        return {k: float(v) for k, v in (_pair(t, "--target-sensitivity") for t in text.split(","))}
    except ValueError:
        raise PneumoscanError(
            f"--target-sensitivity {text!r}: write 0.98, or nih_adult=0.92,default=0.98"
        ) from None


@app.command()
def calibrate(
    model: str = MODEL_OPTION,
    data: list[str] = typer.Option(
        ...,
        "--data",
        help="Your site's labelled images: DATA/NORMAL/ and DATA/PNEUMONIA/ (any format, "
        "subfolders searched), or a CSV (file,label[,patient_id,source,view]). Repeatable.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the calibrated model (a new one)."),
    target_sensitivity: float = typer.Option(
        0.98, "--target-sensitivity", help="The detection point's sensitivity on your images."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a folder already at --out."),
) -> None:
    """Refit calibration and both operating points on your site's own images (weights untouched)."""
    from pneumoscan import calibrate as site

    fitted = site.calibrate(model, data, out, target_sensitivity, force)
    counts = ", ".join(f"{n} {name}" for name, n in fitted.counts.items())
    typer.echo(
        f"{out}: {fitted.model.name} calibrated on {counts}; calibration error (ECE) "
        f"{fitted.ece_before:.3f} before, {fitted.ece_after:.3f} after"
    )
    for name, p in fitted.points.items():
        sens, spec = p["sensitivity_ci"], p["specificity_ci"]
        typer.echo(
            f"  {name}: threshold {p['threshold']:.3f}, sensitivity {p['sensitivity']:.3f} "
            f"({sens[0]:.3f}-{sens[1]:.3f}), specificity {p['specificity']:.3f} "
            f"({spec[0]:.3f}-{spec[1]:.3f}) on these images (95% bootstrap)"
        )
    for warning in fitted.warnings:
        _stderr(f"warning: {warning}")


@app.command()
def evaluate(
    model: list[str] = typer.Option(
        [DEFAULT_MODEL],
        "--model",
        help="Bundled model (ensemble, children-adults, dense, cnn, transfer) or a model folder; repeatable.",
    ),
    data: list[str] = DATA_OPTION,
    split: str = typer.Option("test", "--split", help="Split to score: test, val or train."),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON (one object per model) instead of a table."
    ),
) -> None:
    """Score models on a split at their operating points (fixed on validation beforehand)."""
    from pneumoscan import report, runtime
    from pneumoscan.evaluate import evaluate as run

    models = [runtime.load(m) for m in model]
    results = [run(m, data, split) for m in models]
    if as_json:
        payload = [r.to_dict() for r in results]
        typer.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        report.print_evaluations(results)


@app.command()
def benchmark(
    data: list[str] = DATA_OPTION,
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
    require_train("pneumoscan benchmark")
    from pneumoscan import report
    from pneumoscan import train as training
    from pneumoscan.config import load_config
    from pneumoscan.evaluate import evaluate as run

    names = [m.strip() for m in models.split(",") if m.strip()]
    results = []
    for name in names:
        cfg = load_config(name, epochs=epochs, max_steps=max_steps)
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


@app.command()
def predict(
    paths: list[Path] | None = typer.Argument(
        None, help="Image files (JPEG, PNG, TIFF, DICOM) or folders, searched recursively."
    ),
    model: str = MODEL_OPTION,
    mode: str = MODE_OPTION,
    example: bool = typer.Option(
        False,
        "--example",
        help="Screen the example X-rays that ship with pneumoscan (no data set needed).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list, one object per file."),
    csv_file: Path | None = typer.Option(None, "--csv", help="Write the results to this CSV file."),
    heatmaps: Path | None = typer.Option(
        None, "--heatmaps", help="Write a heatmap overlay PNG per image here (Grad-CAM)."
    ),
    sort: bool = typer.Option(
        False, "--sort", help="Order by probability, highest first (a triage list)."
    ),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="onnx (ONNX Runtime, fastest on CPU), torch (needs pneumoscan[train]), or auto: onnx.",
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="Score only part I of N of the files (I/N), to split a batch."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --csv file."),
    dicom_out: Path | None = typer.Option(
        None,
        "--dicom-out",
        help="Write a DICOM structured report (and with --heatmaps a Secondary Capture) here "
        "for every DICOM input, in the input's study.",
    ),
    engine: str = typer.Option(
        "plain",
        "--engine",
        help="plain (this process) or ray (Ray Data: a local Ray, or the cluster at "
        "--ray-address; results stream to --csv or --parquet).",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="--engine ray: join this cluster (auto or HOST:PORT)."
    ),
    parquet: Path | None = typer.Option(
        None, "--parquet", help="--engine ray: write the results to this folder of Parquet parts."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="--engine ray: skip the files the output already holds."
    ),
    precision: str = PRECISION_OPTION,
) -> None:
    """Screen image files. Exit code: 0 all files scored, 2 some files failed (the rest are still
    reported), 1 usage error. Images that do not look like chest X-rays get ood=true and no label."""
    from pneumoscan import report, screening
    from pneumoscan.data import examples
    from pneumoscan.metrics import POINTS

    paths = [*(paths or []), *(examples() if example else [])]
    if not paths:
        raise PneumoscanError("give image files or folders to screen, or --example")
    if mode not in POINTS:
        raise PneumoscanError(f"--mode {mode!r}: choose one of {', '.join(POINTS)}")
    if engine not in ("plain", "ray"):
        raise PneumoscanError(f"--engine {engine!r}: choose plain or ray")
    if engine == "ray":
        given = {"--json": as_json, "--heatmaps": heatmaps, "--sort": sort, "--shard": shard}
        given |= {"--dicom-out": dicom_out, "--backend torch": backend == "torch"}
        output = (csv_file, parquet)
        _predict_on_ray(paths, model, mode, precision, output, ray_address, resume, force, given)
        return
    ray_only = {"--ray-address": ray_address, "--parquet": parquet, "--resume": resume}
    for option, value in ray_only.items():
        if value:
            raise PneumoscanError(f"{option} works with --engine ray")
    if backend not in ("auto", "torch", "onnx"):
        raise PneumoscanError(f"--backend {backend!r}: choose auto, torch or onnx")
    if as_json and csv_file:
        raise PneumoscanError("--json and --csv: choose one")
    if csv_file is not None and csv_file.exists() and not force:
        raise PneumoscanError(f"--csv {csv_file}: file exists; pass --force to overwrite it")
    files = _files_to_screen(paths, shard)
    loaded = _screening_model(model, backend, heatmaps is not None, precision)
    reporter = None
    if dicom_out is not None:
        from pneumoscan import dicom_report

        dicom_report.check_folder(dicom_out)
        reporter = dicom_report.Reporter(loaded, ("sr", "sc") if heatmaps is not None else ("sr",))
    results = pneumoscan.predict(files, model=loaded, mode=mode, heatmaps=heatmaps or False)
    if sort:
        results.sort(key=screening.triage_order)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif csv_file is not None:
        report.write_predictions_csv(results, csv_file)
    else:
        report.print_predictions(results)
    reports = f"; wrote {csv_file}" if csv_file else ""
    if reporter is not None:
        written, skipped = dicom_report.write_folder(reporter, results, dicom_out)
        reports += f"; wrote {written} DICOM object(s) to {dicom_out}" + (
            f" ({skipped} input(s) not DICOM or not scored)" if skipped else ""
        )
    failed = sum(r.error is not None for r in results)
    _stderr(_summary(results, f"{loaded.name} model, {loaded.point_note(mode)}") + reports)
    if example:
        _stderr(EXAMPLE_NOTE)
    if failed:
        raise typer.Exit(2)


def _files_to_screen(paths: list[Path], shard: str | None) -> list[Path]:
    """The files PATHS name (folders searched), part I/N of them with --shard."""
    from pneumoscan import screening

    part = screening.parse_shard(shard) if shard is not None else slice(None)
    scan = screening.scan_paths(paths)
    if scan.note():
        _stderr(scan.note())
    if not scan.files:
        raise PneumoscanError(f"no image files found in {', '.join(str(p) for p in paths)}")
    return scan.files[part]


def _screening_model(model: str, backend: str, heatmaps: bool, precision: str):
    """ONNX Runtime, heatmaps included, unless torch is asked for."""
    if backend == "torch":
        if precision != "fp32":
            raise PneumoscanError("--precision int8 runs on ONNX Runtime: not with --backend torch")
        require_train("--backend torch")
        from pneumoscan import model_folder

        return model_folder.load(model)
    from pneumoscan import runtime

    return runtime.load(model, precision=precision, maps=heatmaps)


def _summary(results: list, what: str) -> str:
    """The line after a screening run: how many scored, shifted, not chest X-rays, failed."""
    failed = sum(r.error is not None for r in results)
    flagged = sum(bool(r.ood) for r in results)
    shifted = sum(r.domain == "shifted" for r in results)
    return (
        f"{len(results) - failed} of {len(results)} files scored ({what})"
        + (f"; {shifted} unlike the training images (less reliable)" if shifted else "")
        + (f"; {flagged} not chest X-rays (no label)" if flagged else "")
        + (f"; {failed} failed" if failed else "")
    )


def _predict_on_ray(paths, model, mode, precision, output, address, resume, force, given) -> None:
    """`predict --engine ray`: refuse what the engine does not do, then stream to the output."""
    from pneumoscan import engine_ray

    csv_file, parquet = output
    for option, value in given.items():
        if value:
            raise PneumoscanError(f"{option} does not work with --engine ray")
    if resume and csv_file is None and parquet is None:
        raise PneumoscanError("--resume needs the output to continue: --csv FILE or --parquet DIR")
    output = engine_ray.open_output(csv_file, parquet, resume, force)
    s = engine_ray.run(paths, output, model, mode, address, precision=precision)
    _stderr(
        f"{s.written - s.failed} of {s.written} files scored in {s.seconds:.1f} s "
        f"({s.written / max(s.seconds, 1e-9):.0f}/s; {model} model, {mode} point)"
        + (f"; {s.skipped} already in the output" if s.skipped else "")
        + (f"; {s.flagged} not chest X-rays (no label)" if s.flagged else "")
        + (f"; {s.failed} failed" if s.failed else "")
        + f"; wrote {csv_file or parquet}"
    )
    if s.failed:
        raise typer.Exit(2)


@app.command()
def export(
    model: str = MODEL_OPTION,
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write (dynamic batch)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Export a model (classifier and not-a-chest-X-ray guard) to ONNX."""
    require_train("pneumoscan export")
    from pneumoscan import model_folder
    from pneumoscan.export import export_onnx

    if onnx.exists() and not force:
        raise PneumoscanError(f"--onnx {onnx}: file exists; pass --force to overwrite it")
    loaded = model_folder.load(model)
    export_onnx(loaded.scorer, loaded.input_size, onnx)
    typer.echo(
        f"wrote {onnx}: input 'image' (N, 1, {loaded.input_size}, {loaded.input_size}) float in [0, 1]; "
        "outputs 'logit', 'ood_score'"
        + (" and 'cam' (class activation maps)" if loaded.has_maps else "")
        + "; calibration and thresholds are in the model's model.json"
    )


@app.command()
def serve(
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every network interface)."
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    model: str = MODEL_OPTION,
    max_file_mb: float = typer.Option(
        20, "--max-file-mb", min=0.001, help="Largest accepted upload, per file, in MB."
    ),
    body_timeout: float = typer.Option(
        30,
        "--body-timeout",
        min=0.1,
        help="Seconds a client may pause mid-upload before it gets a 408 (stalled client).",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="A file holding the API token: every /api/v1 call then needs "
        "'Authorization: Bearer <token>' (the page asks for it).",
    ),
    precision: str = PRECISION_OPTION,
) -> None:
    """Serve the screening page at / and the JSON API at /api/v1 (documented at /docs)."""
    import uvicorn

    from pneumoscan import serve as service

    token = service.read_token(token_file) if token_file is not None else None
    web = service.create_app(
        model,
        max_file_bytes=round(max_file_mb * service.MB),
        body_timeout=body_timeout,
        token=token,
        precision=precision,
    )
    _stderr(
        f"serving the {web.state.model.name} model on http://{host}:{port}/ (API docs at /docs)"
        + ("; the API needs its token" if token else "")
        + "; research tool, not a medical device"
    )
    uvicorn.run(web, host=host, port=port)


@app.command()
def listen(
    forward: str = typer.Option(
        ..., "--forward", help="Where reports go: the PACS as AET@HOST:PORT (C-STORE)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: all)."),
    port: int = typer.Option(11112, "--port", min=1, max=65535, help="DICOM port to listen on."),
    ae_title: str = typer.Option("PNEUMOSCAN", "--ae-title", help="This node's AE title."),
    outputs: str = typer.Option(
        "sr",
        "--outputs",
        help="What to send back: sr (a structured report), sc (a heatmap "
        "Secondary Capture), or sr,sc.",
    ),
    model: str = MODEL_OPTION,
    mode: str = MODE_OPTION,
    queue_dir: Path | None = typer.Option(
        None,
        "--queue",
        help="Folder for received images and unsent results (default: the user's cache).",
    ),
    allow: str | None = typer.Option(
        None,
        "--allow",
        help="Accept associations only from these calling AE titles (comma-separated).",
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="PEM certificate: DICOM over TLS."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    uid_root: str | None = typer.Option(
        None,
        "--uid-root",
        help="Your organisation's UID root for the objects made (default: pydicom's).",
    ),
    retry_max: float = typer.Option(
        60,
        "--retry-max",
        min=0.1,
        help="Longest wait, in seconds, between tries to reach --forward.",
    ),
    precision: str = PRECISION_OPTION,
) -> None:
    """Run a DICOM node: X-rays in by C-STORE, reports out to the PACS in the same study."""
    from pneumoscan import dicom_node, dicom_report

    config = dicom_node.NodeConfig(
        forward=dicom_node.Destination.parse(forward),
        host=host,
        port=port,
        ae_title=ae_title,
        outputs=tuple(o.strip() for o in outputs.split(",") if o.strip()),
        model=model,
        mode=mode,
        allow=tuple(a.strip() for a in allow.split(",") if a.strip()) if allow else (),
        tls_cert=tls_cert,
        tls_key=tls_key,
        uid_root=uid_root or dicom_report.DEFAULT_UID_ROOT,
        retry_max_s=retry_max,
        precision=precision,
    )
    if queue_dir is not None:
        config.queue = queue_dir
    dicom_node.serve(config, _stderr)


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 1."""
    import click

    try:  # typer >= 0.2x raises the errors of its own bundled copy of click
        from typer.exceptions import TyperException
    except ImportError:
        TyperException = click.ClickException

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        code = app(standalone_mode=False)
    except (click.ClickException, TyperException) as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if hasattr(exc, "ctx"):  # a usage error: point at the command's help
            command = exc.ctx.command_path if exc.ctx else "pneumoscan"
            message += f" (see `{command} --help`)"
        _stderr(f"error: {message}")
        sys.exit(1)
    except PneumoscanError as exc:
        _stderr(f"error: {exc}")
        sys.exit(1)
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):
        _stderr("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
