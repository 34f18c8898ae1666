"""Heatmaps from the class activation maps the graph gives, and their PNG overlay, on real
X-rays and real models."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan import explain, model_folder, reader, runtime
from pneumoscan.errors import PneumoscanError


@pytest.fixture(scope="module", params=["cnn", "transfer", "ensemble"])
def model(request: pytest.FixtureRequest) -> runtime.OnnxModel:
    """The bundled, fully trained models, on ONNX Runtime: a few-step model's evidence can be
    empty."""
    return runtime.load(request.param)


def test_heatmap_is_a_map_inside_the_image(
    model: runtime.OnnxModel, xray_files: list[Path]
) -> None:
    size = model.input_size
    for path in (xray_files[0], xray_files[-1]):  # one NORMAL, one PNEUMONIA
        image = reader.load(path, size)
        label = model.class_names[
            int(model.probabilities(image[None])[0] >= model.threshold("balanced"))
        ]
        cam = model.heatmap(image, label)  # the evidence for what the model decided
        assert cam.shape == (size, size)
        assert cam.dtype == np.float32
        assert np.isfinite(cam).all()
        assert cam.min() >= 0.0 and cam.max() <= 1.0
        assert cam.std() > 0.01, f"{path.name}: the map is uniform"
        rows, cols = np.indices(cam.shape)
        centroid = (float((rows * cam).sum() / cam.sum()), float((cols * cam).sum() / cam.sum()))
        assert all(0 <= c <= size - 1 for c in centroid)
        assert cam[1:-1, 1:-1].sum() > 0.5 * cam.sum(), "the mass lies on the border"


def test_heatmap_is_deterministic_and_scores_as_without_it(
    model: runtime.OnnxModel, xray_files: list[Path]
) -> None:
    images = np.stack([reader.load(f, model.input_size) for f in xray_files])
    assert np.array_equal(model.heatmap(images[-1]), model.heatmap(images[-1]))
    logits, distances, maps = model.raw_scores(images, maps=True)
    assert maps.shape == (len(images), model.input_size, model.input_size)
    plain_logits, plain_distances = model.raw_scores(images)
    assert np.array_equal(logits, plain_logits) and np.array_equal(distances, plain_distances)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "transfer"])
def test_the_map_is_grad_cam(name: str, xray_files: list[Path]) -> None:
    """Each head's map against the grad-cam library's Grad-CAM of its last spatial layer, on
    real X-rays, and the graph's map against torch's (bench/heatmaps.py measures 60 images)."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    from pneumoscan.models import MeanOfHeads, _spatial_end, head_logits_and_map, upsample

    loaded, fast = model_folder.load(name), runtime.load(name)
    network = loaded.network
    heads = network.head.heads if isinstance(network.head, MeanOfHeads) else [network.head]
    images = np.stack([reader.load(f, loaded.input_size) for f in xray_files])
    x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
    torch_maps = loaded.raw_scores(images, maps=True)[2]
    assert np.allclose(fast.raw_scores(images, maps=True)[2], torch_maps, atol=1e-3)

    class OneLogit(torch.nn.Module):
        """One head as grad-cam takes a classifier; gradients stop at the frozen trunk."""

        def __init__(self, head: torch.nn.Module):
            super().__init__()
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(network.trunk(x).detach().requires_grad_(True))

    compared = 0
    for head in heads:
        for i, path in enumerate(xray_files):
            with torch.no_grad():
                logit, cam = head_logits_and_map(head, network.trunk(x[i : i + 1]))
            positive = bool(logit.item() > 0)
            target = BinaryClassifierOutputTarget(int(positive))
            with (
                torch.enable_grad(),
                GradCAM(OneLogit(head), [head[_spatial_end(head)]]) as grad_cam,
            ):
                reference = grad_cam(input_tensor=x[i : i + 1], targets=[target])[0]
            if reference.std() < 0.05:
                continue  # no evidence either way: both maps are rounding noise
            ours = explain.heatmap(upsample(cam, loaded.input_size)[0].numpy(), positive)
            # Grad-CAM drops the negative part before resizing, the graph after: edges differ.
            assert np.corrcoef(reference.ravel(), ours.ravel())[0, 1] > 0.9, path.name
            peak = np.unravel_index(reference.argmax(), reference.shape)
            assert np.hypot(*np.subtract(peak, np.unravel_index(ours.argmax(), ours.shape))) < (
                loaded.input_size / 8
            ), path.name
            compared += 1
    assert compared >= len(heads) * len(xray_files) // 2


