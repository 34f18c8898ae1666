"""The checkpoint of a training run: written after every epoch, read by `--resume`.

The file is a header line with the SHA-256 of what follows, then torch's own format: a flipped
bit anywhere is caught, not only where torch's zip reader happens to look.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from pneumoscan.errors import PneumoscanError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_MAGIC = b"pneumoscan-checkpoint sha256="


def load(path: Path, config: dict, world: int) -> dict:
    """The checkpoint of an interrupted run of the same config; a clear error otherwise."""
    damaged = PneumoscanError(
        f"{path}: checkpoint is damaged or not a pneumoscan checkpoint; "
        "delete it and train again without --resume"
    )
    header, _, body = path.read_bytes().partition(b"\n")
    if not header.startswith(CHECKPOINT_MAGIC):
        raise damaged
    if (
        header[len(CHECKPOINT_MAGIC) :].decode("ascii", "replace")
        != hashlib.sha256(body).hexdigest()
    ):
        raise damaged
    try:
        ckpt = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for foreign files
        raise damaged from None
    if ckpt.get("config") != config:
        raise PneumoscanError(
            f"{path}: checkpoint was written with another config; resume with the same "
            "options, or train again without --resume"
        )
    if len(ckpt["gen_states"]) != world:
        raise PneumoscanError(
            f"{path}: checkpoint was written by {len(ckpt['gen_states'])} process(es); "
            f"resume with --devices {len(ckpt['gen_states'])}"
        )
    return ckpt


def save(path: Path, payload: dict) -> None:
    """Write `payload` atomically (temporary file, then rename), with its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(CHECKPOINT_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n")
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
