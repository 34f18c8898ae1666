"""A trained model as a self-describing folder: `weights.safetensors` + `model.json`.

Whoever loads the folder needs nothing else to preprocess, calibrate, threshold and label.
Loading reads tensors and JSON only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from pneumoscan import metrics
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import MODEL_NAMES, Classifier, create_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
PREPROCESSING = {
    "reader": "any format -> 8-bit greyscale (pneumoscan.reader.read_image)",
    "resize": "whole frame squashed to input_size x input_size, bilinear",
    "scale": "pixel / 255 -> [0, 1], one channel",
}


@dataclass
class LoadedModel:
    """A model ready to score images, with everything model.json says about it."""

    name: str
    network: Classifier
    meta: dict

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA from raw logits (Platt scaling fit on validation)."""
        calibration = self.meta.get("calibration", {})
        return metrics.sigmoid(
            calibration.get("scale", 1.0) * logits + calibration.get("bias", 0.0)
        )

    def threshold(self, mode: str) -> float:
        points = self.meta["operating_points"]
        if mode not in points:
            raise PneumoscanError(f"--mode {mode!r}: choose one of {', '.join(points)}")
        return float(points[mode]["threshold"])

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Raw logits of uint8 images shaped (N, S, S)."""
        self.network.eval()
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            x = batch.unsqueeze(1).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            out.append(self.network(x).float().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA."""
        return self.calibrate(self.logits(images, batch_size))


def save(folder: Path, network: Classifier, meta: dict, dtype: torch.dtype = torch.float32) -> None:
    """Write weights and metadata; the weights' SHA-256 is recorded in model.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in network.state_dict().items()
    }
    weights = folder / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "preprocessing": PREPROCESSING,
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _sha256(weights),
            "dtype": str(dtype).split(".")[-1],
        },
        "versions": library_versions(),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load(model: str | Path) -> LoadedModel:
    """Load a bundled model by name (`dense`, `cnn`, `transfer`) or a model folder."""
    folder = resolve(model)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PneumoscanError(f"{folder / META_FILE}: cannot read model metadata ({exc})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PneumoscanError(
            f"{folder}: model format version {version!r} is not supported "
            f"(this pneumoscan reads version {FORMAT_VERSION})"
        )
    weights = folder / meta["weights"]["file"]
    if not weights.is_file():
        raise PneumoscanError(f"{weights}: weights file is missing")
    if _sha256(weights) != meta["weights"]["sha256"]:
        raise PneumoscanError(
            f"{weights}: checksum does not match model.json; the file is damaged or was changed"
        )
    from safetensors.torch import load_file

    args = dict(meta.get("model_args", {}))
    if meta["architecture"] == "transfer":
        args["pretrained"] = False  # the saved weights replace the ImageNet ones anyway
    network = create_model(meta["architecture"], meta["input_size"], **args)
    state = {
        k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()
    }
    network.load_state_dict(state)
    network.eval().to(memory_format=torch.channels_last)
    return LoadedModel(meta.get("name", folder.name), network, meta)


def resolve(model: str | Path) -> Path:
    """A bundled name or a folder holding model.json; a clear error otherwise."""
    text = str(model)
    if text in MODEL_NAMES and not Path(text).is_dir():
        folder = bundled_dir() / text
        if not (folder / META_FILE).is_file():
            raise PneumoscanError(
                f"bundled model {text!r} is not installed; train one with `pneumoscan train`"
            )
        return folder
    folder = Path(text)
    if not (folder / META_FILE).is_file():
        raise PneumoscanError(
            f"--model {text}: not a bundled model ({', '.join(MODEL_NAMES)}) "
            f"nor a folder holding {META_FILE}"
        )
    return folder


def bundled_dir() -> Path:
    return Path(str(resources.files("pneumoscan") / "bundled"))


def library_versions() -> dict:
    import sklearn
    import timm

    from pneumoscan import __version__

    return {
        "pneumoscan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
