"""The data set on disk: the Kaggle layout, patient-grouped validation, and a decode-once cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan import reader
from pneumoscan.errors import ImageReadError, PneumoscanError

# TIFF: what film digitisers write (8 or 16 bit). .jfif and .jpe: JPEG as browsers on Windows
# save it.
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".jfif", ".jpe", ".png", ".tif", ".tiff", ".dcm", ".dicom"}
DATA_HELP = (
    "get the Kermany et al. chest X-ray data (Kaggle 'chest-xray-pneumonia', or Mendeley "
    "doi:10.17632/rscbjbr9sj.2) and unpack it so that DIR/{train,val,test}/{NORMAL,PNEUMONIA} exist"
)

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)


@dataclass(frozen=True)
class Split:
    """Files of one split, with integer labels indexing `class_names`."""

    files: list[Path]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: np.ndarray) -> Split:
        return Split([self.files[i] for i in index], self.labels[index], self.class_names)


def examples() -> list[Path]:
    """The example X-rays that ship in the package: three test images of each class of
    Kermany et al. (CC BY 4.0; see the NOTICE beside them), and one of them as DICOM."""
    from importlib import resources

    folder = Path(str(resources.files("pneumoscan") / "examples"))
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def patient_id(file_name: str) -> str:
    """The patient a file belongs to, from the data set's naming; unknown names stand alone."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1).upper()
    return Path(file_name).stem


def is_image_file(path: Path) -> bool:
    """Whether a folder listing takes this file: an image suffix; no suffix, as DICOM exports
    often have; or any other suffix on a file that opens as DICOM does (the "DICM" mark after its
    preamble), as PACS exports and dcmtk's storescp write them, named by UID ("CR.1.2.840...",
    whose last ".NNN" is no suffix at all). Hidden files are never taken."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES or not path.suffix:
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def list_split(root: str | Path, split: str) -> Split:
    """List `<root>/<split>/<CLASS>/*` images; class names are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise PneumoscanError(f"data folder {root} does not exist: {DATA_HELP}")
    folder = root / split
    if not folder.is_dir():
        raise PneumoscanError(f"{folder} does not exist: expected {root}/{split}/<CLASS>/ images")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise PneumoscanError(
            f"{folder} needs one sub-folder per class (e.g. NORMAL/ and PNEUMONIA/); found {classes}"
        )
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if is_image_file(path):
                files.append(path)
                labels.append(index)
    if not files:
        raise PneumoscanError(f"{folder} holds no images (JPEG, PNG, TIFF or DICOM)")
    return Split(files, np.asarray(labels, dtype=np.int64), classes)


VAL_DESIGNS = ("random", "earliest")


def train_val_split(
    train: Split, val_fraction: float = 0.1, seed: int = 0, design: str = "random"
) -> tuple[Split, Split]:
    """Carve a validation set from train, grouped by patient.

    `random`: patients drawn at random, stratified by class. `earliest`: a hold-out in time,
    the first-numbered patients of each file-name series (IM-, NORMAL2-IM-, person...), up to
    `val_fraction` of each series' images: the official test normals are the first patients of
    their series (docs/experiments.md, section 9).
    """
    if design not in VAL_DESIGNS:
        raise PneumoscanError(f"val_design {design!r}: choose one of {', '.join(VAL_DESIGNS)}")
    groups = [patient_id(f.name) for f in train.files]
    if design == "earliest":
        val_idx = _earliest_patients(groups, val_fraction)
    else:
        from sklearn.model_selection import StratifiedGroupKFold

        n_splits = max(2, round(1 / val_fraction))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        val_idx = next(folds.split(np.zeros(len(train)), train.labels, groups))[1]
    train_idx = np.setdiff1d(np.arange(len(train)), val_idx)
    return train.subset(train_idx), train.subset(np.sort(val_idx))


