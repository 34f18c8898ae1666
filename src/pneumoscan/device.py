"""Where training runs: choosing the device, mixed precision, and batches onto it."""

from __future__ import annotations

import numpy as np
import torch

from pneumoscan import preprocess
from pneumoscan.augment import augment, exposure_variant
from pneumoscan.errors import PneumoscanError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PneumoscanError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise PneumoscanError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device):
    """bfloat16 on GPUs; full precision on CPUs."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 frames (N, S, S) -> the network's input on `device`, channels-last."""
    x = torch.from_numpy(preprocess.unit_range(batch)).to(device)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def trunk_features(
    trunk, images, idx, device, batch_size, cfg=None, gen=None, variant=None
) -> torch.Tensor:
    """Frozen-trunk outputs of `images[idx]`, in fp16 (optionally of augmented views).

    With `variant` (exposure limits, as the consistency term's), each image's outputs come in
    a pair, (2, N, ...): the view, and the same view under another exposure.
    """
    trunk.eval()  # the pretrained BatchNorm statistics, never batch statistics
    out = []
    for start in range(0, len(idx), batch_size * 4):
        x = to_input(images[idx[start : start + batch_size * 4]], device)
        if cfg:
            x = augment(x, cfg, gen)
        with autocast(device):
            features = trunk(x).to(torch.float16)
            if variant is not None:
                twin = trunk(exposure_variant(x, variant, gen)).to(torch.float16)
                features = torch.stack([features, twin])
        out.append(features)
    return torch.cat(out, dim=0 if variant is None else 1)
