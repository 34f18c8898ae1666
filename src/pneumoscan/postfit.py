"""What follows a trained network, fit on the model's own split through the inference path.

The not-a-chest-X-ray guard on the training images. Then every validation X-ray is scored plain
and under each of the shift views (shift.VIEWS: exposure, windowing, blur, noise, framing), the
validation design that carries the shift a model meets elsewhere (docs/experiments.md, section
28): the outer tier of the domain check (domain.py) comes from the views' guard distances, and
Platt calibration and both operating points (`metrics.fit_operating_points`) from all the rows,
with intervals from a bootstrap over validation patients. Run after training and after joining,
and again after a model's weights are converted (e.g. to fp16 for bundling), so the thresholds
match the weights that ship.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pneumoscan import data, domain, guard, metrics, model_folder, reader, shift
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
    guard_spec = {"method": guard.DESCRIPTION, **guard.INPUT}
    member = model_folder.guard_member({**model.meta, "ood": guard_spec})
    if member is not None:
        trunk = model.network.members[member].trunk
    else:
        from pneumoscan.models import imagenet_trunk

        trunk = imagenet_trunk(guard.FROZEN_STAGES, **guard.INPUT)
    trunk = trunk.to(memory_format=torch.channels_last)
    ood, ood_threshold, pass_rate = guard.fit(
        _pooled(trunk, d.images, d.train_idx, cfg.batch_size),
        _pooled(trunk, d.images, d.val_idx, cfg.batch_size),
    )
    meta = {**model.meta, "ood": {**guard_spec, "threshold": ood_threshold}}
    model_folder.save(
        model.folder,
        model.network,
        meta,  # save() renews the rest
        dtype=getattr(torch, model.meta["weights"]["dtype"]),
        ood=ood,
    )
    fitted = model_folder.load(model.folder)
    labels = d.labels[d.val_idx]
    views = view_scores(fitted, d.val_files)
    plain_logits, _ = fitted.raw_scores(d.images[d.val_idx])
    logits = np.concatenate([plain_logits, *(z for z, _ in views.values())])
    patients = np.asarray([data.patient_id(f.name) for f in d.val_files])
    rows = 1 + len(views)
    fitted.meta.update(
        metrics.fit_operating_points(
            np.tile(labels, rows),
            logits,
            source=STRESSED,
            groups=np.tile(patients, rows),
        )
    )
    probs = fitted.calibrate(plain_logits)
    for point in fitted.meta["operating_points"].values():
        point["validation_plain"] = metrics.point_metrics(
            labels, probs, point["threshold"]
        ).to_dict()
    fitted.meta["validation"] = {
        "auc": metrics.auc(labels, plain_logits),
        "auc_under_views": metrics.auc(np.tile(labels, rows), logits),
        "n": len(labels),
        "patients": d.n_val_patients,
        "views": list(views),
    }
    fitted.meta["ood"]["validation_pass_rate"] = pass_rate
    distances = np.concatenate([dist for _, dist in views.values()])
    fitted.meta["ood"].update(domain.outer_section(distances, len(labels)))
    model_folder.write_meta(fitted.folder, fitted.meta)
    return fitted


STRESSED = "validation, plain and under each shift view"


def view_scores(
    model: model_folder.LoadedModel, files: list[Path]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Logits and guard distances of `files` under each shift view (applied to the decoded
    originals, then resized as the reader resizes)."""
    originals = [reader.read_image(f) for f in files]
    scores = {}
    for name, view in shift.VIEWS.items():
        batch = np.stack([reader.resize(view(image), model.input_size) for image in originals])
        scores[name] = model.raw_scores(batch)
    return scores


def _pooled(trunk, images: np.ndarray, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """The guard's pooled features of `images[idx]`, computed on the CPU."""
    features = trunk_features(trunk, images, idx, torch.device("cpu"), batch_size)
    return guard.Guard.pool(features).numpy()