def _earliest_patients(groups: list[str], fraction: float) -> np.ndarray:
    """Indices of the first-numbered patients of each series, about `fraction` of its images.

    A series is a patient id with its numbers masked (IM-0115 -> IM-#); ids without a number
    form one series, in name order. A patient is taken while that brings the count nearer the
    target, so a series too small to spare one patient gives none.
    """
    series: dict[str, dict[tuple, list[int]]] = {}
    for i, group in enumerate(groups):
        numbers = tuple(int(n) for n in re.findall(r"\d+", group))
        name = re.sub(r"\d+", "#", group) if numbers else ""
        series.setdefault(name, {}).setdefault((numbers, group), []).append(i)
    held: list[int] = []
    for patients in series.values():
        wanted, taken = fraction * sum(map(len, patients.values())), []
        for key in sorted(patients):
            if len(taken) + len(patients[key]) / 2 > wanted:
                break
            taken += patients[key]
        held += taken
    return np.asarray(held, dtype=np.int64)


def cache_dir() -> Path:
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan"))


def fingerprint(files: list[Path]) -> str:
    """Identify a data set's file list by split, class, name and size, wherever it is stored.

    A model records it, so refitting its thresholds on another copy of the same data works.
    """
    return _digest(f"{'/'.join(p.parts[-3:])}|{p.stat().st_size}" for p in files)


def _cache_key(files: list[Path]) -> str:
    """Like `fingerprint`, but of these very files: a copy edited in place is decoded again."""
    stats = ((p.resolve(), p.stat()) for p in files)
    return _digest(f"{path}|{st.st_size}|{st.st_mtime_ns}" for path, st in stats)


def _digest(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()[:20]


def load_images(split: Split, size: int, workers: int | None = None) -> tuple[np.ndarray, Split]:
    """Decode and resize every file once; later calls read a memory-mapped .npy cache.

    Unreadable files are named in a warning and dropped: the returned Split lists the kept ones.
    """
    key = f"{_cache_key(split.files)}-{size}-r{reader.CACHE_VERSION}"
    directory = cache_dir()
    array_path, meta_path = directory / f"{key}.npy", directory / f"{key}.json"
    if array_path.exists() and meta_path.exists():
        kept = np.asarray(json.loads(meta_path.read_text())["kept"], dtype=np.int64)
        return np.load(array_path, mmap_mode="r"), split.subset(kept)

    def decode(path: Path) -> np.ndarray | ImageReadError:
        try:
            return reader.load(path, size)
        except ImageReadError as exc:
            return exc

    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        decoded = list(pool.map(decode, split.files))
    for outcome in decoded:  # warned from this thread: the warnings filters are process-wide
        if isinstance(outcome, ImageReadError):
            warnings.warn(f"skipping unreadable image: {outcome}", stacklevel=2)
    kept = np.asarray([i for i, a in enumerate(decoded) if isinstance(a, np.ndarray)], np.int64)
    images = (
        np.stack([decoded[i] for i in kept]) if len(kept) else np.zeros((0, size, size), np.uint8)
    )
    directory.mkdir(parents=True, exist_ok=True)
    tmp = array_path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, images)
    os.replace(tmp, array_path)
    meta_path.write_text(json.dumps({"kept": kept.tolist(), "size": size}))
    return np.load(array_path, mmap_mode="r"), split.subset(kept)


@dataclass
class TrainingData:
    """A model's training images, decoded once, and which of them train and which validate."""

    images: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    fingerprint: str
    n_val_patients: int
    val_files: list[Path]


def training_data(
    root: str | Path, image_size: int, val_fraction: float, split_seed: int, val_design: str
) -> TrainingData:
    """`<root>/train` at `image_size`, with validation carved from it by patient."""
    listed = list_split(root, "train")
    images, kept = load_images(listed, image_size)
    train_split, val_split = train_val_split(kept, val_fraction, split_seed, val_design)
    position = {f: i for i, f in enumerate(kept.files)}
    return TrainingData(
        images=images,
        train_idx=np.asarray([position[f] for f in train_split.files]),
        val_idx=np.asarray([position[f] for f in val_split.files]),
        labels=kept.labels,
        class_names=kept.class_names,
        fingerprint=fingerprint(kept.files),
        n_val_patients=len({patient_id(f.name) for f in val_split.files}),
        val_files=val_split.files,
    )
