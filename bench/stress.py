"""Load on the web service: concurrent clients send real test X-rays to `pneumoscan serve`.

    python bench/stress.py [--data DIR] [--requests 2000] [--clients 32] [--model transfer]
                           [--timeout 900]

The server is `pneumoscan serve` in a subprocess on a free port of 127.0.0.1, stopped at the
end whatever happens. After a warm-up, --clients clients (one asyncio task and connection
each) share --requests uploads of one image each, cycling over DIR/test (default
$PNEUMOSCAN_DATA). Passes with zero errors (a non-200 answer, or a result with an `error`) and
the server's RSS after the run at most 1.2 x its RSS after the warm-up; exits 1 otherwise.
The figures are printed and appended as a JSON line to bench/results/stress.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from pneumoscan import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results" / "stress.jsonl"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
WARMUP = 50  # requests
MAX_RSS_RATIO = 1.2


@dataclass
class Load:
    """What a batch of requests gave: how many finished, latencies of the answered, errors."""

    finished: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def send_all(
    url: str, images: list[tuple[str, bytes]], requests: int, clients: int, load: Load
) -> None:
    """`requests` uploads of one image each, from `clients` clients, one connection each."""
    queue = iter(range(requests))  # shared: each request is taken by exactly one client
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def client() -> None:
            for i in queue:
                name, content = images[i % len(images)]
                start = time.perf_counter()
                try:
                    response = await http.post(
                        "/api/v1/predict", files=[("files", (name, content))]
                    )
                except httpx.HTTPError as exc:
                    load.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                else:
                    load.latencies.append(time.perf_counter() - start)
                    if response.status_code != 200:
                        load.errors.append(f"{name}: HTTP {response.status_code} {response.text}")
                    else:
                        results = response.json()["results"]
                        load.errors += [r["error"] for r in results if r["error"]]
                load.finished += 1

        await asyncio.gather(*(client() for _ in range(clients)))


def run_until(deadline: float, work: Coroutine) -> bool:
    """Runs `work` until `deadline` (time.monotonic); False if it was cut short."""
    try:
        asyncio.run(asyncio.wait_for(work, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return False
    return True


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            last = " ".join(log.read_text().strip().splitlines()[-1:])
            sys.exit(f"error: the server exited ({server.returncode}): {last}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("error: the server did not answer /api/v1/health within --timeout")


def measure(args: argparse.Namespace, images: list[tuple[str, bytes]]) -> dict:
    """Serve, warm up, load; the figures. The server is stopped whatever happens."""
    deadline = time.monotonic() + args.timeout
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with log.open("w") as out:
            serve = ["serve", "--model", args.model, "--port", str(port)]
            server = subprocess.Popen(
                [sys.executable, "-m", "pneumoscan", *serve], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_health(url, server, log, deadline)
            warmup = Load()
            if not run_until(deadline, send_all(url, images, WARMUP, args.clients, warmup)):
                sys.exit("error: the warm-up did not finish within --timeout")
            if warmup.errors:
                sys.exit(f"error: the warm-up failed: {warmup.errors[0]}")
            rss_warm = rss_mib(server.pid)
            load = Load()
            start = time.perf_counter()
            run_until(deadline, send_all(url, images, args.requests, args.clients, load))
            wall = time.perf_counter() - start
            rss_end = rss_mib(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return {
        "errors": load.errors,
        "answered": len(load.latencies),
        "unfinished": args.requests - load.finished,  # cut by --timeout
        "latency_ms_p50": percentile_ms(load.latencies, 50),
        "latency_ms_p99": percentile_ms(load.latencies, 99),
        "requests_per_s": round(len(load.latencies) / wall, 1),
        "wall_s": round(wall, 1),
        "rss_mib_after_warmup": round(rss_warm, 1),
        "rss_mib_after_run": round(rss_end, 1),
        "rss_ratio": round(rss_end / rss_warm, 3),
    }


def percentile_ms(latencies: list[float], q: int) -> float | None:
    if len(latencies) < 2:
        return None
    return round(statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("PNEUMOSCAN_DATA"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=900, help="seconds, for everything")
    args = parser.parse_args()
    test = Path(args.data or ".") / "test"
    files = sorted(p for p in test.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"error: no images in {test} (set PNEUMOSCAN_DATA or --data)")
    figures = measure(args, [(f.name, f.read_bytes()) for f in files])
    errors = figures.pop("errors")
    passed = not errors and not figures["unfinished"] and figures["rss_ratio"] <= MAX_RSS_RATIO
    print(f"stress: {args.model} model, {args.requests} requests from {args.clients} clients")
    print(f"  errors             {len(errors)}")
    for error in errors[:5]:
        print(f"    {error}")
    print(f"  unfinished         {figures['unfinished']} (at --timeout {args.timeout:g} s)")
    print(f"  latency p50, p99   {figures['latency_ms_p50']} ms, {figures['latency_ms_p99']} ms")
    print(f"  throughput         {figures['requests_per_s']} requests/s ({figures['wall_s']} s)")
    print(f"  RSS after warm-up  {figures['rss_mib_after_warmup']} MiB")
    print(f"  RSS after run      {figures['rss_mib_after_run']} MiB (x{figures['rss_ratio']})")
    verdict = "PASS" if passed else "FAIL"
    print(f"  {verdict}: all answered, zero errors, RSS ratio <= {MAX_RSS_RATIO}")
    row = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "requests": args.requests,
        "clients": args.clients,
        "errors": len(errors),
        **figures,
        "passed": passed,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
