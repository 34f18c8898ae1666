import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan import data
from pneumoscan.errors import PneumoscanError


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1372_bacteria_3501.jpeg", "PERSON1372"),
        ("person1372_bacteria_3502.jpeg", "PERSON1372"),
        ("person78_virus_140.jpeg", "PERSON78"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0331-0001.jpeg", "NORMAL2-IM-0331"),
        ("scan.png", "scan"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert data.patient_id(name) == patient


def test_real_train_split_lists_both_classes(data_root: Path) -> None:
    split = data.list_split(data_root, "train")
    assert split.class_names == ["NORMAL", "PNEUMONIA"]
    assert len(split) == 5216
    assert np.bincount(split.labels).tolist() == [1341, 3875]


def test_validation_never_shares_a_patient_and_keeps_class_balance(data_root: Path) -> None:
    train, val = data.carve(data.list_split(data_root, "train"), 0.1, seed=0)
    train_patients = {data.patient_id(f.name) for f in train.files}
    val_patients = {data.patient_id(f.name) for f in val.files}
    assert not train_patients & val_patients
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert abs(val.labels.mean() - train.labels.mean()) < 0.03
    again = data.carve(data.list_split(data_root, "train"), 0.1, seed=0)[1]
    assert again.files == val.files  # fixed seed, same split


def test_earliest_design_holds_out_the_first_numbered_patients_of_each_series(
    data_root: Path,
) -> None:
    listed = data.list_split(data_root, "train")
    train, val = data.carve(listed, 0.1, design="earliest")
    train_patients = {data.patient_id(f.name) for f in train.files}
    val_patients = {data.patient_id(f.name) for f in val.files}
    assert not train_patients & val_patients and len(train) + len(val) == len(listed)

    def number(patient: str) -> int:
        return int(re.findall(r"\d+", patient)[-1])

    for series in ("IM-", "NORMAL2-IM-", "PERSON"):
        held = [number(p) for p in val_patients if re.fullmatch(rf"{series}\d+", p)]
        kept = [number(p) for p in train_patients if re.fullmatch(rf"{series}\d+", p)]
        assert held and max(held) < min(kept)  # a hold-out in time, if numbers follow time
        n_held = sum(
            re.fullmatch(rf"{series}\d+", data.patient_id(f.name)) is not None for f in val.files
        )
        n_all = sum(
            re.fullmatch(rf"{series}\d+", data.patient_id(f.name)) is not None for f in listed.files
        )
        assert 0.08 < n_held / n_all < 0.12
    assert data.carve(listed, 0.1, seed=5, design="earliest")[1].files == val.files


def test_earliest_design_spares_series_too_small_to_give_a_patient(tmp_path: Path) -> None:
    names = [f"scan_{i:03d}.png" for i in range(20)] + ["alpha.png", "beta.png"]
    split = data.Manifest([tmp_path / n for n in names], np.zeros(len(names), np.int64), ["A", "B"])
    _, val = data.carve(split, 0.1, design="earliest")
    assert [f.name for f in val.files] == ["scan_000.png", "scan_001.png"]
    with pytest.raises(PneumoscanError, match="val_design 'latest': choose one of random"):
        data.carve(split, 0.1, design="latest")


def test_missing_or_empty_folders_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(PneumoscanError, match="does not exist"):
        data.list_split(tmp_path / "nowhere", "train")
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "train" / "PNEUMONIA").mkdir()
    with pytest.raises(PneumoscanError, match="holds no images"):
        data.list_split(tmp_path, "train")
    with pytest.raises(PneumoscanError, match="test does not exist"):
        data.list_split(tmp_path, "test")


def test_decode_once_cache_and_unreadable_files_are_skipped(
    tmp_path: Path, xray_files: list[Path]
) -> None:
    for klass in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "test" / klass).mkdir(parents=True)
    for f in xray_files:
        (tmp_path / "test" / f.parent.name / f.name).symlink_to(f)
    (tmp_path / "test" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    split = data.list_split(tmp_path, "test")
    with pytest.warns(UserWarning, match="broken.jpeg"):
        images, kept = data.load_images(split, 64)
    assert images.shape == (len(xray_files), 64, 64)
    assert all(f.name != "broken.jpeg" for f in kept.files)
    expected = np.asarray(
        Image.open(kept.files[0]).convert("L").resize((64, 64), Image.Resampling.BILINEAR)
    )
    assert np.array_equal(images[0], expected)
    cached, kept_again = data.load_images(split, 64)  # second call: memory-mapped, no warning
    assert isinstance(cached, np.memmap)
    assert kept_again.files == kept.files
    assert np.array_equal(np.asarray(cached), np.asarray(images))


NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "external" / "nih_adult"


@pytest.fixture(scope="module")
def nih_csv() -> Path:
    if not (NIH / "labels.csv").is_file():
        pytest.skip("no nih_adult data beside the data set")
    return NIH / "labels.csv"


def test_a_csv_becomes_a_manifest_with_patients_sources_and_views(nih_csv: Path) -> None:
    manifest = data.read(nih_csv)
    counts = manifest.counts()["nih_adult"]  # named for the folder that holds the CSV
    assert counts["images"] == 440 and counts["NORMAL"] == 204 and counts["PNEUMONIA"] == 236
    assert counts["patients"] == 310 and counts["views"] == {"AP": 254, "PA": 186}
    assert manifest.class_names == ["NORMAL", "PNEUMONIA"]
    assert all(f.is_file() for f in manifest.files)
    named = data.read(f"adults={nih_csv}")
    assert set(named.sources) == {"adults"}


def test_a_csv_names_what_is_wrong_in_one_line(tmp_path: Path, xray_files: list[Path]) -> None:
    (tmp_path / "a.csv").write_text("path,diagnosis\nx.png,NORMAL\n")
    with pytest.raises(PneumoscanError, match="needs the columns file and label"):
        data.read(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text(
        "file,label\n" + "".join(f"{f},{lab}\n" for f, lab in zip(xray_files, "ABC", strict=False))
    )
    with pytest.raises(PneumoscanError, match="two classes"):
        data.read(tmp_path / "b.csv")
    rows = [f"{xray_files[0]},normal,p1", f"{xray_files[-1]},PNEUMONIA,p2", "gone.png,NORMAL,p3"]
    (tmp_path / "c.csv").write_text("file,label,patient_id\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"skipping 1 listed file\(s\) not found: gone.png"):
        manifest = data.read(tmp_path / "c.csv")
    assert manifest.labels.tolist() == [0, 1] and manifest.patients == ["p1", "p2"]


def test_class_folders_and_files_without_a_patient_id(
    tmp_path: Path, xray_files: list[Path]
) -> None:
    (tmp_path / "site" / "normal" / "ward").mkdir(parents=True)
    (tmp_path / "site" / "Pneumonia").mkdir()
    (tmp_path / "site" / "normal" / "ward" / "scan1.jpeg").symlink_to(xray_files[0])
    (tmp_path / "site" / "Pneumonia" / xray_files[-1].name).symlink_to(xray_files[-1])
    with pytest.warns(UserWarning, match="1 of 2 files have no patient id"):
        manifest = data.read(tmp_path / "site")
    assert manifest.class_names == ["NORMAL", "PNEUMONIA"] and manifest.labels.tolist() == [0, 1]
    assert set(manifest.sources) == {"site"}


def test_several_data_sets_are_one_manifest_with_distinct_sources(
    data_root: Path, nih_csv: Path
) -> None:
    both = data.read_all([data_root, nih_csv], "test")
    assert both.source_names == ["chest_xray", "nih_adult"] and len(both) == 624 + 440
    assert len(set(both.groups)) == len(set(both.groups[:624])) + 310
    with pytest.raises(PneumoscanError, match="name each data set with NAME=PATH"):
        data.read_all([nih_csv, nih_csv])


def test_validation_is_carved_by_patient_within_each_source_and_by_view(
    data_root: Path, nih_csv: Path
) -> None:
    both = data.read_all([data_root, nih_csv], "train")
    train, val = data.carve(both, {"default": 0.1, "nih_adult": 0.25})
    assert not set(train.groups) & set(val.groups)
    counts = val.counts()
    assert counts["chest_xray"]["images"] == 522  # as the Kermany data alone carves it
    nih = counts["nih_adult"]
    assert 0.2 < nih["images"] / 440 < 0.3
    assert abs(nih["views"]["AP"] / nih["images"] - 254 / 440) < 0.05  # stratified by view
    assert abs(nih["PNEUMONIA"] / nih["images"] - 236 / 440) < 0.05
    alone = data.carve(data.read(data_root, "train"), 0.1)[1]
    assert alone.files == [f for f in val.files if f in set(alone.files)]
    tiny = both.subset(np.concatenate([np.arange(5), both.of_source("nih_adult")[:6]]))
    with pytest.raises(PneumoscanError, match="too few to carve a validation set"):
        data.carve(tiny, 0.25)
