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
from torch import nn

from pneumoscan import guard, metrics
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import MODEL_NAMES, Classifier, create_model, imagenet_trunk

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
GUARD_FILE = "guard.safetensors"
META_FILE = "model.json"
PREPROCESSING = {
    "reader": "any format -> 8-bit greyscale (pneumoscan.reader.read_image)",
    "resize": "whole frame squashed to input_size x input_size, bilinear",
    "scale": "pixel / 255 -> [0, 1], one channel",
}


class Scorer(nn.Module):
    """Images in [0, 1] -> (logits, out-of-distribution distances): what every backend runs."""

    def __init__(self, network: Classifier, ood: guard.Guard | None, shares_trunk: bool):
        super().__init__()
        self.network = network
        self.guard = ood
        # The transfer model's frozen trunk is the guard's feature extractor: run it once.
        self.guard_trunk = (
            None if ood is None or shares_trunk else imagenet_trunk(guard.FROZEN_STAGES)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.guard is None:
            logits = self.network(x)
            return logits, torch.zeros_like(logits)
        if self.guard_trunk is None:
            features = self.network.trunk(x)
            return self.network.head(features).squeeze(1), self.guard(features)
        return self.network(x), self.guard(self.guard_trunk(x))


@dataclass
class LoadedModel:
    """A model ready to score images, with everything model.json says about it."""

    name: str
    folder: Path
    network: Classifier
    meta: dict
    scorer: Scorer

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def ood_threshold(self) -> float | None:
        return self.meta["ood"]["threshold"] if "ood" in self.meta else None

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
    def raw_scores(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Logits and guard distances of uint8 images shaped (N, S, S)."""
        self.scorer.eval()
        logits, distances = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size]))
            x = batch.unsqueeze(1).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            z, d = self.scorer(x)
            logits.append(z.float().numpy())
            distances.append(d.float().numpy())
        if not logits:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return np.concatenate(logits), np.concatenate(distances)

    def probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA."""
        return self.calibrate(self.raw_scores(images, batch_size)[0])


def save(
    folder: Path,
    network: Classifier,
    meta: dict,
    dtype: torch.dtype = torch.float32,
    ood: guard.Guard | None = None,
) -> None:
    """Write weights (and the guard) and metadata; SHA-256 of each file goes into model.json."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "preprocessing": PREPROCESSING,
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _write_tensors(folder / WEIGHTS_FILE, network, dtype),
            "dtype": str(dtype).split(".")[-1],
        },
        "versions": library_versions(),
    }
    if ood is not None:
        meta["ood"] = {
            **meta["ood"],
            "file": GUARD_FILE,
            "sha256": _write_tensors(folder / GUARD_FILE, ood, torch.float32),
        }
    tmp = folder / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_FILE)


def _write_tensors(path: Path, module: nn.Module, dtype: torch.dtype) -> str:
    """Atomically write a module's state as safetensors; return the file's SHA-256."""
    from safetensors.torch import save_file

    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in module.state_dict().items()
    }
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return _sha256(path)


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
    args = dict(meta.get("model_args", {}))
    if meta["architecture"] == "transfer":
        args["pretrained"] = False  # the saved weights replace the ImageNet ones anyway
    network = create_model(meta["architecture"], meta["input_size"], **args)
    network.load_state_dict(_read_tensors(folder, meta["weights"]))
    ood = None
    if "ood" in meta:
        ood = guard.Guard()
        ood.load_state_dict(_read_tensors(folder, meta["ood"]))
    scorer = (
        Scorer(network, ood, shares_guard_trunk(meta)).eval().to(memory_format=torch.channels_last)
    )
    return LoadedModel(meta.get("name", folder.name), folder, network, meta, scorer)


def shares_guard_trunk(meta: dict) -> bool:
    """Whether the model's own frozen trunk is exactly the guard's feature extractor."""
    trainable = meta.get("model_args", {}).get("trainable_blocks", 2)
    return meta["architecture"] == "transfer" and trainable == 7 - guard.FROZEN_STAGES


def _read_tensors(folder: Path, entry: dict) -> dict[str, torch.Tensor]:
    """Read a safetensors file named in model.json after checking its SHA-256."""
    from safetensors.torch import load_file

    path = folder / entry["file"]
    if not path.is_file():
        raise PneumoscanError(f"{path}: file is missing; the model folder is incomplete")
    if _sha256(path) != entry["sha256"]:
        raise PneumoscanError(
            f"{path}: checksum does not match model.json; the file is damaged or was changed"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise PneumoscanError(f"{path}: unreadable tensor file ({exc})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


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
