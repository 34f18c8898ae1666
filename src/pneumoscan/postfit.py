"""What follows a trained network, fit on the model's own split through the inference path.

The not-a-chest-X-ray guard on the training images, and its outer tier on validation X-rays
under the shift views (domain.py); then, on validation, Platt calibration and
the two operating points (`metrics.fit_operating_points`). Run after training and after joining,
and again after a model's weights are converted (e.g. to fp16 for bundling), so the thresholds
match the weights that ship.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pneumoscan import data, domain, guard, metrics, model_folder
from pneumoscan.config import saved_config
from pneumoscan.device import trunk_features
from pneumoscan.errors import PneumoscanError


def fit_postprocessing(
    model: model_folder.LoadedModel, data_root: Path
) -> model_folder.LoadedModel:
    """Fit the guard, calibration and operating points of `model`; save and reload it."""
    cfg = saved_config(model.meta)
    d = data.training_data(
        Path(data_root), cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design
    )
    if d.fingerprint != model.meta["data"]["fingerprint"]:
        raise PneumoscanError(
            f"{data_root}: not the data this model was trained on (fingerprint differs)"
        )
    if model_folder.shares_guard_trunk(model.meta):
        trunk = model.network.trunk  # a mixture's: that of its member which shares it
    else:
        from pneumoscan.models import imagenet_trunk

        trunk = imagenet_trunk(guard.FROZEN_STAGES)
    trunk = trunk.to(memory_format=torch.channels_last)
    ood, ood_threshold, pass_rate = guard.fit(
        _pooled(trunk, d.images, d.train_idx, cfg.batch_size),
        _pooled(trunk, d.images, d.val_idx, cfg.batch_size),
    )
    val_labels = d.labels[d.val_idx]
    val_logits, _ = model.raw_scores(d.images[d.val_idx])
    meta = {**model.meta, **metrics.fit_operating_points(val_labels, val_logits)}
    meta["validation"] = {
        "auc": metrics.auc(val_labels, val_logits),
        "n": len(val_labels),
        "patients": d.n_val_patients,
    }
    meta["ood"] = {
        "method": guard.DESCRIPTION,
        "threshold": ood_threshold,
        "validation_pass_rate": pass_rate,
    }
    model_folder.save(
        model.folder,
        model.network,
        meta,  # save() renews the rest
        dtype=getattr(torch, model.meta["weights"]["dtype"]),
        ood=ood,
    )
    fitted = model_folder.load(model.folder)
    fitted.meta["ood"].update(domain.fit_outer(fitted, Path(data_root)))
    model_folder.write_meta(fitted.folder, fitted.meta)
    return fitted


def _pooled(trunk, images: np.ndarray, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """The guard's pooled features of `images[idx]`, computed on the CPU."""
    features = trunk_features(trunk, images, idx, torch.device("cpu"), batch_size)
    return guard.Guard.pool(features).numpy()
