"""Training-time augmentation: geometric and photometric changes, mixup and label smoothing.

Every random draw comes from the generator passed in, so a resumed run draws the same.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pneumoscan.config import TrainConfig


def augment(x: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation, shift, scale, aspect, brightness, contrast, sharpness and noise.

    No left-right flip: the heart sits on the left, and a mirrored chest is not a real X-ray.
    `aspect` (a) makes the anatomy taller and narrower, or shorter and wider, by a ratio up to
    1 + a at the same area: every frame was squashed to a square from its own aspect ratio,
    which differs between the classes' sources (docs/experiments.md, section 17).
    Sharpness (a blend towards or away from a blurred copy) and faint noise stand for the
    scanners, resamplings and re-encodings an image meets before it reaches the model.
    `exposure` ({offset, gain, gamma}) is what another exposure, detector or window gives: a
    gamma up to 1 + gamma (or its inverse), a gain 1 +- gain and an offset +- offset, clipped to
    [0, 1] as an 8-bit file clips them (docs/experiments.md, section 28).
    """
    if not cfg:
        return x
    n = x.shape[0]
    uniform = _uniform(n, gen)

    angle = uniform(math.radians(cfg.get("rotate", 0.0)))
    scale = 1 + uniform(cfg.get("scale", 0.0))
    tx, ty = uniform(cfg.get("translate", 0.0)), uniform(cfg.get("translate", 0.0))
    brightness = uniform(cfg.get("brightness", 0.0))
    contrast = 1 + uniform(cfg.get("contrast", 0.0))
    root = torch.ones(n)  # the square root of the anatomy's change of height/width
    if cfg.get("aspect"):  # drawn only when set: recipes without it keep their random draws
        root = torch.exp(uniform(math.log1p(cfg["aspect"])) / 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * root, -sin * root, tx], 1),
            torch.stack([sin / root, cos / root, ty], 1),
        ],
        1,
    )
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.to(x).view(-1, 1, 1, 1) + mean + brightness.to(x).view(-1, 1, 1, 1)
    if cfg.get("exposure"):  # drawn only when set, as `aspect`
        x = _exposure(x.clamp(0, 1), cfg["exposure"], uniform)
    if cfg.get("sharpness"):
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = x + uniform(cfg["sharpness"]).to(x).view(-1, 1, 1, 1) * (blurred - x)
    if cfg.get("noise"):
        sigma = torch.rand(n, generator=gen) * cfg["noise"]
        x = x + torch.randn(x.shape, generator=gen).to(x) * sigma.to(x).view(-1, 1, 1, 1)
    return x.clamp_(0, 1)


def exposure_variant(x: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """`x` under another exposure (`cfg` as augment's `exposure`), rounded to 8 bits as a file
    holds it: the same X-ray that the consistency term asks the model to score alike."""
    return (_exposure(x.clamp(0, 1), cfg, _uniform(x.shape[0], gen)) * 255).round() / 255


def _uniform(n: int, gen: torch.Generator):
    """Draws of `n` values, one per image, uniform in [-limit, limit], from `gen`."""

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * limit

    return uniform


def _exposure(x: torch.Tensor, cfg: dict, uniform) -> torch.Tensor:
    power = torch.exp(uniform(math.log1p(cfg.get("gamma", 0.0))))
    gain = 1 + uniform(cfg.get("gain", 0.0))
    offset = uniform(cfg.get("offset", 0.0))

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.to(x).view(-1, 1, 1, 1)

    return (x ** per_image(power) * per_image(gain) + per_image(offset)).clamp(0, 1)


def soft_targets(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch, its targets and class weights after mixup and label smoothing (if set).

    Mixup blends each input with another of the batch, by a share drawn from Beta(a, a) (one
    per batch, from `gen`, so a resumed run draws the same), and blends targets and weights
    alike.
    """
    target = y.float()
    if cfg.mixup > 0:
        from scipy.special import betaincinv

        share = float(betaincinv(cfg.mixup, cfg.mixup, torch.rand(1, generator=gen).item()))
        other = torch.randperm(len(y), generator=gen).to(x.device)
        x = share * x + (1 - share) * x[other]
        target = share * target + (1 - share) * target[other]
        weight = share * weight + (1 - share) * weight[other]
    if cfg.label_smoothing > 0:
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
    return x, target, weight
