"""Site calibration on real images: a new, complete model folder with refitted points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from pneumoscan import calibrate, model_folder, runtime
from pneumoscan.errors import PneumoscanError


@pytest.fixture(scope="module")
def site(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's folder: 30 normals, 40 pneumonias in a sub-folder, lower-case names, a bad file."""
    root = tmp_path_factory.mktemp("site")
    (root / "normal").mkdir()
    (root / "Pneumonia" / "ward-3").mkdir(parents=True)
    for f in sorted((data_root / "test" / "NORMAL").iterdir())[:30]:
        (root / "normal" / f.name).symlink_to(f)
    for f in sorted((data_root / "test" / "PNEUMONIA").iterdir())[:40]:
        (root / "Pneumonia" / "ward-3" / f.name).symlink_to(f)
    (root / "normal" / "scan.png").write_bytes(b"not a png")
    return root


def test_calibrate_writes_a_complete_folder_and_leaves_the_weights(site: Path, tmp_path) -> None:
    out = tmp_path / "calibrated"
    with pytest.warns(UserWarning, match=r"skipping unreadable image: .*scan\.png"):
        code, stdout, stderr = run_cli(
            "calibrate", "--model", "transfer", "--data", str(site), "--out", str(out)
        )
    assert code == 0, stderr
    assert "30 NORMAL, 40 PNEUMONIA" in stdout and "detection: threshold" in stdout
    assert "40 PNEUMONIA images cannot support sensitivity 0.98" in stderr
    meta = json.loads((out / "model.json").read_text())
    original = runtime.load("transfer")
    assert meta["weights"]["sha256"] == original.meta["weights"]["sha256"]
    assert meta["site_calibration"]["counts"] == {"NORMAL": 30, "PNEUMONIA": 40}
    assert (
        meta["site_calibration"]["skipped"] == 1
        and len(meta["site_calibration"]["fingerprint"]) > 8
    )
    assert meta["calibration"] != original.meta["calibration"]
    assert "site images" in meta["operating_points"]["detection"]["rule"]
    # The external films' labels were at the shipped thresholds: not this folder's record.
    assert model_folder.EXTERNAL_KEY in original.meta and model_folder.EXTERNAL_KEY not in meta
    loaded = runtime.load(out)  # checksums hold: the graph and weights were copied as they were
    assert loaded.threshold("detection") == meta["operating_points"]["detection"]["threshold"]
    model_folder.load(out)


def test_calibration_is_in_sample_and_not_worse(site: Path, tmp_path) -> None:
    fitted = calibrate.calibrate("ensemble", site, tmp_path / "c")
    assert fitted.ece_after <= fitted.ece_before + 1e-9
    for point in fitted.points.values():
        low, high = point["sensitivity_ci"]
        assert low <= point["sensitivity"] <= high


def test_positives_needed_for_a_target() -> None:
    # Catching all n positives shows sensitivity >= 0.025 ** (1 / n) at 95%.
    n = calibrate.min_positives(0.98)
    assert 0.025 ** (1 / n) >= 0.98 > 0.025 ** (1 / (n - 1))


@pytest.mark.parametrize(
    ("layout", "phrase"),
    [
        ({"NORMAL": 2}, "missing PNEUMONIA"),
        ({"NORMAL": 2, "PNEUMONIA": 0}, "no readable PNEUMONIA image"),
    ],
)
def test_a_site_folder_without_both_classes_is_refused(
    layout: dict, phrase: str, data_root: Path, tmp_path: Path
) -> None:
    images = sorted((data_root / "test" / "NORMAL").iterdir())
    for name, count in layout.items():
        (tmp_path / "site" / name).mkdir(parents=True)
        for f in images[:count]:
            (tmp_path / "site" / name / f.name).symlink_to(f)
    code, _, stderr = run_cli(
        "calibrate", "--data", str(tmp_path / "site"), "--out", str(tmp_path / "o")
    )
    assert code == 1 and phrase in stderr and stderr.count("\n") == 1


def test_an_existing_out_needs_force(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, _, stderr = run_cli("calibrate", "--data", str(site), "--out", str(out))
    assert code == 1 and "pass --force" in stderr and (out / "notes.txt").read_text() == "keep"
    with pytest.raises(PneumoscanError, match="target-sensitivity"):
        calibrate.calibrate("ensemble", site, tmp_path / "x", target_sensitivity=1.5)
