"""The ONNX fast path gives the torch backend's answers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import bundle, data, predict, runtime


@pytest.mark.slow
def test_onnx_matches_torch_on_real_test_images(data_root: Path) -> None:
    model = bundle.load("transfer")
    listed = data.list_split(data_root, "test")
    images, _ = data.load_images(listed, model.input_size)
    images = np.asarray(images[::3])  # 208 images of both classes
    logits, distances = model.raw_scores(images)
    onnx_logits, onnx_distances = runtime.runner_for(model).raw_scores(images)
    assert np.abs(model.calibrate(logits) - model.calibrate(onnx_logits)).max() < 1e-4
    assert np.allclose(distances, onnx_distances, rtol=1e-4, atol=1e-3)


def test_onnx_backend_through_predict(tiny_models: dict[str, Path], xray_files: list[Path]) -> None:
    model = bundle.load(tiny_models["cnn"])
    torch_results = list(predict.predict(model, xray_files))
    onnx_results = list(
        predict.predict(model, xray_files, raw_scores=runtime.runner_for(model).raw_scores)
    )
    for a, b in zip(torch_results, onnx_results, strict=True):
        assert a.label == b.label and abs(a.probability - b.probability) < 1e-4 and a.ood == b.ood


def test_export_command_writes_a_dynamic_batch_model(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "model.onnx"
    command = [
        sys.executable,
        "-m",
        "pneumoscan",
        "export",
        "--model",
        str(tiny_models["dense"]),
        "--onnx",
        str(target),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runner = runtime.OnnxRunner(target)
    for n in (1, 5):
        logits, distances = runner.raw_scores(np.zeros((n, 128, 128), np.uint8))
        assert logits.shape == (n,) and distances.shape == (n,)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "--force" in again.stderr
