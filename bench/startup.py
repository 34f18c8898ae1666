"""Start-up: `pneumoscan predict` on one file, the whole process, models interleaved.

    python bench/startup.py --file IMAGE [--models ensemble,cnn,transfer] [--backends auto,torch]
                            [--runs 5]

Each round runs every (model, backend) once, in turn, as a new process: Python start, imports,
model load, one prediction, exit. Medians over the rounds of the wall time and of the peak
resident memory the operating system reports for the child (ru_maxrss).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import record


def run_once(command: list[str]) -> tuple[float, float]:
    """(seconds, peak MB) of one process."""
    # stderr to a file, not a pipe: nothing reads a pipe until the child exits, and a full
    # pipe would block the child and hang the benchmark.
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed: {errors.read().decode().strip()}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--models", default="ensemble,cnn,transfer")
    parser.add_argument("--backends", default="auto,torch")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not args.file.is_file():
        raise SystemExit(f"--file {args.file}: not a file")

    cases = list(itertools.product(args.models.split(","), args.backends.split(",")))
    times: dict[tuple, list] = {case: [] for case in cases}
    for _ in range(args.runs):
        for model, backend in cases:
            command = [sys.executable, "-m", "pneumoscan", "predict", str(args.file)]
            times[(model, backend)].append(
                run_once([*command, "--model", model, "--backend", backend])
            )
    rows = []
    for (model, backend), runs in times.items():
        seconds, peaks = zip(*runs, strict=True)
        rows.append(
            {
                "date": date.today().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "model": model,
                "backend": backend,
                "runs": args.runs,
                "seconds_p50": round(statistics.median(seconds), 3),
                "peak_mb_p50": round(statistics.median(peaks), 1),
            }
        )
        print(json.dumps(rows[-1]))
    record.append("cpu_startup.jsonl", rows)


if __name__ == "__main__":
    main()
