"""Shared fixtures: the real data set, small real subsets of it, and a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray"


def _data_root() -> Path | None:
    configured = os.environ.get("PNEUMOSCAN_DATA")
    root = Path(configured) if configured else DEFAULT_DATA
    if not root.is_absolute():
        root = (REPO / root).resolve()
    return root if (root / "test").is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data set; CI sets PNEUMOSCAN_DATA, so a missing copy there fails loudly."""
    root = _data_root()
    if root is None:
        if os.environ.get("CI"):
            pytest.fail(f"PNEUMOSCAN_DATA={os.environ.get('PNEUMOSCAN_DATA')} holds no data set")
        pytest.skip("no data set: set PNEUMOSCAN_DATA to the chest_xray folder")
    return root


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PNEUMOSCAN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _link_subset(
    source: Path, target: Path, per_class: dict[str, int], patients_apart: bool = False
) -> None:
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        out = target / class_dir.name
        out.mkdir(parents=True)
        files = sorted(class_dir.iterdir())
        step = max(1, len(files) // per_class[class_dir.name]) if patients_apart else 1
        for f in files[::step][: per_class[class_dir.name]]:
            (out / f.name).symlink_to(f)


@pytest.fixture(scope="session")
def small_data(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real subset in the Kaggle layout: 160 train and 60 test images."""
    root = tmp_path_factory.mktemp("small_data")
    _link_subset(
        data_root / "train", root / "train", {"NORMAL": 80, "PNEUMONIA": 80}, patients_apart=True
    )
    _link_subset(
        data_root / "test", root / "test", {"NORMAL": 30, "PNEUMONIA": 30}, patients_apart=True
    )
    _link_subset(data_root / "val", root / "val", {"NORMAL": 8, "PNEUMONIA": 8})
    return root


NIH = REPO.parent / "shared" / "data" / "external" / "nih_adult"


@pytest.fixture(scope="session")
def nih_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real set of adult films as a CSV: one film each of 12 NIH patients per class."""
    import csv

    if not (NIH / "labels.csv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no nih_adult data at {NIH}")
        pytest.skip("no nih_adult data beside the data set")
    with (NIH / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    picked, patients = [], set()
    for label in ("NORMAL", "PNEUMONIA"):
        for row in rows:
            if (
                row["label"] == label
                and row["patient_id"] not in patients
                and row["rsna_2018"] == ""
            ):
                picked.append(row)
                patients.add(row["patient_id"])
                if sum(r["label"] == label for r in picked) == 12:
                    break
    path = tmp_path_factory.mktemp("nih_adult", numbered=False) / "labels.csv"
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["file", "label", "patient_id", "view"])
        for row in picked:
            out.writerow([NIH / row["file"], row["label"], row["patient_id"], row["view"]])
    return path


@pytest.fixture(scope="session")
def xray_files(data_root: Path) -> list[Path]:
    """A few real test images of each class."""
    return (
        sorted((data_root / "test" / "NORMAL").iterdir())[:3]
        + sorted((data_root / "test" / "PNEUMONIA").iterdir())[:3]
    )


@pytest.fixture(scope="session")
def tiny_models(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model trained for a few steps on the small real subset (fast, not accurate)."""
    from pneumoscan import train
    from pneumoscan.config import load_config

    out = tmp_path_factory.mktemp("models")
    folders = {}
    for name in ("dense", "cnn", "transfer"):
        cfg = load_config(name, max_steps=6, batch_size=32, feature_views=1, val_fraction=0.25)
        train.train(
            cfg, small_data, out / name, device_name="cpu", log=lambda _: None, progress=False
        )
        folders[name] = out / name
    return folders
