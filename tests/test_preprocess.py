import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan import model_folder, preprocess, reader
from pneumoscan.errors import PneumoscanError


def test_unit_range_scales_every_grey_level_exactly_as_torch_does() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = preprocess.unit_range(grey)
    assert x.dtype == np.float32 and x.shape == (1, 1, 16, 16)
    assert x.min() == 0.0 and x.max() == 1.0
    # Training once scaled on the device in torch: the bits must be the same.
    assert np.array_equal(x, torch.from_numpy(grey).unsqueeze(1).float().div_(255).numpy())


def test_a_new_model_records_the_preprocessing_it_was_trained_with(
    tiny_models: dict[str, Path],
) -> None:
    meta = json.loads((tiny_models["cnn"] / "model.json").read_text())
    assert meta["preprocessing"] == preprocess.record(128)
    assert meta["preprocessing"]["reader_version"] == reader.VERSION
    assert meta["preprocessing"]["input_size"] == meta["input_size"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("reader_version", reader.VERSION + 1), ("resize", "centre crop"), ("input_size", 224)],
)
def test_a_model_whose_preprocessing_this_reader_cannot_reproduce_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path, key: str, value: object
) -> None:
    folder = Path(shutil.copytree(tiny_models["cnn"], tmp_path / "cnn"))
    meta = json.loads((folder / "model.json").read_text())
    meta["preprocessing"][key] = value
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PneumoscanError, match=f"preprocessing {key}"):
        model_folder.read_card(folder)


def test_a_record_written_before_the_version_was_stored_reads_as_reader_1(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Folders saved before the version was stored hold only the prose record of reader 1."""
    assert reader.VERSION == 1
    folder = Path(shutil.copytree(tiny_models["cnn"], tmp_path / "cnn"))
    meta = json.loads((folder / "model.json").read_text())
    older = {k: v for k, v in meta["preprocessing"].items() if k != "reader_version"}
    meta["preprocessing"] = older
    (folder / "model.json").write_text(json.dumps(meta))
    assert model_folder.load(folder).input_size == 128
