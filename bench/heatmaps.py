"""Heatmaps from the ONNX graph against the torch Grad-CAM they replaced: agreement and time.
    python bench/heatmaps.py --data ../shared/data/chest_xray [--models cnn,transfer,ensemble]
        [--images 60]

On `--images` test images (half of each class, evenly spaced), for each model: the map the
ONNX graph gives with the logits (explain.heatmap of its class activation map) and the map of
the grad-cam library's Grad-CAM in torch, as pneumoscan drew it before (every head's last
spatial layer, each scaled to [0, 1] and averaged), both for the label the model gives. Agreement:
the Pearson correlation of the two maps, and the distance between their peaks, in pixels of
the model's input and as a share of its side (median and worst). Time: one image at a time,
scoring and map together (what a heatmap costs on top of reading the file), medians over the
images; the overlay PNG, the same code for both, is timed apart. Needs pneumoscan[dev]
(torch and grad-cam, for the reference). Appends to bench/results/cpu_heatmaps.jsonl.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import record
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

from pneumoscan import data, explain, model_folder, reader, runtime
from pneumoscan.models import MeanOfHeads, _spatial_end


class _OneLogit(torch.nn.Module):
    """The network as grad-cam takes a classifier, as explain.py wrapped it before: each member's
    trunk output detached, so gradients stop at the frozen trunk."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = []
        for member in self.network.members:
            features = member.trunk(x).detach().requires_grad_(True)
            logits.append(member.head(features))
        return torch.stack(logits).mean(0)


def _layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    layers = []
    for member in network.members:
        heads = member.head.heads if isinstance(member.head, MeanOfHeads) else [member.head]
        layers += [h[_spatial_end(h)] for h in heads]
    return layers


def grad_cam(loaded: model_folder.LoadedModel, image: np.ndarray, positive: bool) -> np.ndarray:
    """The torch Grad-CAM pneumoscan drew before its heatmaps came from the graph."""
    x = torch.from_numpy(image[None, None].astype(np.float32) / 255)
    target = BinaryClassifierOutputTarget(int(positive))
    wrapped = _OneLogit(loaded.network)
    with torch.enable_grad(), GradCAM(model=wrapped, target_layers=_layers(loaded.network)) as cam:
        return np.clip(cam(input_tensor=x, targets=[target])[0], 0, 1)


def test_images(data_root: Path, count: int, size: int) -> tuple[list[Path], np.ndarray]:
    listed = data.list_split(data_root, "test")
    picked = []
    for label in (0, 1):
        index = np.flatnonzero(listed.labels == label)
        picked += list(index[np.linspace(0, len(index) - 1, count // 2).round().astype(int)])
    files = [listed.files[i] for i in picked]
    return files, np.stack([reader.load(f, size) for f in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", default="cnn,transfer,ensemble")
    parser.add_argument("--images", type=int, default=60)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        fast, loaded = runtime.load(name), model_folder.load(name)
        files, images = test_images(args.data, args.images, fast.input_size)
        threshold = fast.threshold("detection")
        correlations, peaks, onnx_s, torch_s, overlay_s = [], [], [], [], []
        for path, image in zip(files, images, strict=True):
            start = time.perf_counter()
            logits, _, maps = fast.raw_scores(image[None], maps=True)
            positive = bool(fast.calibrate(logits)[0] >= threshold)
            ours = explain.heatmap(maps[0], positive)
            onnx_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded.raw_scores(image[None])
            reference = grad_cam(loaded, image, positive)
            torch_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            explain.overlay_png(reader.read_image(path), ours, 0.5, "PNEUMONIA", threshold)
            overlay_s.append(time.perf_counter() - start)
            if reference.std() > 1e-3 and ours.std() > 1e-3:
                correlations.append(float(np.corrcoef(reference.ravel(), ours.ravel())[0, 1]))
            a = np.unravel_index(reference.argmax(), reference.shape)
            b = np.unravel_index(ours.argmax(), ours.shape)
            peaks.append(float(np.hypot(a[0] - b[0], a[1] - b[1])))
        row = {
            "model": name,
            "images": len(files),
            "compared": len(correlations),
            "correlation_median": float(np.median(correlations)),
            "correlation_min": float(np.min(correlations)),
            "correlation_over_0.9": float(np.mean(np.asarray(correlations) > 0.9)),
            "peak_distance_px_median": float(np.median(peaks)),
            "peak_distance_px_max": float(np.max(peaks)),
            "peak_within_side_8": float(np.mean(np.asarray(peaks) <= fast.input_size / 8)),
            "input_size": fast.input_size,
            "onnx_ms": 1000 * float(np.median(onnx_s)),
            "torch_grad_cam_ms": 1000 * float(np.median(torch_s)),
            "speedup": float(np.median(torch_s) / np.median(onnx_s)),
            "overlay_png_ms": 1000 * float(np.median(overlay_s)),
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        rows.append(row)
        print(
            f"{name}: correlation median {row['correlation_median']:.3f} (min "
            f"{row['correlation_min']:.3f}, {row['correlation_over_0.9']:.0%} over 0.9, "
            f"{row['compared']} of {row['images']} with a map); peaks "
            f"{row['peak_distance_px_median']:.1f} px apart (median), "
            f"{row['peak_within_side_8']:.0%} within {fast.input_size // 8} px; map "
            f"{row['onnx_ms']:.1f} ms (ONNX) vs {row['torch_grad_cam_ms']:.1f} ms (torch "
            f"Grad-CAM), {row['speedup']:.1f}x; overlay PNG {row['overlay_png_ms']:.1f} ms"
        )
    record.append("cpu_heatmaps.jsonl", rows)


if __name__ == "__main__":
    main()