def test_the_map_adds_up_to_the_logit(tiny_models: dict[str, Path], xray_files: list[Path]) -> None:
    """Signed and in logit units, the map's mean over the image is the logit less the bias."""
    import torch

    from pneumoscan.models import head_logits_and_map

    network = model_folder.load(tiny_models["transfer"]).network.eval()
    x = torch.from_numpy(
        np.stack([reader.load(f, 128) for f in xray_files])[:, None].astype(np.float32) / 255
    )
    with torch.no_grad():
        logits, maps = head_logits_and_map(network.head, network.trunk(x))
        expected = network(x)
    bias = network.head[-1].bias.item()
    assert torch.allclose(logits[:, 0], expected, atol=1e-5)
    assert torch.allclose(maps.mean((1, 2)) + bias, expected, atol=1e-4)


def test_the_map_sits_where_grad_cam_reads_it(tiny_models: dict[str, Path]) -> None:
    from pneumoscan.models import _spatial_end

    transfer = model_folder.load(tiny_models["transfer"]).network.head
    pool = next(i for i, m in enumerate(transfer) if type(m).__name__ == "AdaptiveAvgPool2d")
    assert _spatial_end(transfer) == pool - 1  # conv_head + bn2 (+ act)
    cnn = model_folder.load(tiny_models["cnn"]).network.head
    pool = next(i for i, m in enumerate(cnn) if type(m).__name__ == "AdaptiveAvgPool2d")
    # The last stage's activation, before its max-pool halves the resolution.
    assert type(cnn[pool - 1]).__name__ == "MaxPool2d"
    assert _spatial_end(cnn) == pool - 2
    assert type(cnn[pool - 2]).__name__ == "ReLU"
    dense = model_folder.load(tiny_models["dense"]).network.head
    assert _spatial_end(dense) is None


def test_dense_model_is_refused(tiny_models: dict[str, Path], xray_files: list[Path]) -> None:
    dense = runtime.load(tiny_models["dense"])
    assert not dense.has_maps
    with pytest.raises(PneumoscanError, match="dense has no spatial layer"):
        dense.heatmap(reader.load(xray_files[0], dense.input_size))


def test_wrong_image_size_is_refused(tiny_models: dict[str, Path], xray_files: list[Path]) -> None:
    cnn = runtime.load(tiny_models["cnn"])
    with pytest.raises(PneumoscanError, match=r"read_image\(path, size=128\)"):
        cnn.heatmap(reader.load(xray_files[0], cnn.input_size * 2))


def test_a_normal_result_shows_the_evidence_for_normal() -> None:
    cols = np.indices((64, 64))[1]
    cam = np.where(cols < 32, 2.0, -1.0).astype(np.float32)  # left: pneumonia, right: normal
    pneumonia, normal = explain.heatmap(cam, True), explain.heatmap(cam, False)
    assert pneumonia[:, :32].min() == pytest.approx(1.0, abs=1e-6) and pneumonia[:, 32:].max() == 0
    assert normal[:, 32:].min() == pytest.approx(1.0, abs=1e-6) and normal[:, :32].max() == 0


def test_the_colour_map_is_matplotlibs_jet() -> None:
    import matplotlib

    values = np.linspace(-0.1, 1.1, 1001)
    assert np.allclose(explain.jet(values), matplotlib.colormaps["jet"](values)[:, :3], atol=1e-9)


def _decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("max_side", [512, 100])
def test_overlay_png_fits_and_shows_the_heatmap(
    tiny_models: dict[str, Path], xray_files: list[Path], max_side: int
) -> None:
    cnn = runtime.load(tiny_models["cnn"])
    original = reader.read_image(xray_files[-1])[:, 20:200]  # not square
    cam = cnn.heatmap(reader.resize(original, cnn.input_size))
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


def test_heatmaps_need_no_torch(xray_files: list[Path], tmp_path: Path) -> None:
    """Heatmaps come from the graph: drawing one imports neither torch nor matplotlib."""
    code = (
        "import sys\n"
        "from pneumoscan import runtime, reader\n"
        "model = runtime.load('ensemble')\n"
        f"model.heatmap(reader.load({str(xray_files[-1])!r}, 128))\n"
        "print(sorted(m for m in ('torch', 'pytorch_grad_cam', 'cv2', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
