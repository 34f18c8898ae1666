"""Site calibration: refit a model's calibration and operating points on a site's own labelled
images, without touching its weights, into a complete new model folder.

A site's films differ from the training hospital's (exposure, equipment, patients), so the
probabilities and thresholds fitted on the training validation split do not hold there. The
weights, guard and ONNX graph are copied as they are (their checksums still hold); model.json
gets the new calibration and points and says where they came from.
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan import data, metrics, model_folder
from pneumoscan.errors import PneumoscanError


@dataclass
class SiteData:
    """A site's labelled images, read and resized for one model."""

    manifest: data.Manifest
    images: np.ndarray
    skipped: int = 0  # unreadable files (each named in a warning)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest.labels

    def counts(self, class_names: list[str]) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(class_names)}


def read_site(site: data.DataSets, class_names: list[str], size: int) -> SiteData:
    """The site's images (`data.read_all`: class folders, a CSV, ...) for a model's classes."""
    listed = data.read_all(site, "train")
    if listed.class_names != class_names:
        raise PneumoscanError(
            f"--data {site}: needs the model's classes ({', '.join(class_names)}); found "
            f"{', '.join(listed.class_names)}"
        )
    images, kept = data.load_images(listed, size)
    for index, name in enumerate(class_names):
        if not (kept.labels == index).any():
            raise PneumoscanError(f"--data {site}: no readable {name} image")
    return SiteData(kept, np.asarray(images), len(listed) - len(kept))


@dataclass
class SiteCalibration:
    """What `calibrate` fitted, and how well the sample supports it."""

    model: model_folder.ModelCard
    counts: dict[str, int]
    ece_before: float
    ece_after: float
    points: dict[str, dict]  # name -> threshold, sensitivity, specificity and their intervals
    warnings: list[str]
    skipped: int  # unreadable files, each named in a warning as it was read


def min_positives(target: float, level: float = 0.95) -> int:
    """Positives needed for a perfect score's exact lower bound to reach `target`."""
    alpha = (1 - level) / 2
    return int(np.ceil(np.log(alpha) / np.log(target)))


def calibrate(
    model: str | Path,
    site: data.DataSets,
    out: Path,
    target_sensitivity: float = metrics.DETECTION_SENSITIVITY,
    force: bool = False,
) -> SiteCalibration:
    """Refit calibration and both points of `model` on `site`'s images; write the folder `out`."""
    from pneumoscan import runtime

    if not 0.5 <= target_sensitivity < 1:
        raise PneumoscanError(
            f"--target-sensitivity {target_sensitivity}: give a value in [0.5, 1)"
        )
    source = model_folder.resolve(model)
    if out.exists() and not force:
        raise PneumoscanError(f"--out {out}: already exists; pass --force to replace it")
    if out.resolve() == source.resolve():
        raise PneumoscanError(f"--out {out}: is the model's own folder; give a new one")
    scorer = runtime.load(model)
    site_data = read_site(site, scorer.class_names, scorer.input_size)
    logits, _ = scorer.raw_scores(site_data.images)
    labels = site_data.labels
    sources = np.asarray(site_data.manifest.sources)
    fitted = metrics.fit_operating_points(
        labels,
        logits,
        target_sensitivity,
        source="site images",
        groups=site_data.manifest.groups,
        populations=sources if len(set(sources)) > 1 else None,
    )
    meta = json.loads(json.dumps(scorer.meta))  # a deep copy
    meta.update(fitted)
    meta.pop(model_folder.EXTERNAL_KEY, None)  # its labels were at the thresholds replaced
    counts = site_data.counts(scorer.class_names)
    meta["site_calibration"] = {
        "date": datetime.date.today().isoformat(),
        "counts": counts,
        "fingerprint": data.fingerprint(site_data.manifest.files),
        "skipped": site_data.skipped,
        "target_sensitivity": target_sensitivity,
        "from": {
            "model": scorer.name,
            "calibration": scorer.meta.get("calibration"),
            "operating_points": {
                k: v["threshold"] for k, v in scorer.meta["operating_points"].items()
            },
        },
    }
    _write_folder(source, out, meta)
    calibrated = model_folder.read_card(out)
    points = {
        name: {
            "threshold": point["threshold"],
            "sensitivity": point["validation"]["sensitivity"],
            "specificity": point["validation"]["specificity"],
            "sensitivity_ci": tuple(point["sensitivity_ci"]),
            "specificity_ci": tuple(point["specificity_ci"]),
        }
        for name, point in fitted["operating_points"].items()
    }
    warnings = []
    positives = counts[scorer.class_names[1]]
    needed = min_positives(target_sensitivity)
    if positives < needed:
        best = (0.025) ** (1 / positives)
        warnings.append(
            f"{positives} {scorer.class_names[1]} images cannot support sensitivity "
            f"{target_sensitivity}: even all found, its 95% lower bound is {best:.3f}; "
            f"{needed} or more are needed"
        )
    return SiteCalibration(
        model=calibrated,
        counts=counts,
        ece_before=metrics.expected_calibration_error(labels, scorer.calibrate(logits)),
        ece_after=fitted["calibration"]["validation_ece_after"],
        points=points,
        warnings=warnings,
        skipped=site_data.skipped,
    )


def _write_folder(source: Path, out: Path, meta: dict) -> None:
    """Copy the model folder beside `out`, write its new model.json, then move it into place."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    (staging / model_folder.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
