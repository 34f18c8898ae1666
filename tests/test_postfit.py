import shutil
from pathlib import Path

import pytest

from pneumoscan import data, metrics, model_folder, postfit
from pneumoscan.config import saved_config
from pneumoscan.errors import PneumoscanError


def test_refitting_gives_the_calibration_and_thresholds_of_the_validation_logits(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_models["cnn"], tmp_path / "cnn"))
    model = postfit.fit_postprocessing(model_folder.load(folder), small_data)
    cfg = saved_config(model.meta)
    d = data.training_data(
        small_data, cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design
    )
    logits, _ = model.raw_scores(d.images[d.val_idx])
    expected = metrics.fit_operating_points(d.labels[d.val_idx], logits)
    assert model.meta["operating_points"] == expected["operating_points"]
    assert model.meta["calibration"] == expected["calibration"]
    assert model.meta["validation"]["n"] == len(d.val_idx)
    assert model.meta["ood"]["validation_pass_rate"] >= 0.99


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
