"""The ONNX fast path: every model folder carries its graph, which gives torch's answers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import data, model_folder, runtime, screening
from pneumoscan.errors import PneumoscanError


@pytest.mark.slow
def test_onnx_matches_torch_on_real_test_images(data_root: Path) -> None:
    model = model_folder.load("transfer")
    listed = data.list_split(data_root, "test")
    images, _ = data.load_images(listed, model.input_size)
    images = np.asarray(images[::3])  # 208 images of both classes
    logits, distances = model.raw_scores(images)
    fast = runtime.load("transfer")
    assert fast.meta["onnx"]["file"] == "model.onnx"  # shipped, not exported on the fly
    onnx_logits, onnx_distances = fast.raw_scores(images)
    assert np.abs(model.calibrate(logits) - model.calibrate(onnx_logits)).max() < 1e-4
    assert np.allclose(distances, onnx_distances, rtol=1e-4, atol=1e-3)


def test_onnx_backend_through_predict(tiny_models: dict[str, Path], xray_files: list[Path]) -> None:
    torch_results = list(screening.predict(model_folder.load(tiny_models["cnn"]), xray_files))
    onnx_results = list(screening.predict(runtime.load(tiny_models["cnn"]), xray_files))
    for a, b in zip(torch_results, onnx_results, strict=True):
        assert a.label == b.label and abs(a.probability - b.probability) < 1e-4 and a.ood == b.ood


def test_the_graph_refuses_a_changed_weights_file(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_models["transfer"], tmp_path / "m"))
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one bit, deep in the tensors that the graph reads
    weights.write_bytes(bytes(data))
    with pytest.raises(PneumoscanError, match=r"weights\.safetensors: checksum does not match"):
        runtime.load(folder)


def test_a_folder_without_a_graph_gets_one_exported_into_the_cache(
    tiny_models: dict[str, Path], tmp_path: Path, xray_files: list[Path]
) -> None:
    folder = Path(shutil.copytree(tiny_models["cnn"], tmp_path / "old"))
    meta = json.loads((folder / "model.json").read_text())
    del meta["onnx"]
    (folder / "model.json").write_text(json.dumps(meta))
    (folder / "model.onnx").unlink()
    images = np.stack([np.zeros((128, 128), np.uint8), np.full((128, 128), 200, np.uint8)])
    expected = runtime.load(tiny_models["cnn"]).probabilities(images)
    assert np.abs(runtime.load(folder).probabilities(images) - expected).max() < 1e-4
    assert not (folder / "model.onnx").exists()  # the user's folder is left as it was


def test_shards_cover_every_file_once(tmp_path: Path) -> None:
    files = [tmp_path / f"{i}.png" for i in range(10)]
    parts = [files[screening.parse_shard(f"{i}/3")] for i in (1, 2, 3)]
    assert sorted(f for part in parts for f in part) == sorted(files)
    assert [len(p) for p in parts] == [4, 3, 3]
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        with pytest.raises(PneumoscanError, match="--shard"):
            screening.parse_shard(bad)
