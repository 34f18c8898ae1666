"""Screening real files: formats agree, bad files become entries, non-X-rays are flagged."""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from helpers import dicom_bytes, dicom_dataset
from PIL import Image, ImageDraw

from pneumoscan import model_folder, runtime, screening
from pneumoscan.errors import PneumoscanError


@pytest.fixture(scope="module")
def transfer() -> model_folder.LoadedModel:
    return model_folder.load("transfer")


@pytest.fixture(scope="module", params=["cnn", "transfer"])
def shipped(request: pytest.FixtureRequest) -> model_folder.LoadedModel:
    """Each bundled model that screens by default or by choice, with its own guard threshold."""
    return model_folder.load(request.param)


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def variants(
    xray_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Path]]:
    """Each real test image re-saved in the formats a clinic's systems produce."""
    root = tmp_path_factory.mktemp("variants")
    out: dict[str, list[Path]] = {}
    for f in xray_files:
        grey = np.asarray(Image.open(f).convert("L"))
        img = Image.fromarray(grey)
        files = {
            "jpeg": f,
            "png8": _save(img, root / f"{f.stem}.png"),
            "png16": _save(
                Image.fromarray(grey.astype(np.uint16) * 257), root / f"{f.stem}-16.png"
            ),
            "rgb_jpeg": _save(img.convert("RGB"), root / f"{f.stem}-rgb.jpg", quality=95),
            "large_png": _save(
                img.resize((1024, 1024), Image.Resampling.LANCZOS), root / f"{f.stem}-1024.png"
            ),
        }
        mono2 = root / f"{f.stem}-mono2.dcm"
        mono2.write_bytes(dicom_bytes(dicom_dataset(grey.astype(np.uint16) * 16, bits_stored=12)))
        mono1 = root / f"{f.stem}-mono1.dcm"
        mono1.write_bytes(
            dicom_bytes(dicom_dataset(4095 - grey.astype(np.uint16) * 16, "MONOCHROME1", 12))
        )
        files["dicom_mono2"], files["dicom_mono1"] = mono2, mono1
        for name, path in files.items():
            out.setdefault(name, []).append(path)
    return out


def test_every_format_of_the_same_image_gives_the_same_probability(
    transfer: model_folder.LoadedModel, variants: dict[str, list[Path]]
) -> None:
    reference = [r.probability for r in screening.predict(transfer, variants["jpeg"])]
    for name, files in variants.items():
        results = list(screening.predict(transfer, files))
        assert all(r.error is None and not r.ood for r in results), (name, results)
        probabilities = [r.probability for r in results]
        assert np.allclose(probabilities, reference, atol=0.02), (name, probabilities, reference)


def _non_xrays(root: Path) -> list[Path]:
    """Pictures that are not chest X-rays: generated ones and ones that packages ship."""
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    samples = Path(matplotlib.get_data_path()) / "sample_data"
    files = [
        samples / "grace_hopper.jpg",
        samples / "Minduka_Present_Blue_Pack.png",
        samples / "logo2.png",
    ]
    mri = np.frombuffer(gzip.decompress((samples / "s1045.ima.gz").read_bytes()), ">u2").reshape(
        256, 256
    )
    files.append(
        _save(Image.fromarray((mri / mri.max() * 255).astype(np.uint8)), root / "mri_head.png")
    )
    terrain = np.load(samples / "jacksboro_fault_dem.npz")["elevation"]
    terrain = (terrain - terrain.min()) / np.ptp(terrain) * 255
    files.append(_save(Image.fromarray(terrain.astype(np.uint8)), root / "terrain.png"))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        files.append(Path(get_testdata_file(name)))
    document = Image.new("L", (850, 1100), 250)
    draw = ImageDraw.Draw(document)
    for line in range(40):
        draw.text(
            (60, 40 + line * 25),
            "Patient referral letter: lorem ipsum dolor sit amet " * 2,
            fill=20,
        )
    files.append(_save(document, root / "scanned_letter.png"))
    files.append(
        _save(
            Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), root / "noise.jpg"
        )
    )
    files.append(_save(Image.new("L", (512, 512), 0), root / "black.png"))
    files.append(_save(Image.new("L", (512, 512), 255), root / "white.png"))
    board = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((32, 32))).astype(np.uint8)
    files.append(_save(Image.fromarray(board), root / "checkerboard.png"))
    return files


