"""Make trained model folders the package's bundled models, with weights stored in fp16.

    python tools/bundle_models.py DATA_DIR runs/benchmark            # dense, cnn and transfer
    python tools/bundle_models.py DATA_DIR runs/benchmark transfer   # only one
    python tools/bundle_models.py DATA_DIR runs/bundle ensemble      # the default: a joined model

After the conversion the guard, calibration and thresholds are fit again on the model's own
validation split, so they belong to the fp16 weights that ship. The README's results table
then comes from `make run`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pneumoscan import model_folder
from pneumoscan.models import MODEL_NAMES
from pneumoscan.postfit import fit_postprocessing


def main(data_root: Path, source: Path, names: list[str]) -> None:
    for name in names:
        model = model_folder.load(source / name)
        target = model_folder.bundled_dir() / name
        meta = {**model.meta, "name": name}
        model_folder.save(target, model.network, meta, dtype=torch.float16, ood=model.scorer.guard)
        shipped = fit_postprocessing(model_folder.load(target), data_root)
        size = sum(p.stat().st_size for p in target.glob("*.safetensors")) / 2**20
        points = shipped.meta["operating_points"]
        print(
            f"{source / name} -> {target} ({size:.1f} MiB); validation AUC {shipped.meta['validation']['auc']:.4f}, "
            + ", ".join(f"{k} threshold {v['threshold']:.3f}" for k, v in points.items())
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or [*MODEL_NAMES, "ensemble"])
