"""The DICOM node's throughput: real X-rays from dcmtk's storescu through `pneumoscan listen` to
dcmtk's storescp, against `pneumoscan predict --dicom-out` on the same files in the same run.

    python bench/listen.py --data DIR [--files 100] [--outputs sr] [--model ensemble]

Node: wall time from the first C-STORE until the PACS holds every report (network, queue on
disk, scoring one instance at a time, SR/SC building, C-STORE back). Peer: `predict --dicom-out`
on the same DICOM files (batched scoring, no network), from process start. Appends to
bench/results/cpu_listen.jsonl.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import dicom_bytes, dicom_dataset

from pneumoscan import reader


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait(predicate, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.05)


def echo(port: int) -> bool:
    return (
        subprocess.run(
            ["echoscu", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)], capture_output=True
        ).returncode
        == 0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--outputs", default="sr")
    parser.add_argument("--model", default="ensemble")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-listen-"))
    sources = work / "in"
    sources.mkdir()
    images = sorted((args.data / "test").rglob("*.jpeg"))[: args.files]
    for i, image in enumerate(images):
        ds = dicom_dataset(
            reader.read_image(image),
            StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.77.{i}",
            SeriesInstanceUID=f"1.2.826.0.1.3680043.8.498.77.{i}.1",
        )
        (sources / f"{i:05d}.dcm").write_bytes(dicom_bytes(ds))
    files = sorted(sources.iterdir())
    expected = len(files) * len(args.outputs.split(","))

    pacs_dir, pacs_port, node_port = work / "pacs", free_port(), free_port()
    pacs_dir.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pneumoscan",
            "listen",
            "--port",
            str(node_port),
            "--forward",
            f"PACS@127.0.0.1:{pacs_port}",
            "--outputs",
            args.outputs,
            "--model",
            args.model,
            "--queue",
            str(work / "queue"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "node.log").open("w"),
    )
    try:
        wait(lambda: echo(node_port))
        start = time.perf_counter()
        subprocess.run(
            [
                "storescu",
                "-R",
                "-xs",
                "-aec",
                "PNEUMOSCAN",
                "127.0.0.1",
                str(node_port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
        )
        sent = time.perf_counter() - start
        wait(lambda: len(os.listdir(pacs_dir)) >= expected)
        node_s = time.perf_counter() - start
    finally:
        node.terminate()
        pacs.terminate()
        node.wait()
        pacs.wait()

    heatmaps = ["--heatmaps", str(work / "maps")] if "sc" in args.outputs else []
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumoscan",
            "predict",
            str(sources),
            "--model",
            args.model,
            "--dicom-out",
            str(work / "out"),
            "--json",
            *heatmaps,
        ],
        check=True,
        capture_output=True,
    )
    peer_s = time.perf_counter() - start

    row = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "model": args.model,
        "outputs": args.outputs,
        "files": len(files),
        "node_images_per_s": round(len(files) / node_s, 1),
        "storescu_done_s": round(sent, 2),
        "node_all_delivered_s": round(node_s, 2),
        "predict_dicom_out_s": round(peer_s, 2),
        "node_over_predict": round(node_s / peer_s, 2),
    }
    print(row)
    record.append("cpu_listen.jsonl", [row])


if __name__ == "__main__":
    main()
