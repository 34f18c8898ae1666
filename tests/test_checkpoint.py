from pathlib import Path

import pytest
import torch
from helpers import Interrupt, quick, silent
from safetensors.torch import load_file

from pneumoscan import checkpoint, train
from pneumoscan.errors import PneumoscanError


def test_a_damaged_or_foreign_checkpoint_is_refused(small_data: Path, tmp_path: Path) -> None:
    cfg = quick("dense", epochs=3, seed=1)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   2/"):  # logged before its checkpoint: epoch 1's is on disk
            raise Interrupt

    with pytest.raises(Interrupt):
        train.train(cfg, small_data, tmp_path, "cpu", log=stop_after_first_epoch, progress=False)
    with pytest.raises(PneumoscanError, match="another config"):
        train.train(
            quick("dense", epochs=2, seed=2), small_data, tmp_path, "cpu", resume=True, log=silent
        )
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    intact = path.read_bytes()
    flipped = bytearray(intact)
    flipped[len(intact) // 2] ^= 0x01  # one bit, deep inside the tensors
    for damaged in (intact[:5000], bytes(flipped), b""):
        path.write_bytes(damaged)
        with pytest.raises(PneumoscanError, match="damaged"):
            train.train(cfg, small_data, tmp_path, "cpu", resume=True, log=silent)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_same_weights(
    small_data: Path, tmp_path: Path
) -> None:
    """A real SIGKILL, not an exception: the checkpoint on disk is all that survives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    common = [
        "--model",
        "dense",
        "--data",
        str(small_data),
        "--epochs",
        "6",
        "--seed",
        "4",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PNEUMOSCAN_CACHE": os.environ["PNEUMOSCAN_CACHE"]}
    run = [sys.executable, "-m", "pneumoscan", "train"]
    straight = subprocess.run(
        [*run, *common, "--out", str(tmp_path / "straight")], capture_output=True, env=env
    )
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*run, *common, "--out", str(killed)], stderr=subprocess.PIPE, text=True, env=env
    )
    for line in process.stderr:  # kill -9 right after epoch 2 is logged, mid-run
        if line.startswith("epoch   2/"):
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    time.sleep(0.1)
    assert (killed / checkpoint.CHECKPOINT_FILE).exists() and not (killed / "model.json").exists()
    resumed = subprocess.run(
        [*run, *common, "--out", str(killed), "--resume"], capture_output=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    b = load_file(str(killed / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_reads_back_and_names_the_config_and_processes_it_needs(
    tmp_path: Path,
) -> None:
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    payload = {
        "config": {"model": "cnn"},
        "gen_states": [torch.Generator().manual_seed(1).get_state()],
        "weights": torch.arange(5.0),
    }
    checkpoint.save(path, payload)
    assert path.read_bytes().startswith(checkpoint.CHECKPOINT_MAGIC)
    back = checkpoint.load(path, {"model": "cnn"}, 1)
    assert torch.equal(back["weights"], payload["weights"])
    assert torch.equal(back["gen_states"][0], payload["gen_states"][0])
    with pytest.raises(PneumoscanError, match="another config"):
        checkpoint.load(path, {"model": "dense"}, 1)
    with pytest.raises(PneumoscanError, match="resume with --devices 1"):
        checkpoint.load(path, {"model": "cnn"}, 2)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
