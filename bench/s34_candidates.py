"""docs/experiments.md section 34: build the candidates as they would ship (fp16, refitted).

    python bench/s34_candidates.py DATA_DIR runs/s34

C3x3: the three C3 seeds (runs/s34/C3-s0..2) joined, -> runs/s34/cnn. E2: the bundled default
with its `cnn` member replaced by C3's seed-0 member, the `transfer` member's weights unchanged,
-> runs/s34/ensemble. Each is saved with fp16 weights and its guard, calibration and thresholds
fitted again on validation, as tools/bundle_models.py does for the bundled models.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from pneumoscan import model_folder
from pneumoscan.join import join_models
from pneumoscan.postfit import fit_postprocessing


def shipped(source: model_folder.LoadedModel, target: Path, name: str) -> None:
    meta = {**source.meta, "name": name}
    model_folder.save(target, source.network, meta, dtype=torch.float16, ood=source.scorer.guard)
    model = fit_postprocessing(model_folder.load(target), data_root)
    print(f"{target}: validation AUC {model.meta['validation']['auc']:.4f}")


def with_member(default: model_folder.LoadedModel, folder: Path, at: int):
    """The default's network and model.json with member `at` replaced by the model in `folder`."""
    member = model_folder.load(folder)
    network = default.network
    network.members[at] = member.network
    meta = copy.deepcopy(default.meta)
    meta["model_args"]["members"][at]["model_args"] = member.meta["model_args"]
    if at == 0:
        meta["training"]["config"] = member.meta["training"]["config"]
    meta["training"]["members"][at].update(
        folder=str(folder),
        model=member.description,
        seed=member.meta["training"]["config"]["seed"],
        validation_auc=member.meta["validation"]["auc"],
        wall_time_s=member.meta["training"]["wall_time_s"],
        config=member.meta["training"]["config"],
    )
    return network, meta


if __name__ == "__main__":
    data_root, runs = Path(sys.argv[1]), Path(sys.argv[2])
    seeds = [runs / f"C3-s{s}" for s in range(3)]
    joined = join_models(seeds, data_root, runs / "C3x3", name="cnn", force=True)
    shipped(joined, runs / "cnn", "cnn")
    default = model_folder.load("ensemble")
    network, meta = with_member(default, seeds[0], 0)
    model_folder.save(runs / "E2", network, {k: v for k, v in meta.items() if k != "ood"})
    shipped(model_folder.load(runs / "E2"), runs / "ensemble", "ensemble")
