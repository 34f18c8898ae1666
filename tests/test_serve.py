import asyncio
import base64
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import dicom_bytes, dicom_dataset
from PIL import Image

from pneumoscan import model_folder, reader
from pneumoscan.serve import create_app

# The API's contract: these fields, in this order (domain and warning came last, with issue 19).
FIELDS_IN_ORDER = (
    "file",
    "probability",
    "label",
    "threshold",
    "mode",
    "ood",
    "ood_score",
    "error",
    "domain",
    "warning",
    "population",
)
FIELDS = set(FIELDS_IN_ORDER)
GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def cnn_folder(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["cnn"]


@pytest.fixture(scope="module")
def client(cnn_folder: Path) -> TestClient:
    with TestClient(create_app(cnn_folder)) as test_client:
        yield test_client


def upload(name: str, content: bytes, kind: str = "application/octet-stream") -> tuple:
    return ("files", (name, content, kind))


def jpegs(paths: list[Path]) -> list[tuple]:
    return [upload(p.name, p.read_bytes(), "image/jpeg") for p in paths]


def test_health(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_card_comes_from_model_json(client: TestClient, cnn_folder: Path) -> None:
    meta = model_folder.load(cnn_folder).meta
    card = client.get("/api/v1/model").json()
    assert card["name"] == meta["name"] and card["architecture"] == "cnn" and card["members"] == 1
    assert card["input_size"] == meta["input_size"]
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"]
    for name in ("detection", "balanced"):
        point = card["operating_points"][name]
        assert point["threshold"] == meta["operating_points"][name]["threshold"]
        assert (
            point["validation"]["sensitivity"]
            == meta["operating_points"][name]["validation"]["sensitivity"]
        )
    assert card["calibration"]["scale"] == meta["calibration"]["scale"]
    assert card["ood"]["threshold"] == meta["ood"]["threshold"]
    assert card["ood"]["validation_pass_rate"] == meta["ood"]["validation_pass_rate"]
    assert card["pneumoscan_version"] and card["format_version"] == 1
    assert card["limits"] == {"max_file_bytes": 20 * 1024 * 1024, "max_files": 20}
    assert card["result_fields"] == list(FIELDS_IN_ORDER)  # the page's CSV columns


def test_predict_scores_jpeg_png_and_dicom_and_reports_broken_files(
    client: TestClient, xray_files: list[Path]
) -> None:
    pixels = reader.read_image(xray_files[3])
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    truncated = xray_files[0].read_bytes()[:2000]
    files = [
        *jpegs(xray_files[:4]),
        upload("chest.png", png.getvalue(), "image/png"),
        upload("chest.dcm", dicom_bytes(dicom_dataset(pixels)), "application/dicom"),
        upload("truncated.jpeg", truncated, "image/jpeg"),
        upload("notes.txt", b"not an image at all", "text/plain"),
        upload("empty.png", b"", "image/png"),
    ]
    response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "cnn"
    results = body["results"]
    assert [r["file"] for r in results] == [f[1][0] for f in files]  # in order, names as sent
    for r in results:
        assert set(r) == FIELDS | {"heatmap_png"} and r["heatmap_png"] is None
        assert r["mode"] == "detection"
    scored, broken = results[:6], results[6:]
    for r in scored:
        assert r["error"] is None and 0.0 <= r["probability"] <= 1.0
        assert r["label"] in ("NORMAL", "PNEUMONIA") or r["ood"]
    # The same pixels give the same probability whatever the container (up to batched float maths).
    assert scored[4]["probability"] == pytest.approx(scored[3]["probability"], abs=1e-4)
    assert scored[5]["probability"] == pytest.approx(scored[3]["probability"], abs=1e-4)
    for r in broken:
        assert r["error"].startswith(r["file"] + ": ")
        assert r["probability"] is None and r["label"] is None


def test_file_names_are_the_uploads_own_not_paths(
    client: TestClient, xray_files: list[Path]
) -> None:
    content = xray_files[0].read_bytes()
    files = [upload("scans/ward 3/a.jpeg", content), upload("C:\\scans\\b.jpeg", content)]
    results = client.post("/api/v1/predict", files=files).json()["results"]
    assert [r["file"] for r in results] == ["a.jpeg", "b.jpeg"]


def test_heatmaps_are_png_when_asked(client: TestClient, xray_files: list[Path]) -> None:
    files = [*jpegs(xray_files[:2]), upload("broken.jpeg", b"\xff\xd8\xff broken")]
    response = client.post("/api/v1/predict?heatmap=true&mode=balanced", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    for r in results[:2]:
        image = Image.open(io.BytesIO(base64.b64decode(r["heatmap_png"])))
        assert image.format == "PNG" and image.mode == "RGB" and max(image.size) == 512
        assert r["mode"] == "balanced"
    assert results[2]["error"] and results[2]["heatmap_png"] is None


def test_mode_picks_the_operating_point(
    client: TestClient, cnn_folder: Path, xray_files: list[Path]
) -> None:
    points = model_folder.load(cnn_folder).meta["operating_points"]
    for mode in ("detection", "balanced"):
        response = client.post(f"/api/v1/predict?mode={mode}", files=jpegs(xray_files[:1]))
        result = response.json()["results"][0]
        assert result["threshold"] == points[mode]["threshold"]
        assert result["label"] == (
            "PNEUMONIA" if result["probability"] >= result["threshold"] else "NORMAL"
        )


def test_bad_mode_or_no_files_is_422(client: TestClient, xray_files: list[Path]) -> None:
    assert (
        client.post("/api/v1/predict?mode=screening", files=jpegs(xray_files[:1])).status_code
        == 422
    )
    assert client.post("/api/v1/predict").status_code == 422
    assert client.post("/api/v1/predict", data={"other": "x"}).status_code == 422


def test_nothing_readable_is_415(client: TestClient, xray_files: list[Path]) -> None:
    files = [
        upload("notes.txt", b"hello"),
        upload("x.jpeg", xray_files[0].read_bytes()[:500]),
        upload("x.png", b"\x89PNG\r\n\x1a\n truncated"),
    ]
    response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "no readable image" in detail and "notes.txt" in detail


def multipart(parts: list[tuple[str, bytes]], boundary: str = "pneumoscan-test") -> bytes:
    body = b""
    for name, content in parts:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode()


@pytest.fixture(scope="module")
def small_limits(cnn_folder: Path) -> TestClient:
    """20 kB per file, two files per request."""
    with TestClient(create_app(cnn_folder, max_file_bytes=20_000, max_files=2)) as test_client:
        yield test_client


def test_a_file_over_the_limit_is_413(small_limits: TestClient, xray_files: list[Path]) -> None:
    big = np.random.default_rng(0).integers(0, 255, 30_000, dtype=np.uint8).tobytes()
    response = small_limits.post(
        "/api/v1/predict", files=[*jpegs(xray_files[:1]), upload("big.png", big)]
    )
    assert response.status_code == 413
    assert response.json()["detail"] == "big.png: larger than 20,000 bytes"
    # Files within the limit are still accepted.
    assert small_limits.post("/api/v1/predict", files=jpegs(xray_files[:2])).status_code == 200


def test_too_many_files_is_413(small_limits: TestClient, xray_files: list[Path]) -> None:
    response = small_limits.post("/api/v1/predict", files=[upload("a.png", b"x")] * 3)
    assert response.status_code == 413 and "at most 2 per request" in response.json()["detail"]


@pytest.mark.parametrize("declared", ["honest", "absent", "false"])
def test_a_request_over_the_limit_is_413_whatever_its_content_length(
    small_limits: TestClient, declared: str
) -> None:
    # Two parts of 19 kB each pass the per-file limit; five of them do not fit in one request.
    body = multipart([(f"{i}.png", b"x" * 19_000) for i in range(5)])
    headers = {"content-type": "multipart/form-data; boundary=pneumoscan-test"}
    if declared == "false":
        headers["content-length"] = "1000"
    content = iter([body[i : i + 8192] for i in range(0, len(body), 8192)])
    response = small_limits.post(
        "/api/v1/predict",
        content=body if declared != "absent" else content,
        headers=headers,
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "request larger than 72,768 bytes"}


def _temp_files() -> set[str]:
    """What this process has open in the temp folder, and what the folder holds."""
    tmp = Path(tempfile.gettempdir()).resolve()
    fd_dir = Path("/proc/self/fd")
    held = set()
    if fd_dir.is_dir():
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(tmp)):
                held.add(target)
    return held | {str(p) for p in tmp.iterdir()}


def test_uploads_leave_nothing_behind(client: TestClient, xray_files: list[Path]) -> None:
    # An uncompressed PNG over 1 MB: starlette spools it to a temporary file.
    pixels = np.asarray(Image.fromarray(reader.read_image(xray_files[0])).resize((1400, 1200)))
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG", compress_level=0)
    assert len(png.getvalue()) > 1024 * 1024
    before = _temp_files()
    files = [upload("big.png", png.getvalue(), "image/png"), upload("bad.png", b"nope")]
    response = client.post("/api/v1/predict?heatmap=true", files=files)
    assert response.status_code == 200 and response.json()["results"][0]["error"] is None
    assert _temp_files() - before == set()


def test_concurrent_requests_get_their_own_results(
    cnn_folder: Path, xray_files: list[Path]
) -> None:
    app = create_app(cnn_folder)

    async def run() -> list[list[dict]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            requests = [
                http.post(
                    "/api/v1/predict",
                    params={"heatmap": str(i % 2 == 0).lower()},
                    files=jpegs(xray_files[i : i + 2]),
                )
                for i in range(4)
            ]
            responses = await asyncio.gather(*requests)
        return [r.json()["results"] for r in responses]

    with TestClient(app) as sequential:
        expected = [
            sequential.post("/api/v1/predict", files=jpegs(xray_files[i : i + 2])).json()["results"]
            for i in range(4)
        ]
    for got, want in zip(asyncio.run(run()), expected, strict=True):
        assert [r["file"] for r in got] == [r["file"] for r in want]
        # Heatmap requests score in torch, the others with ONNX Runtime: equal within 1e-4.
        probabilities = [r["probability"] for r in want]
        assert [r["probability"] for r in got] == pytest.approx(probabilities, abs=1e-4)


def test_page_docs_and_schema_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Research tool, not a medical device." in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'accept=".jpg,.jpeg,.png,.tif,.tiff,.dcm' in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    schema = client.get("/openapi.json").json()
    assert {"/api/v1/predict", "/api/v1/health", "/api/v1/model"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_serve_with_an_unknown_model_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan", "serve", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "not a bundled model" in result.stderr


@pytest.mark.skipif(
    not (model_folder.bundled_dir() / "transfer" / "model.json").is_file(),
    reason="the bundled transfer model is not installed",
)
def test_bundled_transfer_flags_a_photograph_as_not_an_xray(xray_files: list[Path]) -> None:
    with TestClient(create_app("transfer")) as client:
        files = [*jpegs(xray_files[:2]), upload("grace_hopper.jpg", GRACE_HOPPER.read_bytes())]
        response = client.post("/api/v1/predict?heatmap=true", files=files)
        assert response.status_code == 200
        xrays, photo = response.json()["results"][:2], response.json()["results"][2]
        assert all(not r["ood"] and r["label"] in ("NORMAL", "PNEUMONIA") for r in xrays)
        assert photo["ood"] is True and photo["label"] is None and photo["probability"] is not None
        assert client.get("/api/v1/model").json()["name"] == "transfer"


def test_the_default_models_card_says_it_is_an_ensemble() -> None:
    from pneumoscan import DEFAULT_MODEL

    with TestClient(create_app(DEFAULT_MODEL)) as client:
        card = client.get("/api/v1/model").json()
    # the cnn and two transfer heads on one frozen trunk (docs/experiments.md, section 23)
    assert card["name"] == "ensemble" and card["members"] == 3
    assert card["description"] == "cnn + transfer x2" and card["architecture"] == "mixture"
    assert card["validation"]["auc"] > 0.99
    # What it did on adult films from other hospitals (tools/external_check.py), for the page.
    external = card["external_check"]
    assert external["recognised"] == external["domain"]["in_domain"] + external["domain"]["shifted"]
    assert sum(external["labels"].values()) == external["recognised"]


TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def guarded(cnn_folder: Path) -> TestClient:
    with TestClient(create_app(cnn_folder, token=TOKEN)) as test_client:
        yield test_client


def test_a_token_guards_every_api_call_but_health(
    guarded: TestClient, xray_files: list[Path]
) -> None:
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.get("/api/v1/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = guarded.get("/api/v1/model", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        upload_ = guarded.post("/api/v1/predict", files=jpegs(xray_files[:1]), headers=headers)
        assert upload_.status_code == 401
    assert guarded.get("/api/v1/model", headers=good).status_code == 200
    scored = guarded.post("/api/v1/predict", files=jpegs(xray_files[:1]), headers=good)
    assert scored.status_code == 200 and scored.json()["results"][0]["label"] is not None
    assert guarded.get("/").status_code == 200  # the page itself asks for the token


def test_token_file_must_hold_a_real_token(tmp_path: Path) -> None:
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.serve import read_token

    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token(path) == TOKEN
    path.write_text("short\n")
    with pytest.raises(PneumoscanError, match="at least 16 characters"):
        read_token(path)
