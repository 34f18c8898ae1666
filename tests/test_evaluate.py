from pathlib import Path

import numpy as np
import pytest

from pneumoscan import data, model_folder
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate import evaluate
from pneumoscan.metrics import POINTS


def test_a_split_is_scored_at_the_models_own_thresholds(
    tiny_models: dict[str, Path], small_data: Path
) -> None:
    model = model_folder.load(tiny_models["cnn"])
    result = evaluate(model, small_data, "test", n_boot=100)
    images, kept = data.load_images(data.list_split(small_data, "test"), 128)
    probs = model.probabilities(images)
    assert result.n == 60 and np.allclose(result.probs, probs)
    assert list(result.operating_points) == list(POINTS)
    for name, point in result.operating_points.items():
        threshold = model.threshold(name)
        assert point.threshold == threshold
        positive = probs >= threshold
        assert point.tp == int((positive & (kept.labels == 1)).sum())
        assert point.fp == int((positive & (kept.labels == 0)).sum())
    payload = result.to_dict()
    assert payload["auc_ci"][0] <= payload["auc"] <= payload["auc_ci"][1]


def test_a_split_with_other_classes_or_one_class_is_refused(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    model = model_folder.load(tiny_models["cnn"])
    normals = sorted((small_data / "test" / "NORMAL").iterdir())[:2]
    for classes in (("CATS", "DOGS"), ("NORMAL", "PNEUMONIA")):
        root = tmp_path / "-".join(classes)
        for name in classes:
            (root / "test" / name).mkdir(parents=True)
        for f in normals:
            (root / "test" / classes[0] / f.name).symlink_to(f)
        (root / "test" / classes[1] / "broken.png").write_bytes(b"not an image")
    with pytest.raises(PneumoscanError, match="differ from the model's"):
        evaluate(model, tmp_path / "CATS-DOGS", "test")  # refused before any image is decoded
    with pytest.raises(PneumoscanError, match="both classes"), pytest.warns(UserWarning):
        evaluate(model, tmp_path / "NORMAL-PNEUMONIA", "test")  # the broken image is skipped
