"""The web service under abuse, over real sockets: `pneumoscan serve` on 127.0.0.1.

tests/test_serve.py checks the API through the ASGI interface; what it cannot see is what
uvicorn itself does with oversized, malformed, stalled and flooding clients. The server runs
in its own process, as in use: in a thread of this one it would share the GIL with the
clients, and a flood would measure them as much as the server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import SECRETS, dicom_bytes, dicom_dataset, serving

BODY_TIMEOUT = 1.0
# --max-file-mb 0.016 is 16,777 bytes a file; 20 files of that, plus part overhead, a request.
LIMIT = "request larger than 663,220 bytes"
Address = tuple[str, int]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("abuse") / "serve.log"


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], server_log: Path) -> Iterator[Address]:
    """`pneumoscan serve` of the tiny cnn model, 16 kB a file, 1 s stalls, on a free port."""
    options = ["--model", str(tiny_models["cnn"]), "--max-file-mb", "0.016"]
    with serving([*options, "--body-timeout", str(BODY_TIMEOUT)], server_log, 120) as address:
        yield address


@pytest.fixture(autouse=True)
def no_tracebacks(server: Address, server_log: Path) -> Iterator[None]:
    """No request may end in a traceback, even one whose client saw no 500."""
    seen = server_log.stat().st_size
    yield
    with server_log.open() as log:
        log.seek(seen)
        written = log.read()
    assert "Traceback" not in written and "ERROR" not in written, written[-3000:]


def url(address: Address, path: str = "/api/v1/predict") -> str:
    return f"http://{address[0]}:{address[1]}{path}"


def multipart(files: list[Path]) -> tuple[bytes, str]:
    """A well-formed upload of `files`: its body and content type, as httpx encodes them."""
    parts = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    request = httpx.Request("POST", "http://test", files=parts)
    return request.read(), request.headers["content-type"]


def head(content_type: str, length: int | None = None, close: bool = True) -> bytes:
    """A POST to the predict endpoint up to its body: Content-Length, or chunked if None."""
    lines = ["POST /api/v1/predict HTTP/1.1", "Host: test"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def read_response(conn: socket.socket) -> tuple[int, dict]:
    """Status and JSON body, read until the server closes (a socket timeout fails the test)."""
    data = b""
    while piece := conn.recv(65536):
        data += piece
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body)


def exchange(address: Address, request: bytes) -> tuple[int, dict]:
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(request)
        return read_response(conn)


def test_a_declared_oversize_is_refused_before_its_body(server: Address) -> None:
    start = time.monotonic()
    status, body = exchange(server, head("multipart/form-data; boundary=b", 10**12))
    assert (status, body) == (413, {"detail": LIMIT})
    assert time.monotonic() - start < 2  # answered without waiting for a terabyte


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_upload_is_413(server: Address, xray_files: list[Path], framing: str) -> None:
    body, content_type = multipart(xray_files * 10)  # 60 images of about 12 kB each
    content: bytes | Iterator[bytes] = body
    if framing == "chunked":  # httpx sends an iterator without a Content-Length
        content = (body[i : i + 8192] for i in range(0, len(body), 8192))
    response = httpx.post(
        url(server), content=content, headers={"content-type": content_type}, timeout=10
    )
    assert response.status_code == 413 and response.json() == {"detail": LIMIT}


def _bad_uploads(image: bytes) -> dict[str, tuple[str, bytes, int]]:
    """Malformed uploads: content type, body, and the status each gets."""
    good = (
        b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpeg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--b--\r\n"
    )
    multipart = "multipart/form-data; boundary=b"
    return {
        "no boundary": ("multipart/form-data", good, 400),
        "empty boundary": ("multipart/form-data; boundary=", good, 400),
        "other boundary": ("multipart/form-data; boundary=other", good, 400),
        "garbage body": (multipart, bytes(range(256)) * 8, 400),
        "no part headers": (multipart, b"--b\r\n\r\nxyz\r\n--b--\r\n", 400),
        # An unfinished part is dropped: no file arrived.
        "truncated final boundary": (multipart, good[:-5], 422),
        "cut inside the file": (multipart, good[: len(good) // 2], 422),
        "empty body": (multipart, b"", 422),
        "json": ("application/json", b'{"files": "x.jpeg"}', 422),
        "url-encoded": ("application/x-www-form-urlencoded", b"files=x.jpeg", 422),
        "no content type": ("", good, 422),
    }


@pytest.mark.parametrize("case", list(_bad_uploads(b"")))
def test_a_malformed_upload_is_a_4xx_with_its_reason(
    server: Address, xray_files: list[Path], case: str
) -> None:
    content_type, body, expected = _bad_uploads(xray_files[0].read_bytes())[case]
    status, answer = exchange(server, head(content_type, len(body)) + body)
    assert status == expected, answer
    if status == 422:  # FastAPI's own: it names the missing field
        assert answer["detail"][0]["loc"][:2] == ["body", "files"]
    else:
        assert "\n" not in answer["detail"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_upload_is_cut_while_health_answers(
    server: Address, xray_files: list[Path], framing: str
) -> None:
    body, content_type = multipart(xray_files[:1])
    half = body[: len(body) // 2]
    with socket.create_connection(server, timeout=BODY_TIMEOUT + 5) as conn:
        if framing == "content-length":
            conn.sendall(head(content_type, len(body), close=False) + half)
        else:
            conn.sendall(head(content_type, close=False) + chunk(half))
        stalled = time.monotonic()
        health = httpx.get(url(server, "/api/v1/health"), timeout=5)
        assert health.status_code == 200 and time.monotonic() - stalled < BODY_TIMEOUT
        status, detail = read_response(conn)  # the server must also close the connection
        waited = time.monotonic() - stalled
    assert status == 408 and detail == {"detail": "request body stalled: nothing received for 1 s"}
    assert BODY_TIMEOUT * 0.9 < waited < BODY_TIMEOUT + 5


def test_a_slow_upload_that_keeps_sending_is_served(
    server: Address, xray_files: list[Path]
) -> None:
    """The timeout bounds each pause, not the whole upload: a slow link is not a stall."""
    body, content_type = multipart(xray_files[:1])
    step = len(body) // 4 + 1
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    with socket.create_connection(server, timeout=10) as conn:
        conn.sendall(head(content_type, len(body)))
        start = time.monotonic()
        for piece in pieces:
            time.sleep(BODY_TIMEOUT * 0.4)
            conn.sendall(piece)
        assert time.monotonic() - start > BODY_TIMEOUT
        status, result = read_response(conn)
    assert status == 200 and result["results"][0]["error"] is None


def check_health(address: Address, stop: threading.Event) -> list[tuple[int, float]]:
    """Health checks on a connection of their own until `stop`: status and seconds of each."""
    checks = []
    with httpx.Client(timeout=30) as http:
        while not stop.is_set() or len(checks) < 5:
            start = time.monotonic()
            status = http.get(url(address, "/api/v1/health")).status_code
            checks.append((status, time.monotonic() - start))
            time.sleep(0.02)
    return checks


@pytest.mark.slow
def test_a_flood_of_small_bad_requests_gets_4xx_and_health_keeps_answering(
    server: Address,
) -> None:
    garbage = (b"--b\r\n\x00\xff" * 40, "multipart/form-data; boundary=b")
    not_an_image = httpx.Request(
        "POST", "http://test", files=[("files", ("notes.txt", b"hello", "text/plain"))]
    )
    text = (not_an_image.read(), not_an_image.headers["content-type"])
    kinds = {  # method, path, body, content type -> expected status
        "no files": ("POST", "/api/v1/predict", b"", "", 422),
        "garbage": ("POST", "/api/v1/predict", *garbage, 400),
        "not an image": ("POST", "/api/v1/predict", *text, 415),
        "bad mode": ("POST", "/api/v1/predict?mode=x", *text, 422),
        "unknown path": ("GET", "/api/v1/nope", b"", "", 404),
        "wrong method": ("GET", "/api/v1/predict", b"", "", 405),
        "not HTTP": (b"\x16\x03\x01 not HTTP at all\r\n\r\n", 400),  # raw: httpx cannot
    }

    async def flood() -> list[tuple[str, int]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url(server, ""), limits=limits, timeout=30) as http:

            async def send(kind: str) -> tuple[str, int]:
                if kind == "not HTTP":
                    reader, writer = await asyncio.open_connection(*server)
                    writer.write(kinds[kind][0])
                    status_line = await reader.readline()
                    writer.close()
                    return kind, int(status_line.split()[1])
                method, path, body, content_type, _ = kinds[kind]
                headers = {"content-type": content_type} if content_type else {}
                response = await http.request(method, path, content=body, headers=headers)
                return kind, response.status_code

            names = list(kinds)
            return await asyncio.gather(*(send(names[i % len(names)]) for i in range(350)))

    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        checker = pool.submit(check_health, server, stop)
        start = time.monotonic()
        answers = asyncio.run(flood())
        flood_s = time.monotonic() - start
        stop.set()
        checks = checker.result()
    wrong = [(kind, status) for kind, status in answers if status != kinds[kind][-1]]
    assert not wrong, wrong[:5]
    assert flood_s < 20
    assert all(status == 200 for status, _ in checks)
    assert max(seconds for _, seconds in checks) < 2, checks


def test_dicom_patient_data_never_reaches_answers_or_the_log(
    server: Address, server_log: Path, xray_files: list[Path]
) -> None:
    import numpy as np
    from PIL import Image

    # 96 px: this server takes files up to 16 kB.
    grey = np.asarray(Image.open(xray_files[0]).convert("L").resize((96, 96)))
    good = dicom_bytes(dicom_dataset(grey))
    files = [("files", ("a.dcm", good)), ("files", ("cut.dcm", good[:-3000]))]
    response = httpx.post(url(server), files=files, timeout=30)
    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0]["label"] in ("NORMAL", "PNEUMONIA") and results[1]["error"]
    seen = [response.text, server_log.read_text()]
    assert not any(secret in text for secret in SECRETS for text in seen)
