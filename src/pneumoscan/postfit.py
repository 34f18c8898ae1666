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
    model: model_folder.LoadedModel,
    data_root: data.DataSets,
    reference: data.DataSets | None = None,
) -> model_folder.LoadedModel:
    """Fit the guard, calibration and operating points of `model`; save and reload it.

    The guard holds a Gaussian per training source, each with its own threshold; `reference`
    adds chest X-rays of populations the model was not trained on (e.g. adults, for a model of
    children), fitted on 80% of their patients and thresholded on the rest: an image most like
    one of them is never `in_domain`.
    """
    cfg = saved_config(model.meta)
    d = data.training_data(
        data_root, cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design
    )
    if d.fingerprint != model.meta["data"]["fingerprint"]:
        raise PneumoscanError(
            f"--data {data_root}: not the data this model was trained on (fingerprint differs)"
        )
    guard_spec = {"method": guard.DESCRIPTION, **guard.INPUT}
    member = model_folder.guard_member({**model.meta, "ood": guard_spec})
    if member is not None:
        trunk = model.network.members[member].trunk
    else:
        from pneumoscan.models import imagenet_trunk

        trunk = imagenet_trunk(guard.FROZEN_STAGES, **guard.INPUT)
    trunk = trunk.to(memory_format=torch.channels_last)
    sources = d.sources
    sets = {
        source: (
            _pooled(trunk, d.images, d.train_idx[sources[d.train_idx] == source], cfg.batch_size),
            _pooled(trunk, d.images, d.val_idx[sources[d.val_idx] == source], cfg.batch_size),
            True,
        )
        for source in d.manifest.source_names
    }
    references = {}
    if reference is not None:
        references = _reference_sets(reference, trunk, cfg.image_size, cfg.batch_size, sets)
    if len(sets) == 1 and not references:
        ood, ood_threshold, _ = guard.fit(*next(iter(sets.values()))[:2])
        ood_meta = {**guard_spec, "threshold": ood_threshold}
    else:
        ood, populations = guard.fit_populations(
            {**sets, **{name: entry[:3] for name, entry in references.items()}}
        )
        ood_meta = {**guard_spec, "populations": [p.to_dict() for p in populations]}
        for entry in ood_meta["populations"]:
            if not entry["own"]:
                entry["data"] = references[entry["name"]][3]
    meta = {**model.meta, "ood": ood_meta}
    model_folder.save(
        model.folder,
        model.network,
        meta,  # save() renews the rest
        dtype=getattr(torch, model.meta["weights"]["dtype"]),
        ood=ood,
    )
    fitted = model_folder.load(model.folder)
    val = d.val
    labels = val.labels
    views = view_scores(fitted, val.files)
    plain_logits, plain_distances = fitted.raw_scores(d.images[d.val_idx])
    logits = np.concatenate([plain_logits, *(z for z, _ in views.values())])
    rows = 1 + len(views)
    val_sources = np.asarray(val.sources)
    several = len(sets) > 1
    fitted.meta.update(
        metrics.fit_operating_points(
            np.tile(labels, rows),
            logits,
            cfg.detection_sensitivity,
            source=STRESSED,
            groups=np.tile(val.groups, rows),
            populations=np.tile(val_sources, rows) if several else None,
        )
    )
    probs = fitted.calibrate(plain_logits)
    for point in fitted.meta["operating_points"].values():
        point["validation_plain"] = metrics.point_metrics(
            labels, probs, point["threshold"]
        ).to_dict()
    fitted.meta["validation"] = {
        "auc": metrics.within_source_auc(labels, plain_logits, val_sources),
        "auc_under_views": metrics.within_source_auc(
            np.tile(labels, rows), logits, np.tile(val_sources, rows)
        ),
        "n": len(labels),
        "patients": d.n_val_patients,
        "views": list(views),
    }
    if several:
        fitted.meta["validation"]["auc_rule"] = "mean of each source's own AUC"
        fitted.meta["validation"]["populations"] = {
            source: {
                "auc": metrics.auc(
                    labels[val_sources == source], plain_logits[val_sources == source]
                ),
                "n": int((val_sources == source).sum()),
            }
            for source in d.manifest.source_names
        }
    distances = np.concatenate([dist for _, dist in views.values()])
    fitted.meta["ood"].update(domain.outer_section(distances, len(labels), fitted.meta["ood"]))
    tiers = fitted.assess(plain_distances)[0]
    fitted.meta["ood"]["validation_pass_rate"] = float(
        np.mean([t == domain.IN_DOMAIN for t in tiers])
    )
    model_folder.write_meta(fitted.folder, fitted.meta)
    return fitted


def _reference_sets(
    reference: data.DataSets, trunk, size: int, batch_size: int, own: dict
) -> dict[str, tuple]:
    """Reference populations' guard features: {name: (train, validation, False, record)}."""
    listed = data.read_all(reference, "train")
    images, kept = data.load_images(listed, size)
    out = {}
    for source in kept.source_names:
        if source in own:
            raise PneumoscanError(
                f"--reference {source}: the model was trained on it; a reference population "
                "is one it was not"
            )
        index = kept.of_source(source)
        part = kept.subset(index)
        train, held = data.carve(part, 0.2)
        position = {f: i for i, f in zip(index, part.files, strict=True)}
        train_idx = np.asarray([position[f] for f in train.files])
        held_idx = np.asarray([position[f] for f in held.files])
        record = {"images": len(index), "fingerprint": data.fingerprint(part.files)}
        out[source] = (
            _pooled(trunk, images, train_idx, batch_size),
            _pooled(trunk, images, held_idx, batch_size),
            False,
            record,
        )
    return out


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
