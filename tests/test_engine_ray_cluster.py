"""`predict --engine ray --ray-address` against clusters started with `ray start`, as a user
starts one: a single node of 1 CPU (which used to stall: its scoring actor held half the core
that Ray Data's repartition asked whole), then the same cluster with a second 1-CPU node
joined. Both give the plain command's CSV, row for row.

Each node is a `ray start --block` in a session of its own, killed with its whole process
group at the end, so no other Ray on the machine is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, run_cli, wait_for

pytest.importorskip("ray")
RAY = Path(sys.executable).parent / "ray"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _alive_nodes(address: str) -> int:
    probe = (
        f"import ray; ray.init(address={address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120
    )
    return int(done.stdout.split()[-1]) if done.returncode == 0 else 0


def _start(args: list[str]) -> subprocess.Popen:
    """One node on loopback, with ports of its own; stopped by killing its process group."""
    command = [str(RAY), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1"]
    command += ["--object-store-memory=200000000", "--disable-usage-stats", *args]
    return subprocess.Popen(
        command,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(node: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)
    node.wait()


def _wait_for(address: str, nodes: int) -> None:
    wait_for(lambda: _alive_nodes(address) >= nodes, 120, f"{nodes} live nodes at {address}")


@pytest.fixture(scope="module")
def head() -> str:
    port = free_port()
    node = _start(["--head", f"--port={port}", "--include-dashboard=false"])
    try:
        address = f"127.0.0.1:{port}"
        _wait_for(address, 1)
        yield address
    finally:
        _stop(node)


@pytest.fixture(scope="module")
def folder(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 real test X-rays of both classes: two and a half batches."""
    root = tmp_path_factory.mktemp("xrays")
    for label in ("NORMAL", "PNEUMONIA"):
        for image in sorted((data_root / "test" / label).iterdir())[:24]:
            (root / f"{label}_{image.name}").symlink_to(image)
    return root


def _predict_on(address: str, folder: Path, out: Path) -> None:
    """The command in a process of its own, so that a stall fails the test instead of hanging it."""
    command = [sys.executable, "-m", "pneumoscan", "predict", str(folder), "--engine", "ray"]
    command += ["--ray-address", address, "--csv", str(out)]
    try:
        done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"predict --engine ray --ray-address {address}: no result in 300 s")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_one_node_of_one_cpu_then_two_nodes_give_the_plain_rows(
    head: str, folder: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.csv"
    code, _, err = run_cli("predict", str(folder), "--csv", str(plain))
    assert code == 0, err
    one = tmp_path / "one_node.csv"
    _predict_on(head, folder, one)
    assert one.read_text() == plain.read_text()
    second = _start(
        [
            f"--address={head}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]
    )
    try:
        _wait_for(head, 2)
        two = tmp_path / "two_nodes.csv"
        _predict_on(head, folder, two)
        assert two.read_text() == plain.read_text()
    finally:
        _stop(second)
