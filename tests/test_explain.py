"""Grad-CAM heatmaps and their PNG overlay, on real X-rays and real models."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan import explain, model_folder, reader
from pneumoscan.errors import PneumoscanError


@pytest.fixture(scope="module", params=["cnn", "transfer"])
def model(request: pytest.FixtureRequest) -> model_folder.LoadedModel:
    """The bundled, fully trained models: a few-step model's evidence can be empty."""
    return model_folder.load(request.param)


@pytest.fixture(scope="module")
def tiny_cnn(tiny_models: dict[str, Path]) -> model_folder.LoadedModel:
    return model_folder.load(tiny_models["cnn"])


def _state(model: model_folder.LoadedModel) -> tuple[list[bool], list[bool]]:
    network = model.network
    return [m.training for m in network.modules()], [p.requires_grad for p in network.parameters()]


def test_heatmap_is_a_map_inside_the_image(
    model: model_folder.LoadedModel, xray_files: list[Path]
) -> None:
    size = model.input_size
    for path in (xray_files[0], xray_files[-1]):  # one NORMAL, one PNEUMONIA
        image = reader.load(path, size)
        label = model.class_names[
            int(model.probabilities(image[None])[0] >= model.threshold("balanced"))
        ]
        cam = explain.heatmap(model, image, label)  # the evidence for what the model decided
        assert cam.shape == (size, size)
        assert cam.dtype == np.float32
        assert np.isfinite(cam).all()
        assert cam.min() >= 0.0 and cam.max() <= 1.0
        assert cam.std() > 0.01, f"{path.name}: the map is uniform"
        rows, cols = np.indices(cam.shape)
        centroid = (float((rows * cam).sum() / cam.sum()), float((cols * cam).sum() / cam.sum()))
        assert all(0 <= c <= size - 1 for c in centroid)
        assert cam[1:-1, 1:-1].sum() > 0.5 * cam.sum(), "the mass lies on the border"


def test_heatmap_is_deterministic(model: model_folder.LoadedModel, xray_files: list[Path]) -> None:
    image = reader.load(xray_files[-1], model.input_size)
    assert np.array_equal(explain.heatmap(model, image), explain.heatmap(model, image))


@pytest.mark.parametrize("training", [False, True])
def test_heatmap_leaves_the_model_as_it_found_it(
    model: model_folder.LoadedModel, xray_files: list[Path], training: bool
) -> None:
    image = reader.load(xray_files[-1], model.input_size)
    model.network.train(training)
    try:
        before = _state(model)
        explain.heatmap(model, image)
        assert _state(model) == before
        for module in model.network.modules():
            assert not module._forward_hooks and not module._backward_hooks
        assert all(p.grad is None for p in model.network.parameters())
    finally:
        model.network.eval()


def test_target_layer_feeds_the_global_pooling(tiny_models: dict[str, Path]) -> None:
    transfer = model_folder.load(tiny_models["transfer"]).network.head
    pool = next(i for i, m in enumerate(transfer) if type(m).__name__ == "AdaptiveAvgPool2d")
    assert explain.target_layer(transfer) is transfer[pool - 1]  # conv_head + bn2 (+ act)
    cnn = model_folder.load(tiny_models["cnn"]).network.head
    pool = next(i for i, m in enumerate(cnn) if type(m).__name__ == "AdaptiveAvgPool2d")
    # The last stage's activation, before its max-pool halves the resolution.
    assert type(cnn[pool - 1]).__name__ == "MaxPool2d"
    assert explain.target_layer(cnn) is cnn[pool - 2]
    assert type(cnn[pool - 2]).__name__ == "ReLU"


def test_dense_model_is_refused(tiny_models: dict[str, Path], xray_files: list[Path]) -> None:
    dense = model_folder.load(tiny_models["dense"])
    with pytest.raises(PneumoscanError, match="dense has no spatial layer"):
        explain.heatmap(dense, reader.load(xray_files[0], dense.input_size))


def test_wrong_image_size_is_refused(
    tiny_cnn: model_folder.LoadedModel, xray_files: list[Path]
) -> None:
    with pytest.raises(PneumoscanError, match=r"reader\.load"):
        explain.heatmap(tiny_cnn, reader.load(xray_files[0], tiny_cnn.input_size * 2))


def _decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("max_side", [512, 100])
def test_overlay_png_fits_and_shows_the_heatmap(
    tiny_cnn: model_folder.LoadedModel, xray_files: list[Path], max_side: int
) -> None:
    original = reader.read_image(xray_files[-1])[:, 20:200]  # not square
    cam = explain.heatmap(tiny_cnn, reader.resize(original, tiny_cnn.input_size))
    pixels = _decode(explain.overlay_png(original, cam, 0.93, "PNEUMONIA", 0.41, max_side))
    height, width = original.shape
    assert max(pixels.shape[:2]) == max_side
    assert pixels.shape[1] / pixels.shape[0] == pytest.approx(width / height, rel=0.01)
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    assert ((r != g) | (g != b)).mean() > 0.5, "no colour overlay"


def test_overlay_png_captions_the_outcome_and_places_the_map(xray_files: list[Path]) -> None:
    original = reader.load(xray_files[0], 600)[:, :480]  # larger than max_side, not square
    rows, cols = np.indices((128, 128))
    cam = np.exp(-((rows - 64) ** 2 + (cols - 40) ** 2) / 400.0).astype(np.float32)
    scored = _decode(explain.overlay_png(original, cam, 0.12, "NORMAL", 0.41, max_side=300))
    unscored = _decode(explain.overlay_png(original, cam, 0.12, None, 0.41, max_side=300))
    assert scored.shape == unscored.shape == (300, 240, 3)
    # The caption strip differs with the outcome; the picture above it does not.
    assert not np.array_equal(scored[-20:], unscored[-20:])
    assert np.array_equal(scored[:200], unscored[:200])
    # The map lands where it belongs: warm (red) at its peak, cold (blue) far from it.
    red, blue = scored[..., 0].astype(int), scored[..., 2].astype(int)
    peak, far = (150, 75), (150, 220)  # (64, 40) and (64, 117) on the 128x128 map
    assert red[peak] > blue[peak] and blue[far] > red[far]


def test_heavy_libraries_load_only_when_used() -> None:
    code = (
        "import sys, pneumoscan.explain; "
        "print(sorted(m for m in ('pytorch_grad_cam', 'matplotlib', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
