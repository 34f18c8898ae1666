"""Make trained model folders the package's bundled models, with weights stored in fp16.

    python tools/bundle_models.py runs/benchmark --data DATA_DIR               # dense, cnn, transfer
    python tools/bundle_models.py runs/benchmark transfer --data DATA_DIR      # only one
    python tools/bundle_models.py runs/bundle ensemble --data DATA_DIR         # a joined model
    python tools/bundle_models.py runs/s40 children-adults --data DATA_DIR \\
        --data experiments/nih_adult/dev.csv                                   # two populations

After the conversion the guard, calibration and thresholds are fit again on the model's own
validation split (every data set it was trained on), so they belong to the fp16 weights that
ship; `--reference` adds populations it was not trained on to its guard (tools/refit.py). The
README's results table then comes from `make run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pneumoscan import model_folder
from pneumoscan.models import MODEL_NAMES
from pneumoscan.postfit import fit_postprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("names", nargs="*", default=[*MODEL_NAMES, "ensemble"])
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--reference", action="append", default=None)
    args = parser.parse_args()
    for name in args.names:
        model = model_folder.load(args.source / name)
        target = model_folder.bundled_dir() / name
        meta = {**model.meta, "name": name}
        model_folder.save(target, model.network, meta, dtype=torch.float16, ood=model.scorer.guard)
        shipped = fit_postprocessing(model_folder.load(target), args.data, args.reference)
        size = sum(p.stat().st_size for p in target.glob("*.safetensors")) / 2**20
        points = shipped.meta["operating_points"]
        print(
            f"{args.source / name} -> {target} ({size:.1f} MiB); validation AUC "
            f"{shipped.meta['validation']['auc']:.4f}, "
            + ", ".join(f"{k} threshold {v['threshold']:.3f}" for k, v in points.items())
        )


if __name__ == "__main__":
    main()
