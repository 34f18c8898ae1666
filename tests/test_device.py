import numpy as np
import pytest
import torch

from pneumoscan.device import autocast, pick_device, to_input, trunk_features
from pneumoscan.errors import PneumoscanError


def test_devices_are_named_or_refused_with_the_choices() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(PneumoscanError, match="choose auto, cpu or cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PneumoscanError, match="no CUDA GPU"):
            pick_device("cuda")


def test_a_batch_reaches_the_device_in_unit_range_and_channels_last() -> None:
    batch = np.stack([np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)])
    x = to_input(batch, torch.device("cpu"))
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
    assert x[0].max() == 0 and x[1].min() == 1
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_trunk_features_come_in_fp16_in_the_order_asked() -> None:
    trunk = torch.nn.Conv2d(1, 2, 3)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    idx = np.array([4, 0, 2])
    features = trunk_features(trunk, images, idx, torch.device("cpu"), batch_size=1)
    assert features.dtype == torch.float16 and features.shape == (3, 2, 6, 6)
    with torch.no_grad(), autocast(torch.device("cpu")):
        expected = trunk(to_input(images[idx], torch.device("cpu")))
    assert torch.allclose(features.float(), expected, atol=1e-2)
