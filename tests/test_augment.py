import torch
from helpers import quick

from pneumoscan.augment import augment, exposure_variant, soft_targets


def test_augmentation_keeps_range_and_changes_pixels() -> None:
    x = torch.rand(4, 1, 64, 64)
    out = augment(
        x.clone(),
        {"rotate": 10, "translate": 0.08, "scale": 0.1, "brightness": 0.1, "contrast": 0.2},
        torch.Generator().manual_seed(0),
    )
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


def test_aspect_augmentation_changes_the_anatomy_proportions_at_the_same_area() -> None:
    """`aspect` makes a shape taller and narrower or shorter and wider, within 1 + aspect."""
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 16:48, 16:48] = 1  # a centred square, 32 px a side
    out = augment(x.clone(), {"aspect": 0.5}, torch.Generator().manual_seed(0))
    bright = out > 0.5
    height = bright.any(dim=3).sum(dim=(1, 2)).float()
    width = bright.any(dim=2).sum(dim=(1, 2)).float()
    ratio = height / width
    assert ratio.min() < 0.8 and ratio.max() > 1.25  # both ways, not only one
    assert (ratio > 1 / 1.5 - 0.1).all() and (ratio < 1.5 + 0.1).all()
    assert torch.allclose(bright.sum(dim=(1, 2, 3)).float(), torch.tensor(32.0 * 32), rtol=0.08)
    # without `aspect`, the random draws of the other augmentations are the ones they were
    recipe = {"rotate": 10, "translate": 0.08, "brightness": 0.1}
    a = augment(x.clone(), recipe, torch.Generator().manual_seed(1))
    b = augment(x.clone(), {**recipe, "aspect": 0.0}, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_exposure_augmentation_is_a_monotone_change_of_levels_within_its_limits() -> None:
    """`exposure` changes gamma, gain and offset as another exposure or window would: each
    image's levels move by one increasing curve, clipped to [0, 1], so its pixels keep their
    order; a mid-grey moves by no more than the limits allow."""
    x = torch.rand(32, 1, 16, 16)
    x[:, :, 0, 0] = 0.5
    limits = {"offset": 0.08, "gain": 0.15, "gamma": 0.25}
    out = augment(x.clone(), {"exposure": limits}, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    flat_in, flat_out = x.flatten(1), out.flatten(1)
    order = flat_in.argsort(1)
    assert (flat_out.gather(1, order).diff(dim=1) >= -1e-5).all()
    mid = out[:, 0, 0, 0]
    lowest = 0.5**1.25 * 0.85 - 0.08
    highest = 0.5 ** (1 / 1.25) * 1.15 + 0.08
    assert (mid >= lowest - 1e-4).all() and (mid <= highest + 1e-4).all()
    assert mid.min() < 0.45 and mid.max() > 0.55  # both ways
    # without `exposure`, the other augmentations draw as they did
    recipe = {"rotate": 10, "brightness": 0.1, "noise": 0.02}
    a = augment(x.clone(), recipe, torch.Generator().manual_seed(1))
    b = augment(x.clone(), {**recipe, "exposure": {}}, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_an_exposure_variant_is_the_same_image_under_another_exposure_in_8_bits() -> None:
    """The consistency term's second view: one increasing curve per image within the limits,
    then rounded to the 256 levels a file holds; fresh draws from the generator each call."""
    x = torch.rand(32, 1, 16, 16)
    limits = {"offset": 0.1, "gain": 0.2, "gamma": 0.3}
    gen = torch.Generator().manual_seed(0)
    out = exposure_variant(x, limits, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, (out * 255).round() / 255)  # 8-bit levels
    order = x.flatten(1).argsort(1)
    assert (out.flatten(1).gather(1, order).diff(dim=1) >= 0).all()  # pixels keep their order
    moved = (out - x).abs().flatten(1).mean(1)
    assert moved.min() < 0.03 < moved.max()  # some images barely change, some a lot
    assert not torch.equal(exposure_variant(x, limits, gen), out)
    plain = exposure_variant(x, {}, gen)  # no limits: only the rounding
    assert (plain - x).abs().max() <= 0.5 / 255 + 1e-6


def test_mixup_and_label_smoothing_blend_inputs_targets_and_weights() -> None:
    x = torch.stack([torch.full((1, 4, 4), float(v)) for v in (0.0, 1.0, 0.0, 1.0)])
    y = torch.tensor([0, 1, 0, 1])
    weight = torch.tensor([2.0, 1.0, 2.0, 1.0])
    cfg = quick("cnn", mixup=0.4, label_smoothing=0.1, consistency={})  # mixup alone
    mixed, target, w = soft_targets(x, y, weight, cfg, torch.Generator().manual_seed(3))
    share = mixed[:, 0, 0, 0]  # each input is its blend with a partner, so its value is a share
    assert not torch.equal(mixed, x) and torch.all((share >= 0) & (share <= 1))
    # Targets follow the inputs' blend exactly, then are pulled towards 1/2 by eps/2.
    assert torch.allclose(target, share * 0.9 + 0.05)
    assert torch.allclose(w, 2.0 - share)  # weights blend like the targets
    again = soft_targets(x, y, weight, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed)  # one generator, one draw: a resumed run repeats it
    plain = soft_targets(x, y, weight, quick("cnn"), torch.Generator())
    assert plain[0] is x and torch.equal(plain[1], y.float()) and plain[2] is weight
