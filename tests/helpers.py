"""Test helpers shared by several test files: DICOM files built from real pixels, a server."""

import contextlib
import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.config import disable_value_validation
from pydicom.dataset import Dataset, FileDataset

from pneumoscan import shift

SECRETS = ("DOE^JOHN", "SECRET-ID-123")


def dicom_dataset(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 0, **attrs
) -> FileDataset:
    """A DX image holding `pixels`, with patient data that a leak would show."""
    ds = shift.dx_dataset(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.PatientName, ds.PatientID = SECRETS
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "St Example Hospital"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with disable_value_validation():  # some cases are broken on purpose
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@contextlib.contextmanager
def running(
    command: str, options: list[str], port: int, log: Path, ready, wait_s: float = 180
) -> Iterator[int]:
    """`pneumoscan COMMAND --port PORT OPTIONS` in its own process, output appended to `log`.

    Yields once `ready()` is true; fails if the process exits or is not ready in `wait_s`;
    stops it with SIGTERM at the end (SIGKILL after 60 s).
    """
    with log.open("a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pneumoscan", command, "--port", str(port), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + wait_s
        while not ready():
            if process.poll() is not None:
                pytest.fail(
                    f"pneumoscan {command} exited with {process.returncode}:\n{log.read_text()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"pneumoscan {command} not ready in {wait_s:g} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serving(options: list[str], log: Path, wait_s: float = 180) -> Iterator[tuple[str, int]]:
    """`pneumoscan serve OPTIONS` on a free 127.0.0.1 port; yields (host, port) once
    /api/v1/health answers."""
    port = free_port()

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    with running("serve", options, port, log, healthy, wait_s):
        yield "127.0.0.1", port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll `predicate` until it is true; fail with `what` (and the log) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            shown = f"\n{log.read_text()}" if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{shown}")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def listening(
    options: list[str], log: Path, port: int | None = None, wait_s: float = 180
) -> Iterator[int]:
    """`pneumoscan listen OPTIONS` on `port` (default: a free one); yields the port once it
    accepts connections."""
    port = port or free_port()
    with running("listen", options, port, log, lambda: port_open(port), wait_s):
        yield port


# Settings that make a training run a few seconds on the small real subset.
QUICK = {"batch_size": 32, "feature_views": 1, "val_fraction": 0.25}


def quick(name: str, **overrides):
    """A bundled recipe's config with QUICK settings (and `overrides`) on top."""
    from pneumoscan.config import load_config

    return load_config(name, **{**QUICK, **overrides})


def silent(_: str) -> None:
    pass


class Interrupt(Exception):
    """Raised from a log callback to stop a training run as a crash would."""


def run_cli(*args: str) -> tuple[int, str, str]:
    """`pneumoscan ARGS` in this process, through the console entry point: (exit code, stdout,
    stderr)."""
    from typer.testing import CliRunner

    from pneumoscan import cli

    runner = CliRunner()
    with runner.isolation() as (stdout, stderr, _):
        argv, sys.argv = sys.argv, ["pneumoscan", *args]
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.argv = argv
        return code, stdout.getvalue().decode(), stderr.getvalue().decode()
