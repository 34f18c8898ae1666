"""The web app: a JSON API and a one-page screening tool over the same `predict` as the CLI.

The model is loaded once, when the app is created, and scores with ONNX Runtime (heatmaps
too: the graph gives each image's class activation map). Uploads are read into memory and
scored in a worker thread, one request at a time (a lock: the cores are busy anyway); nothing
from a request outlives its response.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import threading
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pneumoscan
from pneumoscan import __version__, domain, model_folder, runtime, screening
from pneumoscan.errors import PneumoscanError
from pneumoscan.metrics import POINTS

MB = 1024 * 1024
MAX_FILE_BYTES = 20 * MB
MAX_FILES = 20
BODY_TIMEOUT_S = 30.0
PART_OVERHEAD = 16 * 1024  # a multipart part's boundary and headers, generously
STATIC = Path(str(resources.files("pneumoscan") / "static"))
# The page loads nothing from elsewhere; thumbnails are object URLs, heatmaps data URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


def create_app(
    model: str | Path,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_files: int = MAX_FILES,
    body_timeout: float = BODY_TIMEOUT_S,
    token: str | None = None,
    precision: str = "fp32",
) -> FastAPI:
    """The app serving `model` (a bundled name or a model folder); loads it now, once.

    A client that sends no part of its unfinished request body for `body_timeout` s gets a 408.
    With a `token`, every API call but health needs `Authorization: Bearer <token>`.
    """
    loaded = runtime.load(model, precision=precision)  # ONNX Runtime: fast, no torch in memory
    card = model_card(loaded, max_file_bytes, max_files)
    lock = threading.Lock()
    app = FastAPI(
        title="pneumoscan",
        version=__version__,
        description="Pneumonia detection in chest X-rays. Research tool, not a medical device.",
    )
    app.state.model = loaded
    app.add_middleware(
        BodyLimit, max_bytes=max_files * (max_file_bytes + PART_OVERHEAD), timeout=body_timeout
    )
    if token is not None:
        app.add_middleware(BearerToken, token=token)  # added last: it runs first

    def score(sources: list[tuple[str, bytes]], mode: str, heatmap: bool) -> list[dict]:
        with lock:
            results = pneumoscan.predict(sources, model=loaded, mode=mode, heatmaps=heatmap)
        return [_result(r) for r in results]

    @app.post("/api/v1/predict")
    async def predict(
        files: list[UploadFile] = File(..., description="Chest X-rays: JPEG, PNG, TIFF or DICOM."),
        mode: Literal[POINTS] = Query(
            "detection", description="Operating point: detection (sensitive) or balanced."
        ),
        heatmap: bool = Query(False, description="Attach a heatmap overlay PNG (base64)."),
    ) -> dict:
        """Score each uploaded file; a file that is not a readable image gets an `error`."""
        try:
            if len(files) > max_files:
                raise HTTPException(413, f"too many files: at most {max_files} per request")
            sources = []
            for i, upload in enumerate(files, 1):
                name = _client_name(upload.filename, i)
                content = await upload.read(max_file_bytes + 1)
                if len(content) > max_file_bytes:
                    raise HTTPException(413, f"{name}: larger than {_size(max_file_bytes)}")
                sources.append((name, content))
        finally:
            for upload in files:
                await upload.close()
        try:
            results = await run_in_threadpool(score, sources, mode, heatmap)
        except PneumoscanError as exc:
            raise HTTPException(400, str(exc)) from None
        if all(r["error"] is not None for r in results):
            reasons = "; ".join(r["error"] for r in results)
            raise HTTPException(415, f"no readable image (JPEG, PNG, TIFF or DICOM): {reasons}")
        return {"model": loaded.name, "results": results}

    @app.get("/api/v1/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/api/v1/model")
    def model_info() -> dict:
        """The model card: what the model is, its operating points and how they were chosen."""
        return card

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def model_card(loaded: model_folder.ModelCard, max_file_bytes: int, max_files: int) -> dict:
    """What model.json says about a model that its users need, plus this server's limits."""
    meta = loaded.meta
    ood = meta.get("ood")
    points = {
        name: {
            k: point.get(k)
            for k in (
                "threshold",
                "rule",
                "validation",
                "sensitivity_ci",
                "specificity_ci",
                "populations",  # each population's own validation figures, for several
            )
        }
        for name, point in meta["operating_points"].items()
    }
    return {
        "name": loaded.name,
        "architecture": meta["architecture"],
        "description": loaded.description,  # e.g. "cnn x3 + transfer": what the model averages
        "members": loaded.members,  # > 1: several trained networks joined
        "gated": loaded.gated,  # one expert per population, weighed by a gate
        "input_size": loaded.input_size,
        "class_names": loaded.class_names,
        "operating_points": points,
        "validation": meta.get("validation"),
        "calibration": meta.get("calibration"),
        "ood": None
        if ood is None
        else {
            k: ood.get(k)
            for k in (
                "threshold",
                "validation_pass_rate",
                "method",
                "outer_threshold",
                "outer_ratio",
                "outer_rule",
                "populations",
            )
            if k in ood
        },
        "domain": {
            "outcomes": list(domain.DOMAINS),
            "warnings": {t: loaded.warning(t) for t in domain.DOMAINS if loaded.warning(t)},
            "trained_on": domain.describe(loaded.populations),
            "populations": loaded.populations,
            "tiers": "in_domain: like a population the model was validated on (guard distance "
            "within that population's threshold, 99.5% of its validation X-rays); shifted: a "
            "chest X-ray unlike them, up to the outer threshold; not_chest_xray: beyond it",
        },
        "data": meta.get("data"),
        "external_check": meta.get(model_folder.EXTERNAL_KEY),  # tools/external_check.py
        "site_calibration": meta.get("site_calibration"),
        "pneumoscan_version": __version__,
        "format_version": meta["format_version"],
        "limits": {"max_file_bytes": max_file_bytes, "max_files": max_files},
        "result_fields": list(screening.FIELDS),  # of each result, in the CSV's order
    }


