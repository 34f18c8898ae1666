"""The fast path: a model's ONNX graph run by ONNX Runtime, with no torch import.

Every model folder holds `model.onnx` (written by export.py): the same `Scorer` the torch
backend runs, images in [0, 1] shaped (N, 1, S, S) in; logits, guard distances and, for a
network with spatial layers, class activation maps (`cam`, for heatmaps) out. Calibration and
thresholds stay in model.json. Only a folder saved before `model.onnx` was part of it needs
torch (pneumoscan[train]), once, to export its graph into the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import model_folder
from pneumoscan.data import cache_dir
from pneumoscan.errors import PneumoscanError


@dataclass
class OnnxModel(model_folder.ModelCard):
    """A model card with an ONNX Runtime session."""

    session: Any

    def run(self, x: np.ndarray, maps: bool = False) -> tuple[np.ndarray, ...]:
        names = ["logit", "ood_score", "cam"] if maps else ["logit", "ood_score"]
        return tuple(self.session.run(names, {"image": x}))

    @property
    def has_maps(self) -> bool:
        return _gives_maps(self.session)


PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISION = "fp32"  # int8 did not meet the bar on validation: bench/int8.py


def load(
    model: str | Path,
    threads: int | None = None,
    providers: list[str] | None = None,
    precision: str = DEFAULT_PRECISION,
    maps: bool = False,
) -> OnnxModel:
    """A bundled model or model folder, ready to score with ONNX Runtime.

    `providers`: ONNX Runtime execution providers in order of preference (default: the CPU).
    `precision`: fp32, or int8 (the folder's quantized graph, quantize.py). `maps`: heatmaps
    will be drawn; a folder whose graph predates its class activation maps gets a graph that
    gives them, exported once into the cache (which needs torch).
    """
    card = model_folder.read_card(model)
    if precision not in PRECISIONS:
        raise PneumoscanError(f"--precision {precision!r}: choose fp32 or int8")
    if precision == "int8":
        if "onnx_int8" not in card.meta:
            raise PneumoscanError(
                f"{card.folder}: has no int8 graph; add one with tools/add_int8.py FOLDER"
            )
        path = card.file("onnx_int8")
    elif "onnx" in card.meta:
        path = card.file("onnx")
        for key in card.meta["onnx"].get("external", []):
            card.file(key)  # the graph reads its weights from these files: check them too
    else:  # a folder saved before model.onnx was part of it
        path = _exported(card)
    graph = session(path, threads, providers)
    if maps and precision == "fp32" and not _gives_maps(graph) and _spatial(card):
        graph = session(_exported(card), threads, providers)
    return OnnxModel(card.name, card.folder, card.meta, graph)


def _gives_maps(graph: Any) -> bool:
    return "cam" in {o.name for o in graph.get_outputs()}


def _spatial(card: model_folder.ModelCard) -> bool:
    return all(a in model_folder.SPATIAL_ARCHITECTURES for a, _ in model_folder.parts(card.meta))


def _exported(card: model_folder.ModelCard) -> Path:
    """The folder's graph as this pneumoscan exports it, once, into the cache (with torch)."""
    key = card.meta["weights"]["sha256"][:16] + card.meta.get("ood", {}).get("sha256", "")[:8]
    path = cache_dir() / "onnx" / f"{card.name}-{key}-maps.onnx"
    if not path.exists():
        from pneumoscan.export import export_onnx

        loaded = model_folder.load(card.folder)  # needs torch (pneumoscan[train]); says so
        export_onnx(loaded.scorer, loaded.input_size, path)
    return path


def session(path: Path, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session for the graph at `path` (on the CPU unless `providers` say)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in providers or [] if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
        raise PneumoscanError(f"{path}: not a usable ONNX model ({exc})") from None
