"""What each install brings: `pip install pneumoscan` screens, serves, runs the DICOM node and
calibrates with ONNX Runtime; `pip install 'pneumoscan[train]'` adds PyTorch and what training,
fine-tuning, joining and exporting need. A command that needs the second says so in one line."""

from __future__ import annotations

import importlib.util

from pneumoscan.errors import PneumoscanError

# The modules only pneumoscan[train] installs (import names).
TRAIN_MODULES = ("torch", "torchvision", "timm", "safetensors", "onnx", "yaml")


def missing_train_modules() -> list[str]:
    """The modules of pneumoscan[train] this environment lacks (found without importing them)."""
    return [name for name in TRAIN_MODULES if not _findable(name)]


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_train(what: str) -> None:
    """Refuse `what` in one line where pneumoscan[train] is not installed."""
    missing = missing_train_modules()
    if missing:
        raise PneumoscanError(
            f"{what} needs PyTorch and the training libraries ({', '.join(missing)} not "
            "installed): pip install 'pneumoscan[train]'"
        )
