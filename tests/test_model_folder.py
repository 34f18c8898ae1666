import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import model_folder, runtime
from pneumoscan.errors import PneumoscanError


@pytest.fixture
def model_copy(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_models["cnn"], tmp_path / "cnn"))


def test_model_folder_describes_itself(tiny_models: dict[str, Path]) -> None:
    meta = json.loads((tiny_models["transfer"] / "model.json").read_text())
    for key in (
        "format_version",
        "architecture",
        "input_size",
        "preprocessing",
        "class_names",
        "operating_points",
        "calibration",
        "validation",
        "training",
        "data",
        "versions",
        "weights",
    ):
        assert key in meta
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert set(meta["operating_points"]) == {"balanced", "detection"}
    assert meta["training"]["config"]["model"] == "transfer"
    assert (tiny_models["transfer"] / "weights.safetensors").is_file()
    assert (tiny_models["transfer"] / "guard.safetensors").is_file()
    assert meta["ood"]["validation_pass_rate"] >= 0.99 and meta["ood"]["threshold"] > 0


def test_save_then_load_gives_identical_weights_and_probabilities(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A network saved to a new folder and loaded back scores exactly as the original."""
    import torch

    model = model_folder.load(tiny_models["cnn"])
    model_folder.save(tmp_path / "copy", model.network, model.meta, ood=model.scorer.guard)
    again = model_folder.load(tmp_path / "copy")
    saved, loaded = model.network.state_dict(), again.network.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    images = np.random.default_rng(0).integers(0, 256, (4, 128, 128), dtype=np.uint8)
    probs = model.probabilities(images)
    assert np.array_equal(probs, again.probabilities(images))
    assert ((probs >= 0) & (probs <= 1)).all()
    assert np.abs(runtime.load(tmp_path / "copy").probabilities(images) - probs).max() < 1e-4


@pytest.mark.parametrize("name", ["weights.safetensors", "guard.safetensors", "model.onnx"])
def test_tampered_or_truncated_files_are_refused(model_copy: Path, name: str) -> None:
    load = runtime.load if name == "model.onnx" else model_folder.load
    path = model_copy / name
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PneumoscanError, match="checksum"):
        load(model_copy)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(PneumoscanError, match=name):
        load(model_copy)


def test_unknown_format_version_is_refused(model_copy: Path) -> None:
    meta = json.loads((model_copy / "model.json").read_text())
    meta["format_version"] = 99
    (model_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PneumoscanError, match="reads version 1"):
        model_folder.load(model_copy)


def test_unknown_model_name_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(PneumoscanError, match="cnn, dense, ensemble, transfer"):
        model_folder.load("resnet")
    with pytest.raises(PneumoscanError, match=str(tmp_path)):
        model_folder.load(tmp_path)


@pytest.mark.parametrize("name", ["dense", "cnn", "transfer", "ensemble", "children-adults"])
def test_bundled_models_ship_within_size_budget(name: str) -> None:
    folder = model_folder.bundled_dir() / name
    assert (folder / "model.json").is_file(), f"bundled model {name} is missing"
    model = model_folder.load(name)
    architecture = "mixture" if name in ("ensemble", "children-adults") else name
    assert model.meta["architecture"] == architecture and model.input_size == 128
    total = sum(p.stat().st_size for p in model_folder.bundled_dir().glob("*/*"))
    # Weights, guards and ONNX graphs of all five, and two int8 graphs. Since the transfer trunk
    # is equalised (docs/experiments.md, section 29) it is no longer the guard's extractor, and
    # each graph carries the guard's own stages (2.9 MB); children-adults holds the default's
    # weights again, with its adult expert (section 40: 18.8 MiB).
    assert total <= 70 * 2**20


def test_the_guard_reads_the_extractor_model_json_names_or_the_one_an_older_folder_used() -> None:
    """New folders record how the guard prepares its input; one fitted before read its
    unequalised transfer member's trunk (with that member's blur) or a plain one, and one fitted
    before `equalize` was recorded read an unequalised input: each keeps reading the same."""
    plain = {"input_blur": 0.0, "equalize": False}
    cnn = {"architecture": "cnn", "model_args": {}}
    transfer = {"architecture": "transfer", "model_args": {"input_blur": 1.0}}
    equalised = {
        "architecture": "transfer",
        "model_args": {"input_blur": 1.0, "equalize": [0.25, 0.15]},
    }
    older = {"ood": {"threshold": 20.0}}
    assert model_folder.guard_input({**cnn, **older}) == plain
    assert model_folder.guard_input({**equalised, **older}) == plain
    assert model_folder.guard_input({**transfer, **older}) == {**plain, "input_blur": 1.0}
    joined = {"architecture": "mixture", "model_args": {"members": [cnn, transfer]}}
    assert model_folder.guard_input({**joined, **older}) == {**plain, "input_blur": 1.0}
    blurred = {"ood": {"input_blur": 1.0}}
    assert model_folder.guard_input({**cnn, **blurred}) == {**plain, "input_blur": 1.0}
    assert model_folder.shares_guard_trunk({**joined, **blurred})
    assert not model_folder.shares_guard_trunk({**transfer, "ood": {"input_blur": 0.0}})
    assert not model_folder.shares_guard_trunk({**equalised, **blurred})
    now = {"ood": {"input_blur": 1.0, "equalize": [0.25, 0.15]}}
    assert model_folder.shares_guard_trunk({**equalised, **now})
    assert not model_folder.shares_guard_trunk({**transfer, **now})
