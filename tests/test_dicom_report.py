"""DICOM out: the SR and SC built from a real X-ray's result, and `predict --dicom-out`."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from helpers import dicom_bytes, dicom_dataset, run_cli

from pneumoscan import dicom_report, reader, runtime, screening
from pneumoscan.screening import Prediction


@pytest.fixture(scope="module")
def model() -> runtime.OnnxModel:
    return runtime.load("ensemble")


@pytest.fixture(scope="module")
def source_file(xray_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = dicom_dataset(
        reader.read_image(xray_files[3]),
        SpecificCharacterSet="ISO_IR 100",
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.9.1",
        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.9.1.1",
        AccessionNumber="ACC-1",
    )
    ds.PatientName = "Müller^Anna"
    path = tmp_path_factory.mktemp("dicom") / "chest.dcm"
    path.write_bytes(dicom_bytes(ds))
    return path


def _items(ds) -> dict:
    found = {}
    for item in ds.get("ContentSequence", []):
        found[item.ConceptNameCodeSequence[0].CodeMeaning] = item
        found.update(_items(item))
    return found


def test_report_of_a_real_xray_matches_predict(model, source_file: Path) -> None:
    (result,) = screening.predict(model, [source_file])
    source = dicom_report.read_source(source_file.read_bytes())
    sr = dicom_report.Reporter(model).structured_report(source, result)
    again = pydicom.dcmread(io.BytesIO(dicom_report.encode(sr)))
    items = _items(again)
    assert items["Pneumonia"].ConceptCodeSequence[0].CodeValue == (
        "52101004" if result.label == "PNEUMONIA" else "272519000"
    )
    value = items["Probability of pneumonia"].MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(result.probability, abs=1e-9)
    assert items["Image domain"].ConceptCodeSequence[0].CodeValue == "IN_DOMAIN"
    # Latin-1 stays Latin-1: the name is encoded as the source encodes it.
    assert again.SpecificCharacterSet == "ISO_IR 100" and str(again.PatientName) == "Müller^Anna"
    assert "Müller".encode("latin-1") in dicom_report.encode(sr)
    assert again.AccessionNumber == "ACC-1"


def test_an_image_that_is_not_a_chest_xray_gets_no_finding(model, source_file: Path) -> None:
    source = dicom_report.read_source(source_file.read_bytes())
    flagged = Prediction(
        "photo.dcm", probability=0.97, label=None, threshold=0.5, mode="detection", ood=True
    )
    items = _items(dicom_report.Reporter(model).structured_report(source, flagged))
    assert "Pneumonia" not in items and "Probability of pneumonia" not in items
    assert items["Image domain"].ConceptCodeSequence[0].CodeMeaning.startswith("not a chest X-ray")
    reporter = dicom_report.Reporter(model, ("sr", "sc"))
    assert [kind for kind, _ in reporter.build(source, flagged)] == ["sr"]  # no heatmap to show


def test_uids_are_fixed_by_the_source_and_series_shared_by_the_study(
    model, source_file: Path
) -> None:
    source = dicom_report.read_source(source_file.read_bytes())
    (result,) = screening.predict(model, [source_file])
    reporter = dicom_report.Reporter(model, uid_root="1.2.3.4")
    first, second = (reporter.structured_report(source, result) for _ in range(2))
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SOPInstanceUID.startswith("1.2.3.4.")
    other = dicom_report.read_source(source_file.read_bytes())
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.9.2"
    third = reporter.structured_report(other, result)
    assert third.SOPInstanceUID != first.SOPInstanceUID
    assert third.SeriesInstanceUID == first.SeriesInstanceUID


def test_made_here_and_not_dicom() -> None:
    assert dicom_report.read_source(b"\xff\xd8\xff not DICOM") is None
    ds = pydicom.Dataset()
    ds.Manufacturer = "pneumoscan"
    assert dicom_report.made_here(ds)


def test_predict_dicom_out_writes_reports_beside_nothing_it_overwrites(
    source_file: Path, xray_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "reports"
    args = ("predict", str(source_file), str(xray_files[0]), "--dicom-out", str(out))
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert "wrote 1 DICOM object(s)" in err and "1 input(s) not DICOM" in err
    assert [p.name for p in out.iterdir()] == ["chest.sr.dcm"]
    code, _, _ = run_cli(*args)
    assert sorted(p.name for p in out.iterdir()) == ["chest.sr-2.dcm", "chest.sr.dcm"]
    code, _, err = run_cli(
        "predict",
        str(source_file),
        "--dicom-out",
        str(out / "sc"),
        "--heatmaps",
        str(tmp_path / "maps"),
    )
    assert code == 0, err
    sc = pydicom.dcmread(out / "sc" / "chest.sc.dcm")
    assert sc.BurnedInAnnotation == "YES" and sc.PatientName == "Müller^Anna"
    if shutil.which("dciodvfy"):
        for path in (out / "chest.sr.dcm", out / "sc" / "chest.sc.dcm"):
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            assert "Error" not in check.stdout + check.stderr, path


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["listen", "--forward", "PACS:104"], "--forward 'PACS:104': write AET@HOST:PORT"),
        (
            ["listen", "--forward", "P@h:1", "--outputs", "pdf"],
            "--outputs 'pdf': choose from sr, sc",
        ),
        (
            ["listen", "--forward", "P@h:1", "--outputs", "sc", "--model", "dense"],
            "--outputs sc: heatmaps need a convolutional model",
        ),
        (
            ["listen", "--forward", "P@h:1", "--uid-root", "1.x.3"],
            "--uid-root '1.x.3': not a valid UID root",
        ),
        (["listen", "--forward", "P@h:1", "--tls-cert", "c.pem"], "--tls-cert and --tls-key"),
        (["listen", "--forward", "P@h:1", "--ae-title", "A" * 17], "--ae-title"),
        (["listen", "--forward", "P@h:1", "--mode", "fast"], "--mode 'fast'"),
        (["serve", "--token-file", "/no/such/token"], "--token-file /no/such/token: no such file"),
    ],
)
def test_mistakes_are_one_line(args, phrase, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*args)
    assert code == 1 and phrase in err and err.count("\n") == 1, err


def test_dicom_out_that_is_a_file_is_refused(source_file: Path, tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    code, _, err = run_cli("predict", str(source_file), "--dicom-out", str(target))
    assert code == 1 and "exists and is not a folder" in err and target.read_text() == "mine"


def test_an_adult_film_from_elsewhere_is_reported_as_shifted(model, tmp_path: Path) -> None:
    external = Path(__file__).resolve().parents[2] / "shared" / "data" / "external"
    film = external / "figure1_covid_cxr" / "images" / "COVID-00001.jpg"
    if not film.exists():
        pytest.skip("no external films")
    ds = dicom_dataset(
        reader.read_image(film),
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.9.5",
        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.9.5.1",
    )
    path = tmp_path / "adult.dcm"
    path.write_bytes(dicom_bytes(ds))
    (result,) = screening.predict(model, [path])
    assert result.domain == "shifted" and result.label is not None
    items = _items(dicom_report.Reporter(model).structured_report(ds, result))
    assert (
        items["Image domain"].ConceptCodeSequence[0].CodeMeaning.startswith("unlike the training")
    )
    assert "Pneumonia" in items and "Probability of pneumonia" in items