def test_guard_flags_pictures_that_are_not_chest_xrays(
    shipped: model_folder.LoadedModel, tmp_path: Path
) -> None:
    files = _non_xrays(tmp_path)
    results = list(screening.predict(shipped, files))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    flagged = [r for r in results if r.ood]
    missed = [Path(r.file).name for r in results if not r.ood]
    assert len(flagged) / len(results) >= 0.9, f"not flagged: {missed}"
    assert all(r.label is None for r in flagged)


def test_guard_passes_real_test_xrays(shipped: model_folder.LoadedModel, data_root: Path) -> None:
    files = (
        sorted((data_root / "test" / "NORMAL").iterdir())[::4]
        + sorted((data_root / "test" / "PNEUMONIA").iterdir())[::6]
    )
    results = list(screening.predict(shipped, files))
    passed = np.mean([not r.ood for r in results])
    assert passed >= 0.97
    assert shipped.meta["ood"]["validation_pass_rate"] >= 0.99


def _bad_files(root: Path, good: Path) -> list[Path]:
    bad = {
        "empty.jpg": b"",
        "truncated.jpeg": good.read_bytes()[:2000],
        "notes.png": b"this is a text file, not an image",
    }
    paths = []
    for name, data in bad.items():
        (root / name).write_bytes(data)
        paths.append(root / name)
    paths.append(_save(Image.new("L", (1, 1)), root / "one_pixel.png"))
    frames = [Image.new("L", (64, 64), v) for v in (0, 255)]
    paths.append(_save(frames[0], root / "animated.gif", save_all=True, append_images=frames[1:]))
    return paths


def test_a_bad_file_never_stops_the_batch(
    transfer: model_folder.LoadedModel, xray_files: list[Path], tmp_path: Path
) -> None:
    bad = _bad_files(tmp_path, xray_files[0])
    files = [xray_files[0], *bad, xray_files[-1]]
    results = list(screening.predict(transfer, files, batch_size=2))
    assert [r.file for r in results] == [str(f) for f in files]  # order kept
    assert results[0].error is None and results[-1].error is None
    for r in results[1:-1]:
        assert r.error and r.file in r.error and "\n" not in r.error
        assert r.probability is None and r.label is None


