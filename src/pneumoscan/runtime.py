"""The fast path: export a model (classifier + guard) to ONNX and run it with ONNX Runtime.

The exported graph is the same `Scorer` the torch backend runs: images in [0, 1] shaped
(N, 1, S, S) in, logits and guard distances out. Calibration and thresholds stay in model.json.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from pneumoscan.bundle import LoadedModel
from pneumoscan.data import cache_dir
from pneumoscan.errors import PneumoscanError

OPSET = 17


def export(model: LoadedModel, path: Path) -> Path:
    """Write the model to `path` as ONNX with a dynamic batch dimension."""
    size = model.input_size
    scorer = model.scorer.eval().to(memory_format=torch.contiguous_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracing chatter is not the user's business
        torch.onnx.export(
            scorer,
            (torch.zeros(2, 1, size, size),),
            str(tmp),
            input_names=["image"],
            output_names=["logit", "ood_score"],
            dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}, "ood_score": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    os.replace(tmp, path)
    model.scorer.to(memory_format=torch.channels_last)
    return path


class OnnxRunner:
    """ONNX Runtime session with the same `raw_scores` interface as the torch backend."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
            raise PneumoscanError(f"{path}: not a usable ONNX model ({exc})") from None

    def raw_scores(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        logits, distances = [], []
        for start in range(0, len(images), batch_size):
            x = np.asarray(images[start : start + batch_size], dtype=np.float32)[:, None] / 255.0
            z, d = self.session.run(None, {"image": x})
            logits.append(z)
            distances.append(d)
        if not logits:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(logits), np.concatenate(distances)


def runner_for(model: LoadedModel) -> OnnxRunner:
    """An ONNX Runtime runner, exporting once into the cache (keyed by the weights' checksum)."""
    key = model.meta["weights"]["sha256"][:16] + model.meta.get("ood", {}).get("sha256", "")[:8]
    path = cache_dir() / "onnx" / f"{model.name}-{key}.onnx"
    if not path.exists():
        export(model, path)
    return OnnxRunner(path)
