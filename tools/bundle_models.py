"""Copy trained model folders into the package as its bundled models, weights stored in fp16.

    python tools/bundle_models.py runs/benchmark            # dense, cnn and transfer
    python tools/bundle_models.py runs/benchmark transfer   # only one

The README's results table comes from `pneumoscan evaluate` on the bundled models afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pneumoscan import bundle
from pneumoscan.models import MODEL_NAMES


def main(source: Path, names: list[str]) -> None:
    for name in names:
        model = bundle.load(source / name)
        meta = {
            k: v
            for k, v in model.meta.items()
            if k not in ("weights", "versions", "format_version")
        }
        target = bundle.bundled_dir() / name
        bundle.save(target, model.network, meta, dtype=torch.float16)
        size = (target / bundle.WEIGHTS_FILE).stat().st_size / 2**20
        print(f"{source / name} -> {target} ({size:.1f} MiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(MODEL_NAMES))