def _result(prediction: screening.Prediction) -> dict:
    out = prediction.to_dict()
    png = prediction.heatmap_png
    out["heatmap_png"] = base64.b64encode(png).decode("ascii") if png is not None else None
    return out


def _client_name(filename: str | None, index: int) -> str:
    """The file's own name: browsers may send a path (Windows ones too), which is not ours."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    return name or f"upload-{index}"


def read_token(path: Path) -> str:
    """The API token in `path` (surrounding white space ignored)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise PneumoscanError(f"--token-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PneumoscanError(f"--token-file {path}: cannot read it ({exc})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise PneumoscanError(
            f"--token-file {path}: write one token of at least 16 characters, no spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


class BearerToken:
    """Every `/api/v1` call but health needs `Authorization: Bearer <token>`; else a 401.

    The comparison takes the same time whatever the guess, so the token cannot be found by timing.
    """

    OPEN = frozenset({"/api/v1/health"})

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/api/") and path not in self.OPEN:
            given = Headers(scope=scope).get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, self.expected):
                detail = "missing or wrong API token: send the header Authorization: Bearer <token>"
                response = JSONResponse(
                    {"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _size(n: int) -> str:
    return f"{n / MB:g} MB" if n >= MB else f"{n:,} bytes"


class BodyLimit:
    """Bounds a request body in size and in time.

    413 for a body over `max_bytes`: refused from Content-Length before reading when it is
    declared, and counted as it arrives, so a missing or false Content-Length is caught too.
    408 when `timeout` seconds pass with nothing of an unfinished body arriving: uvicorn would
    wait forever, and each stalled client would hold a connection and what it sent so far.
    Both are raised from `receive`; were a response already begun (no endpoint here starts one
    before reading its body), uvicorn would drop the connection instead.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request larger than {_size(self.max_bytes)}"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": detail}, 413)(scope, receive, send)
            return
        received = 0
        finished = False

        async def bounded() -> Message:
            nonlocal received, finished
            if finished:
                # After the body only a disconnect can come: waiting for it is not a stall.
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                # Closed at once: kept alive, the connection would last as long as the client
                # trickles in the rest of its body. (A 413 stays open: closing while the client
                # is still sending resets the connection, and the client never reads its 413.)
                stalled = f"request body stalled: nothing received for {self.timeout:g} s"
                raise HTTPException(408, stalled, {"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing as itself.
                    raise HTTPException(413, detail)
            finished = not message.get("more_body", False)  # a disconnect has none
            return message

        await self.app(scope, bounded, send)
