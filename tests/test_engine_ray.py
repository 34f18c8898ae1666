"""`predict --engine ray` on a real local Ray (2 CPUs) and real images: the plain command's
answers row for row, a resume after a real kill, bad files as rows, 10,000 files in flat memory,
Parquet; and the mistakes a user can make, each one line and exit code 1."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray with 2 CPUs and a small object store; its address, for other processes."""
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def plain_test_csv(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plain command's CSV for the 624 test images."""
    out = tmp_path_factory.mktemp("plain") / "plain.csv"
    code, _, err = run_cli("predict", str(data_root / "test"), "--csv", str(out))
    assert code == 0, err
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_same_rows_as_the_plain_command(
    cluster: str, data_root: Path, plain_test_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray.csv"
    code, _, err = run_cli("predict", str(data_root / "test"), "--engine", "ray", "--csv", str(out))
    assert code == 0, err
    assert "624 of 624 files scored" in err
    assert out.read_text() == plain_test_csv.read_text()  # every field, to the last digit


@pytest.mark.slow
def test_resume_after_a_kill_neither_repeats_nor_loses_a_row(
    cluster: str, data_root: Path, plain_test_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray.csv"
    command = [sys.executable, "-m", "pneumoscan", "predict", str(data_root / "test")]
    command += ["--engine", "ray", "--ray-address", cluster, "--csv", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if out.exists() and out.read_text().count("\n") > 64:
            break
        time.sleep(0.05)
    assert run.poll() is None, run.stderr.read().decode()
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    run.stderr.close()
    written = out.read_text().count("\n") - 1
    assert 0 < written < 624  # killed mid-run
    with out.open("a") as handle:  # as if the kill had cut a row in half
        handle.write("../half/a/row.jpeg,0.5")
    code, _, err = run_cli(
        "predict", str(data_root / "test"), "--engine", "ray", "--csv", str(out), "--resume"
    )
    assert code == 0, err
    assert f"{624 - written} of {624 - written} files scored" in err
    assert out.read_text() == plain_test_csv.read_text()


def _mixed_folder(root: Path, data_root: Path) -> Path:
    """Real X-rays and files that cannot be read, as the plain command's tests use."""
    root.mkdir()
    images = sorted((data_root / "test" / "NORMAL").iterdir())[:3]
    for image in images:
        (root / image.name).symlink_to(image)
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpeg").write_bytes(images[0].read_bytes()[:2000])
    (root / "notes.png").write_bytes(b"this is a text file, not an image")
    Image.new("L", (1, 1)).save(root / "one_pixel.png")
    return root


@pytest.mark.slow
def test_bad_files_are_rows_and_parquet_holds_the_same(
    cluster: str, data_root: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    folder = _mixed_folder(tmp_path / "mixed", data_root)
    code, plain, _ = run_cli("predict", str(folder), "--json", "--model", "transfer")
    assert code == 2
    expected = json.loads(plain)
    out = tmp_path / "ray.csv"
    args = ("predict", str(folder), "--engine", "ray", "--model", "transfer")
    code, _, err = run_cli(*args, "--csv", str(out))
    assert code == 2 and "4 failed" in err
    rows = _rows(out)
    assert [r["file"] for r in rows] == [e["file"] for e in expected]
    assert [r["error"] for r in rows] == [e["error"] or "" for e in expected]
    assert sum(bool(r["error"]) for r in rows) == 4
    code, _, err = run_cli(*args, "--parquet", str(tmp_path / "parquet"))
    assert code == 2, err
    assert pq.read_table(tmp_path / "parquet").to_pylist() == expected


@pytest.mark.slow
def test_ten_thousand_files_in_flat_driver_memory(
    cluster: str, data_root: Path, tmp_path: Path
) -> None:
    # Real X-rays, made small so that the run is about the engine, not JPEG decoding.
    sources = sorted((data_root / "test" / "PNEUMONIA").iterdir())[:20]
    small = tmp_path / "small"
    small.mkdir()
    for i, source in enumerate(sources):
        Image.open(source).convert("L").resize((160, 160)).save(small / f"x{i}.png")
    archive = tmp_path / "archive"
    for n in range(10_000):
        folder = archive / f"{n // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:05d}.png").symlink_to(small / f"x{n % 20}.png")
    out = tmp_path / "ray.csv"
    # The driver as a process of its own, so its peak memory is its own.
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [sys.executable, "-c", probe, sys.executable, "-m", "pneumoscan", "predict"]
    command += [str(archive), "--engine", "ray", "--ray-address", cluster]
    command += ["--model", "dense", "--csv", str(out)]  # the lightest graph: the engine is tested
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.split()[-1]) / 1024
    rows = _rows(out)
    assert len(rows) == 10_000 and len({r["file"] for r in rows}) == 10_000
    assert not any(r["error"] for r in rows)
    by_source = {}
    for row in rows:  # each link scores as the image it points to
        source = int(Path(row["file"]).stem) % 20
        assert by_source.setdefault(source, row["probability"]) == row["probability"]
    print(f"driver peak RSS {peak_mb:.0f} MB for 10,000 files")
    assert peak_mb < 600  # the driver holds a few batches, not the archive's results


def test_user_mistakes_are_one_line(tmp_path: Path, xray_files: list[Path], monkeypatch) -> None:
    image = str(xray_files[0])
    existing = tmp_path / "old.csv"
    existing.write_text("x\n")
    cases = {
        ("--csv", str(existing)): "pass --resume to continue it or --force",
        ("--resume",): "--resume needs the output",
        (): "--csv FILE or --parquet FOLDER",
        ("--json",): "--json does not work with --engine ray",
        ("--csv", str(tmp_path / "a.csv"), "--ray-address", "127.0.0.1:1"): "no Ray cluster",
        ("--csv", str(tmp_path / "a.csv"), "--ray-address", "nowhere"): "write auto or HOST:PORT",
    }
    for extra, message in cases.items():
        code, _, err = run_cli("predict", image, "--engine", "ray", *extra)
        assert code == 1 and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "a.csv").exists()  # nothing written when Ray cannot be reached
    code, _, err = run_cli("predict", image, "--resume")
    assert code == 1 and "--resume works with --engine ray" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = run_cli("predict", image, "--engine", "ray", "--csv", str(tmp_path / "b.csv"))
    assert code == 1 and "pip install 'pneumoscan[ray]'" in err and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run_cli("predict", image, "--engine", "ray", "--parquet", str(tmp_path / "p"))
    assert code == 1 and "--parquet needs pyarrow" in err


def test_a_half_written_last_row_is_dropped_on_resume(tmp_path: Path) -> None:
    from pneumoscan import engine_ray

    path = tmp_path / "out.csv"
    output = engine_ray.CsvOutput(path, resume=False)
    output.start()
    output.write([{"file": "a.png", "probability": 0.25, "ood": False}])
    output.close()
    with path.open("a") as handle:
        handle.write("b.png,0.7")
    resumed = engine_ray.CsvOutput(path, resume=True)
    assert resumed.done == {"a.png"}
    resumed.start()
    resumed.write([{"file": "b.png", "probability": 0.75, "ood": False}])
    resumed.close()
    assert [r["file"] for r in _rows(path)] == ["a.png", "b.png"]
    assert np.isclose(float(_rows(path)[1]["probability"]), 0.75)
