import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import data, domain, metrics, model_folder, postfit, shift
from pneumoscan.config import saved_config
from pneumoscan.errors import PneumoscanError


def test_calibration_and_thresholds_are_fit_on_validation_under_the_shift_views(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_models["cnn"], tmp_path / "cnn"))
    model = postfit.fit_postprocessing(model_folder.load(folder), small_data)
    cfg = saved_config(model.meta)
    d = data.training_data(
        small_data, cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design
    )
    plain, _ = model.raw_scores(d.images[d.val_idx])
    views = postfit.view_scores(model, d.val_files)
    assert list(views) == list(shift.VIEWS)
    rows = 1 + len(views)
    patients = np.asarray([data.patient_id(f.name) for f in d.val_files])
    expected = metrics.fit_operating_points(
        np.tile(d.labels[d.val_idx], rows),
        np.concatenate([plain, *(z for z, _ in views.values())]),
        source=postfit.STRESSED,
        groups=np.tile(patients, rows),
    )
    assert model.meta["calibration"] == expected["calibration"]
    probs = model.calibrate(plain)
    for name, point in model.meta["operating_points"].items():
        assert {k: v for k, v in point.items() if k != "validation_plain"} == expected[
            "operating_points"
        ][name]
        assert (
            point["validation_plain"]
            == metrics.point_metrics(d.labels[d.val_idx], probs, point["threshold"]).to_dict()
        )
        low, high = point["sensitivity_ci"]
        assert low <= point["validation"]["sensitivity"] <= high
    assert model.meta["validation"]["n"] == len(d.val_idx)
    assert model.meta["validation"]["views"] == list(shift.VIEWS)
    assert model.meta["ood"]["validation_pass_rate"] >= 0.99
    largest = max(float(dist.max()) for _, dist in views.values())
    assert model.meta["ood"]["outer_threshold"] == domain.outer_threshold(np.array([largest]))


def test_other_data_than_the_model_was_trained_on_is_refused(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    for class_dir in (small_data / "train").iterdir():
        (other / "train" / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:-1]:  # one image fewer of each class
            (other / "train" / class_dir.name / f.name).symlink_to(f.resolve())
    with pytest.raises(PneumoscanError, match="fingerprint differs"):
        postfit.fit_postprocessing(model_folder.load(tiny_models["cnn"]), other)
