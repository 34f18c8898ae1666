import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import model_folder


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_ends_with_one_set_of_weights(
    small_data: Path, tmp_path: Path
) -> None:
    """Two gloo processes train together; every rank must end with the same weights. `transfer`
    exercises both paths at once: its cached trunk features and its trained top blocks."""
    import subprocess
    import sys

    model = "transfer"
    out = tmp_path / model
    command = [
        *(sys.executable, "-m", "pneumoscan", "train", "--model", model),
        *("--data", str(small_data), "--out", str(out), "--max-steps", "4"),
        *("--device", "cpu", "--devices", "2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "x 2 processes" in result.stderr
    assert "all 2 processes hold identical weights" in result.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["processes"] == 2
    assert model_folder.load(out).probabilities(np.zeros((1, 128, 128), np.uint8)).shape == (1,)


def test_a_single_process_is_rank_0_of_a_world_of_one() -> None:
    import torch

    from pneumoscan import distributed

    device = torch.device("cpu")
    assert distributed.join_process_group(device) == (0, 1, device)
    assert distributed.is_main()
    assert distributed.gather("state", 1) == ["state"]
    calls = []
    assert distributed.on_rank_0(lambda: calls.append(1) or (0.5, 0.9), True, 1) == (0.5, 0.9)
    assert distributed.on_rank_0(lambda: calls.append(1), False, 1) is None
    assert calls == [1]  # computed on rank 0 only
