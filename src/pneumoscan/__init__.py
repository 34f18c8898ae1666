"""pneumoscan: pneumonia detection in chest X-rays.

    import pneumoscan

    model = pneumoscan.load_model()  # the bundled default; or a bundled name, or a model folder
    for result in pneumoscan.predict(["chest.dcm", "scans/"], model=model, heatmaps=True):
        print(result.file, result.probability, result.label, result.domain)

Screening runs on ONNX Runtime and needs no PyTorch; `load_torch` (with pneumoscan[train])
gives a model's network as a torch module, to fine-tune or to take features from. The command
line, the web app and the DICOM node call these same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy as np

    from pneumoscan.model_folder import LoadedModel, ModelCard
    from pneumoscan.screening import Prediction, Source

__version__ = "0.1.0"
# The bundled model used when none is named: chosen on validation (docs/experiments.md, 7).
DEFAULT_MODEL = "ensemble"
__all__ = ["DEFAULT_MODEL", "load_model", "load_torch", "predict", "read_image"]


def load_model(model: str | Path = DEFAULT_MODEL, precision: str = "fp32") -> ModelCard:
    """A bundled model (`ensemble`, `dense`, `cnn`, `transfer`) or a model folder, ready to
    score with ONNX Runtime: `.probabilities(images)`, `.heatmap(image)`, `.meta` (model.json)."""
    from pneumoscan import runtime

    return runtime.load(model, precision=precision)


def predict(
    paths: str | Path | Iterable[Source | str],
    model: str | Path | ModelCard | None = None,
    mode: str = "detection",
    heatmaps: bool | str | Path = False,
    *,
    workers: int | None = None,
) -> list[Prediction]:
    """Screen files, folders (searched recursively) or in-memory `(name, bytes)` uploads: one
    `Prediction` per file, in order, as `pneumoscan predict` gives them (`.to_dict()` is its
    JSON). A file that cannot be read gets an `error` and never stops the others.

    `model`: a loaded model, a bundled name or a model folder (default: the bundled default).
    `mode`: the operating point, `detection` or `balanced`. `heatmaps`: True attaches each
    scored image's overlay as PNG bytes (`heatmap_png`); a folder also writes them there.
    """
    from pneumoscan import screening
    from pneumoscan.metrics import POINTS

    if mode not in POINTS:
        from pneumoscan.errors import PneumoscanError

        raise PneumoscanError(f"--mode {mode!r}: choose one of {', '.join(POINTS)}")
    if isinstance(paths, str | Path):
        paths = [paths]
    sources = []
    for item in paths:
        if isinstance(item, tuple):
            sources.append(item)
        else:
            sources.extend(screening.scan_paths([item]).files)
    folder = None if isinstance(heatmaps, bool) else Path(heatmaps)
    if model is None or isinstance(model, str | Path):
        from pneumoscan import runtime

        model = runtime.load(model or DEFAULT_MODEL, maps=bool(heatmaps))
    results = screening.predict(
        model, sources, mode, workers=workers, heatmaps=folder, explain=bool(heatmaps)
    )
    return list(results)


def read_image(path: str | Path | bytes, size: int | None = None) -> np.ndarray:
    """Any JPEG, PNG, TIFF or DICOM file as an 8-bit greyscale array; with `size`, squashed to
    size x size as a model of that input size sees it."""
    from pneumoscan import reader

    return reader.read_image(path) if size is None else reader.load(path, size)


def load_torch(model: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """A model in PyTorch (needs pneumoscan[train]): `.network` is the torch module (its frozen
    `.trunk` gives features, its `.head` trains), `.scorer` the network with the guard."""
    from pneumoscan import model_folder

    return model_folder.load(model)
