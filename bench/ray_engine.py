"""`predict --engine ray` against the plain command on the same cores, and on two nodes.

Each run is a `pneumoscan predict` process of its own, so its peak memory is its own; the Ray
workers' peak is sampled from /proc while it runs. Runs: the plain command; a one-node Ray
cluster with 1 and with 2 CPUs; two nodes of 1 CPU each on this machine (`ray start --head`,
then `ray start --address` with its own ports), whose CSV must equal the plain one; fp32 and
int8 through the same engine. Rates are files / pipeline seconds (Ray's start excluded);
quote their ratios, not the absolute figures (machines are shared and noisy).

    python bench/ray_engine.py --files ../shared/data/chest_xray/train [--int8-model FOLDER]

Stops its Ray clusters at the end (`ray stop`). Writes bench/results/ray_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ray_engine.json"
BIN = Path(sys.executable).parent
PROBE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_workers_rss_mb() -> float:
    """The largest RSS of any Ray worker process now (ray::... in its command line)."""
    peak = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not cmd.startswith(b"ray::"):
                continue
            rss = next(
                x
                for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("VmRSS")
            )
            peak = max(peak, int(rss.split()[1]) / 1024)
        except (OSError, StopIteration):
            continue
    return peak


def predict(args: list[str], out: Path) -> dict:
    """One `pneumoscan predict ... --csv out` run: rate, driver and worker peak memory."""
    command = [sys.executable, "-c", PROBE, str(BIN / "pneumoscan"), "predict", *args]
    command += ["--csv", str(out), "--force"]
    worker_peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            worker_peak[0] = max(worker_peak[0], _ray_workers_rss_mb())

    sampler = threading.Thread(target=sample)
    sampler.start()
    begin = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - begin
    done.set()
    sampler.join()
    if run.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(args)} failed:\n{run.stderr}")
    summary = run.stderr.strip().splitlines()[-1]
    files = int(re.search(r"of (\d+) files", summary).group(1))
    pipeline = re.search(r"in ([\d.]+) s", summary)
    seconds = float(pipeline.group(1)) if pipeline else wall
    return {
        "args": args,
        "files": files,
        "seconds": seconds,
        "wall_seconds": wall,
        "files_per_s": files / seconds,
        "driver_peak_mb": int(re.search(r"peak_kb (\d+)", run.stdout).group(1)) / 1024,
        "worker_peak_mb": worker_peak[0],
    }


def start_cluster(cpus_per_node: list[int]) -> str:
    port = _free_port()
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={cpus_per_node[0]}"]
    head += ["--node-ip-address=127.0.0.1"]  # both nodes on loopback
    head += [
        "--include-dashboard=false",
        "--object-store-memory=300000000",
        "--disable-usage-stats",
    ]
    subprocess.run(head, check=True, capture_output=True)
    for cpus in cpus_per_node[1:]:
        node = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", f"--num-cpus={cpus}"]
        node += ["--node-ip-address=127.0.0.1"]
        node += [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]
        node += ["--object-store-memory=300000000"]
        subprocess.run(node, check=True, capture_output=True)
    return f"127.0.0.1:{port}"


def stop_cluster() -> None:
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=Path, required=True)
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--int8-model", type=Path, help="A folder with an int8 graph.")
    args = parser.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # clusters on this machine only, for the bench
    tmp = Path(tempfile.mkdtemp())
    base = [str(args.files), "--model", args.model]
    results: dict = {"files": str(args.files), "model": args.model, "cpus": os.cpu_count()}
    results["plain"] = predict(base, tmp / "plain.csv")
    try:
        for cpus in ([2], [1], [1, 1]):
            address = start_cluster(cpus)
            key = f"ray_{'+'.join(map(str, cpus))}cpu"
            out = tmp / f"{key}.csv"
            results[key] = predict([*base, "--engine", "ray", "--ray-address", address], out)
            results[key]["same_csv_as_plain"] = out.read_text() == (tmp / "plain.csv").read_text()
            if args.int8_model and cpus == [2]:
                for precision in ("fp32", "int8"):
                    run = [
                        str(args.files),
                        "--model",
                        str(args.int8_model),
                        "--precision",
                        precision,
                    ]
                    run += ["--engine", "ray", "--ray-address", address]
                    results[f"ray_2cpu_{precision}"] = predict(run, tmp / f"{precision}.csv")
            stop_cluster()
    finally:
        stop_cluster()
    plain = results["plain"]["files_per_s"]
    for value in results.values():
        if isinstance(value, dict) and "files_per_s" in value:
            value["rate_over_plain"] = value["files_per_s"] / plain
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        if isinstance(value, dict):
            print(
                f"{key:16s} {value['files_per_s']:7.1f} files/s ({value['rate_over_plain']:.2f}x plain)"
                f"  driver {value['driver_peak_mb']:.0f} MB  workers {value['worker_peak_mb']:.0f} MB"
                + (
                    f"  same CSV: {value['same_csv_as_plain']}"
                    if "same_csv_as_plain" in value
                    else ""
                )
            )


if __name__ == "__main__":
    main()
