"""The int8 graph: written beside the fp32 one, checksummed, close to fp32 on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import model_folder, preprocess, quantize, runtime, screening
from pneumoscan.errors import PneumoscanError


@pytest.mark.slow
def test_int8_graph_beside_the_fp32_one(
    data_root: Path, xray_files: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "cnn"
    shutil.copytree(model_folder.bundled_dir() / "cnn", folder)
    meta = json.loads((folder / "model.json").read_text())
    meta.pop(quantize.INT8_KEY, None)  # as a folder written by `train` comes
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / quantize.INT8_FILE).unlink(missing_ok=True)
    with pytest.raises(PneumoscanError, match="has no int8 graph"):
        runtime.load(folder, precision="int8")
    path = quantize.add_int8(folder, data_root)
    # The classifier's int8 weights, and the guard's own stages left in fp32 (2.9 MB).
    assert path.parent == folder and path.stat().st_size < 4e6
    meta = json.loads((folder / "model.json").read_text())
    assert meta["onnx_int8"]["file"] == path.name and len(meta["onnx_int8"]["sha256"]) == 64
    images = np.stack([screening.decode(f, 128).image for f in xray_files])
    fp32_model, int8_model = runtime.load(folder), runtime.load(folder, precision="int8")
    (fp32_logits, fp32_distances), (int8_logits, int8_distances) = (
        m.raw_scores(images) for m in (fp32_model, int8_model)
    )
    fp32, int8 = fp32_model.calibrate(fp32_logits), int8_model.calibrate(int8_logits)
    assert np.max(np.abs(fp32 - int8)) < 0.1  # close, not equal: bench/int8.py measures it
    assert not np.array_equal(fp32_logits, int8_logits)  # the classifier is quantized...
    # ...the guard's own stages are not: its distances, and so its outcomes, are fp32's.
    assert np.allclose(int8_distances, fp32_distances, rtol=1e-5)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(PneumoscanError, match="checksum"):
        runtime.load(folder, precision="int8")
    # Saving the folder anew (e.g. a refit) replaces the graph the int8 one was quantized from:
    # the stale int8 graph goes with it, rather than run beside weights it does not hold.
    import torch

    loaded = model_folder.load(folder)
    dtype = getattr(torch, loaded.meta["weights"]["dtype"])
    model_folder.save(folder, loaded.network, loaded.meta, dtype=dtype, ood=loaded.scorer.guard)
    assert quantize.INT8_KEY not in model_folder.read_card(folder).meta and not path.exists()
    assert model_folder.EXTERNAL_KEY not in model_folder.read_card(folder).meta  # of the old one
    with pytest.raises(PneumoscanError, match="has no int8 graph"):
        runtime.load(folder, precision="int8")


@pytest.mark.parametrize("name", ["cnn", "transfer"])
def test_shipped_int8_graph_runs_as_quantized_on_this_cpu(
    name: str, xray_files: list[Path]
) -> None:
    """ONNX Runtime's fused int8 kernels give the graph's own QDQ answer (each convolution
    dequantized and run in fp32, as `ORT_ENABLE_BASIC` leaves it). On a CPU without VNNI,
    full-range int8 weights saturate there and moved the cnn's probabilities by 0.8
    (docs/experiments.md, section 39); the 7-bit weights keep it within a few hundredths."""
    import onnxruntime as ort

    card = model_folder.read_card(name)
    x = preprocess.unit_range(
        np.stack([screening.decode(f, card.input_size).image for f in xray_files])
    )

    def probabilities(level: ort.GraphOptimizationLevel) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        graph = str(card.file("onnx_int8"))
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return card.calibrate(session.run(None, {"image": x})[0])

    fused = probabilities(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    as_written = probabilities(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert np.max(np.abs(fused - as_written)) < 0.1