def test_expand_paths(tmp_path: Path, xray_files: list[Path]) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, f in enumerate(xray_files[:3]):
        (tmp_path / "a" / ("b" if i else "") / f.name).write_bytes(f.read_bytes())
    (tmp_path / "a" / "download.jfif").write_bytes(xray_files[0].read_bytes())  # Windows' JPEG
    (tmp_path / "a" / "README.txt").write_text("notes")
    (tmp_path / "a" / "export0001").write_bytes(b"DICOM export without a suffix")
    # Named by UID, as PACS exports and dcmtk's storescp write them: their ".NNN" is no suffix.
    film = dicom_bytes(dicom_dataset(np.asarray(Image.open(xray_files[0]).convert("L"))))
    uid_names = ["CR.1.2.840.113619.2.55.3.2831164356.781", "1.3.12.2.1107.5.3.4.2373.1"]
    for name in uid_names:
        (tmp_path / "a" / "b" / name).write_bytes(film)
    (tmp_path / "a" / "b" / "notes.1").write_text("not DICOM, whatever its suffix")
    (tmp_path / "a" / "b" / "clip.gif").write_bytes(b"GIF89a")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"hidden")
    found = screening.expand_paths([tmp_path / "a"])
    names = {*(f.name for f in xray_files[:3]), "download.jfif", "export0001", *uid_names}
    assert {p.name for p in found} == names
    scan = screening.scan_paths([tmp_path / "a"])
    assert scan.skipped == {".txt": 1, ".gif": 1, ".1": 1}
    assert scan.note() == "skipped 3 files with unsupported suffixes: .1, .gif, .txt"
    with pytest.raises(PneumoscanError, match="no such file"):
        screening.expand_paths([tmp_path / "missing.jpg"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan", "predict", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_json_exit_codes_sort_and_csv(xray_files: list[Path], tmp_path: Path) -> None:
    ok = _cli(*map(str, xray_files), "--json", "--sort")
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)
    assert len(rows) == len(xray_files)
    assert all(set(r) == set(screening.FIELDS) for r in rows)
    probabilities = [r["probability"] for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert {r["label"] for r in rows} <= {"NORMAL", "PNEUMONIA"} and all(
        r["mode"] == "detection" for r in rows
    )

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    target = tmp_path / "out.csv"
    mixed = _cli(str(xray_files[0]), str(broken), "--csv", str(target), "--mode", "balanced")
    assert mixed.returncode == 2
    with target.open() as handle:
        table = list(csv.DictReader(handle))
    assert [Path(r["file"]).name for r in table] == [xray_files[0].name, "broken.jpg"]
    assert table[1]["error"] and not table[0]["error"] and table[0]["mode"] == "balanced"

    again = _cli(str(xray_files[0]), "--csv", str(target))
    assert again.returncode == 1 and "--force" in again.stderr  # never overwritten without asking
    usage = _cli(str(xray_files[0]), "--mode", "nope")
    assert usage.returncode == 1 and usage.stderr.count("\n") == 1
    missing = _cli(str(tmp_path / "nope.png"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_dicom_patient_data_never_reaches_the_output(
    xray_files: list[Path], tmp_path: Path
) -> None:
    from helpers import SECRETS

    grey = np.asarray(Image.open(xray_files[0]).convert("L"))
    good = tmp_path / "good.dcm"
    good.write_bytes(dicom_bytes(dicom_dataset(grey)))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(dicom_bytes(dicom_dataset(grey))[:-3000])
    result = _cli(str(good), str(broken), "--json")
    table = tmp_path / "results.csv"
    as_csv = _cli(str(good), str(broken), "--csv", str(table))
    assert result.returncode == as_csv.returncode == 2
    outputs = [result.stdout, result.stderr, as_csv.stdout, as_csv.stderr, table.read_text()]
    assert not any(secret in text for secret in SECRETS for text in outputs)
    assert json.loads(result.stdout)[0]["label"] in ("NORMAL", "PNEUMONIA")


def test_memory_stays_flat_over_many_files(
    transfer: model_folder.LoadedModel, xray_files: list[Path]
) -> None:
    """The stream holds a few batches at a time: results arrive before the input is exhausted."""
    consumed = 0

    def files():
        nonlocal consumed
        for i in range(200):
            consumed += 1
            yield xray_files[i % len(xray_files)]

    stream = screening.predict(transfer, files(), batch_size=8)
    first = next(stream)
    assert first.error is None
    assert consumed <= 8 * 4  # at most the batches in flight were read ahead
    assert sum(1 for _ in stream) == 199


def test_tiff_scores_as_png_does_in_8_12_and_16_bits(
    xray_files: list[Path], tmp_path: Path
) -> None:
    """Film digitisers write TIFF, and 16-bit files often hold 12 bits (0-4095): each comes
    back as the 8-bit film exactly, so scores the same, and none is taken for a blank frame."""
    grey = np.asarray(Image.open(xray_files[4]).convert("L"))
    wide = grey.astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "film.png")
    Image.fromarray(grey).save(tmp_path / "film8.tif")
    Image.fromarray(wide * 257).save(tmp_path / "film16.tiff")
    Image.fromarray(wide * 16).save(tmp_path / "film12.tif")
    Image.fromarray(wide * 16 + wide // 16).save(tmp_path / "scan12.png")
    files = screening.expand_paths([tmp_path])
    assert sorted(p.suffix for p in files) == [".png", ".png", ".tif", ".tif", ".tiff"]
    results = list(screening.predict(runtime.load("ensemble"), files))
    assert all(r.error is None and r.domain == "in_domain" for r in results)
    assert len({r.probability for r in results}) == 1
