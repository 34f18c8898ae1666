"""Labelled chest X-rays from anywhere as one manifest, patient-grouped validation, and a
decode-once cache.

A data set is read from the Kermany layout (`DIR/{train,val,test}/{NORMAL,PNEUMONIA}`), from
class folders (`DIR/NORMAL`, `DIR/PNEUMONIA`) or from a CSV (`file,label` and optionally
`patient_id`, `source`, `view`), and several at once become one `Manifest`: each file with its
label, patient, source and view. Validation is carved by patient within each source, stratified
by class (and view, where every file of the source gives one); training and evaluation never see
a source's file-naming habits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


# One data set or several: each a folder or CSV `read` takes, optionally as NAME=PATH.
DataSets = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class Manifest:
    """Labelled files with integer labels indexing `class_names`, each with its patient (a
    file without a patient id is its own patient), its source (the data set it came from) and
    its view (AP, PA; "" when unknown)."""

    files: list[Path]
    labels: np.ndarray
    class_names: list[str]
    patients: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.files)
        if not self.patients:
            object.__setattr__(self, "patients", [patient_id(f.name) for f in self.files])
        for name in ("sources", "views"):
            if not getattr(self, name):
                object.__setattr__(self, name, [""] * n)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: np.ndarray) -> Manifest:
        index = np.asarray(index, dtype=np.int64)
        return Manifest(
            [self.files[i] for i in index],
            self.labels[index],
            self.class_names,
            [self.patients[i] for i in index],
            [self.sources[i] for i in index],
            [self.views[i] for i in index],
        )

    @property
    def groups(self) -> np.ndarray:
        """A patient key per file, unique across sources: what a bootstrap or a split groups."""
        return np.asarray([f"{s}/{p}" for s, p in zip(self.sources, self.patients, strict=True)])

    @property
    def source_names(self) -> list[str]:
        """The sources, in the order they first appear."""
        return list(dict.fromkeys(self.sources))

    def of_source(self, source: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.sources) == source)

    def counts(self) -> dict[str, dict]:
        """Per source: images per class, patients, and images per view where views are known."""
        out = {}
        for source in self.source_names:
            index = self.of_source(source)
            views = [self.views[i] for i in index if self.views[i]]
            out[source] = {
                "images": len(index),
                **{c: int((self.labels[index] == k).sum()) for k, c in enumerate(self.class_names)},
                "patients": len({self.patients[i] for i in index}),
                **({"views": dict(sorted(Counter(views).items()))} if views else {}),
            }
        return out


def concat(manifests: list[Manifest]) -> Manifest:
    """Several manifests as one; their classes must agree."""
    first = manifests[0]
    for other in manifests[1:]:
        if other.class_names != first.class_names:
            raise PneumoscanError(
                f"--data: classes {other.class_names} differ from {first.class_names}"
            )
    return Manifest(
        [f for m in manifests for f in m.files],
        np.concatenate([m.labels for m in manifests]),
        first.class_names,
        [p for m in manifests for p in m.patients],
        [s for m in manifests for s in m.sources],
        [v for m in manifests for v in m.views],
    )


def examples() -> list[Path]:
    """The example X-rays that ship in the package: three test images of each class of
    Kermany et al. (CC BY 4.0; see the NOTICE beside them), and one of them as DICOM."""
    from importlib import resources

    folder = Path(str(resources.files("pneumoscan") / "examples"))
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def patient_id(file_name: str) -> str:
    """The patient a file belongs to, from the Kermany data set's naming; unknown names stand
    alone (their stem)."""
    match = _patient_match(file_name)
    return match if match is not None else Path(file_name).stem


def _patient_match(file_name: str) -> str | None:
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1).upper()
    return None


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


def read(spec: str | Path, split: str = "train") -> Manifest:
    """One data set as a manifest. `spec` is a CSV file (`file,label` and optionally
    `patient_id`, `source`, `view`; files relative to the CSV's folder), a folder in the Kermany
    layout (its `split` folder is read), or a folder of class folders (NORMAL/, PNEUMONIA/, any
    case, searched recursively). `NAME=PATH` names the source; by default it is the folder's
    name (for a CSV, the name of the folder holding it)."""
    name, _, path_text = str(spec).partition("=") if _named(spec) else ("", "", str(spec))
    path = Path(path_text)
    if path.is_file():
        manifest = _read_csv(path, name)
    elif not path.is_dir():
        raise PneumoscanError(f"--data {path}: no such folder or CSV file ({DATA_HELP})")
    elif (path / split).is_dir() and _class_folders(path / split):
        manifest = list_split(path, split, name or path.name)
    elif _class_folders(path):
        manifest = _read_folders(path, name or path.name)
    else:
        raise PneumoscanError(
            f"--data {path}: expected {path}/{split}/<CLASS>/ (the Kermany layout), "
            f"{path}/NORMAL/ and {path}/PNEUMONIA/, or a CSV file with file,label columns"
        )
    _warn_unknown_patients(manifest, str(spec))
    return manifest


def _named(spec: str | Path) -> bool:
    """Whether `spec` is NAME=PATH (a file or folder whose own name holds "=" is a path)."""
    text = str(spec)
    return "=" in text and not Path(text).exists() and "/" not in text.partition("=")[0]


def read_all(specs: DataSets, split: str = "train") -> Manifest:
    """Several data sets (`read` each) as one manifest; each source must have its own name."""
    specs = [specs] if isinstance(specs, str | Path) else list(specs)
    if not specs:
        raise PneumoscanError("--data: give at least one data set")
    manifests = [read(spec, split) for spec in specs]
    seen: dict[str, str] = {}
    for spec, manifest in zip(specs, manifests, strict=True):
        for source in manifest.source_names:
            if source in seen:
                raise PneumoscanError(
                    f"--data {spec}: source {source!r} is also in {seen[source]}; name each "
                    "data set with NAME=PATH"
                )
            seen[source] = str(spec)
    return concat(manifests)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name.upper(),
    )


def list_split(root: str | Path, split: str, source: str | None = None) -> Manifest:
    """`<root>/<split>/<CLASS>/*` images; class names are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise PneumoscanError(f"data folder {root} does not exist: {DATA_HELP}")
    folder = root / split
    if not folder.is_dir():
        raise PneumoscanError(f"{folder} does not exist: expected {root}/{split}/<CLASS>/ images")
    manifest = _read_folders(folder, source or root.name, recursive=False)
    return manifest


def _read_folders(folder: Path, source: str, recursive: bool = True) -> Manifest:
    classes = _class_folders(folder)
    if len(classes) < 2:
        found = {c.name.upper() for c in classes}
        missing = [c for c in ("NORMAL", "PNEUMONIA") if c not in found]
        raise PneumoscanError(
            f"{folder} needs one sub-folder per class (NORMAL/ and PNEUMONIA/); "
            f"missing {', '.join(missing) or 'a second class'}"
        )
    files, labels = [], []
    for index, class_dir in enumerate(classes):
        listing = class_dir.rglob("*") if recursive else class_dir.iterdir()
        for path in sorted(listing):
            if is_image_file(path):
                files.append(path)
                labels.append(index)
    if not files:
        raise PneumoscanError(f"{folder} holds no images (JPEG, PNG, TIFF or DICOM)")
    return Manifest(
        files,
        np.asarray(labels, dtype=np.int64),
        [c.name.upper() for c in classes],
        sources=[source] * len(files),
    )


def _read_csv(path: Path, source: str) -> Manifest:
    """A CSV of `file,label[,patient_id,source,view]`; rows whose file is missing are named in
    a warning and skipped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PneumoscanError(f"--data {path}: cannot read it as a CSV file ({exc})") from None
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    if "file" not in columns or "label" not in columns:
        raise PneumoscanError(
            f"--data {path}: needs the columns file and label (and optionally patient_id, "
            f"source, view); found {', '.join(columns) or 'no rows'}"
        )

    def column(row: dict, name: str) -> str:
        return (row.get(columns[name]) or "").strip() if name in columns else ""

    labels = sorted({column(r, "label").upper() for r in rows})
    if "" in labels or len(labels) != 2:
        raise PneumoscanError(
            f"--data {path}: the label column must hold two classes (e.g. NORMAL and "
            f"PNEUMONIA) in every row; found {', '.join(repr(x) for x in labels)}"
        )
    files, index, patients, sources, views, missing = [], [], [], [], [], []
    for row in rows:
        file = path.parent / column(row, "file")
        if not file.is_file():
            missing.append(column(row, "file"))
            continue
        files.append(file)
        index.append(labels.index(column(row, "label").upper()))
        patients.append(column(row, "patient_id"))
        sources.append(source or column(row, "source") or path.parent.name)
        views.append(column(row, "view").upper())
    if missing:
        warnings.warn(
            f"{path}: skipping {len(missing)} listed file(s) not found: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else ""),
            stacklevel=3,
        )
    if not files:
        raise PneumoscanError(f"--data {path}: none of the listed files exists")
    # Without a patient id a file is its own patient (its path: unique within the source).
    patients = [p or f"file:{f}" for p, f in zip(patients, files, strict=True)]
    return Manifest(files, np.asarray(index, dtype=np.int64), labels, patients, sources, views)


def _warn_unknown_patients(manifest: Manifest, spec: str) -> None:
    alone = sum(
        p.startswith("file:") or (_patient_match(f.name) is None and p == f.stem)
        for f, p in zip(manifest.files, manifest.patients, strict=True)
    )
    if alone:
        warnings.warn(
            f"--data {spec}: {alone} of {len(manifest)} files have no patient id; each counts "
            "as its own patient (give a patient_id column, or Kermany-style file names)",
            stacklevel=3,
        )


VAL_DESIGNS = ("random", "earliest")


def carve(
    manifest: Manifest,
    fraction: float | dict[str, float] = 0.1,
    seed: int = 0,
    design: str = "random",
) -> tuple[Manifest, Manifest]:
    """Carve a validation set by patient within each source: (train, validation).

    `fraction` is a share of each source's images, or a mapping of source names to shares
    (`default` for the others). `random`: patients drawn at random, stratified by class, and by
    view where every file of the source gives one. `earliest`: a hold-out in time, the
    first-numbered patients of each file-name series (IM-, NORMAL2-IM-, person...): the
    official test normals are the first patients of their series (docs/experiments.md, 9).
    """
    if design not in VAL_DESIGNS:
        raise PneumoscanError(f"val_design {design!r}: choose one of {', '.join(VAL_DESIGNS)}")
    held: list[np.ndarray] = []
    for source in manifest.source_names:
        index = manifest.of_source(source)
        share = (
            fraction.get(source, fraction.get("default", 0.1))
            if isinstance(fraction, dict)
            else fraction
        )
        if not 0 < share < 1:
            raise PneumoscanError(f"val_fraction {share} for {source!r}: give a share in (0, 1)")
        groups = [manifest.patients[i] for i in index]
        if design == "earliest":
            held.append(index[_earliest_patients(groups, share)])
        else:
            held.append(index[_random_patients(manifest, index, groups, share, seed, source)])
    val_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(manifest)), val_idx)
    return manifest.subset(train_idx), manifest.subset(val_idx)


def _random_patients(
    manifest: Manifest, index: np.ndarray, groups: list[str], share: float, seed: int, source: str
) -> np.ndarray:
    """Positions (in `index`) of about `share` of a source's patients, stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = manifest.labels[index]
    views = [manifest.views[i] for i in index]
    strata = (
        labels
        if not all(views)
        else np.unique(
            [f"{label}/{view}" for label, view in zip(labels, views, strict=True)],
            return_inverse=True,
        )[1]
    )
    n_splits = max(2, round(1 / share))
    for k, name in enumerate(manifest.class_names):
        patients = len({g for g, label in zip(groups, labels, strict=True) if label == k})
        if patients < n_splits:
            raise PneumoscanError(
                f"--data: source {source!r} has {patients} patient(s) with {name} images; too "
                f"few to carve a validation set of {share:.0%} by patient (need {n_splits})"
            )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A class-and-view stratum smaller than the folds is fine: it is spread as it can be.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return next(folds.split(np.zeros(len(index)), strata, groups))[1]


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


def load_images(
    split: Manifest, size: int, workers: int | None = None
) -> tuple[np.ndarray, Manifest]:
    """Decode and resize every file once; later calls read a memory-mapped .npy cache.

    Unreadable files are named in a warning and dropped: the returned manifest lists the kept
    ones.
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
    manifest: Manifest  # the readable files, in the order of `images`
    train_idx: np.ndarray
    val_idx: np.ndarray
    specs: list[str]
    fingerprint: str

    @property
    def labels(self) -> np.ndarray:
        return self.manifest.labels

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def val(self) -> Manifest:
        return self.manifest.subset(self.val_idx)

    @property
    def val_files(self) -> list[Path]:
        return self.val.files

    @property
    def n_val_patients(self) -> int:
        return len(set(self.val.groups))

    @property
    def sources(self) -> np.ndarray:
        return np.asarray(self.manifest.sources)

    def describe(self) -> dict:
        """model.json's `data` section: what the model was trained on, per source."""
        train, val = self.manifest.subset(self.train_idx), self.val
        return {
            "fingerprint": self.fingerprint,
            "n_train": len(self.train_idx),
            "n_val": len(self.val_idx),
            "grouped_by": "patient, within each source",
            "sets": self.specs,
            "sources": {
                source: {"train": train.counts().get(source, {}), "validation": counts}
                for source, counts in val.counts().items()
            },
        }


def training_data(
    specs: DataSets,
    image_size: int,
    val_fraction: float | dict,
    split_seed: int,
    val_design: str,
) -> TrainingData:
    """The training part of each data set (`read_all`) at `image_size`, with validation carved
    from it by patient within each source."""
    images, kept = load_images(read_all(specs, "train"), image_size)
    train_split, val_split = carve(kept, val_fraction, split_seed, val_design)
    position = {f: i for i, f in enumerate(kept.files)}
    specs = [specs] if isinstance(specs, str | Path) else list(specs)
    return TrainingData(
        images=images,
        manifest=kept,
        train_idx=np.asarray([position[f] for f in train_split.files], dtype=np.int64),
        val_idx=np.asarray([position[f] for f in val_split.files], dtype=np.int64),
        specs=[str(s) for s in specs],
        fingerprint=fingerprint(kept.files),
    )
