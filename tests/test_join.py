import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import QUICK, quick, silent

from pneumoscan import model_folder, train
from pneumoscan.config import load_plan
from pneumoscan.errors import PneumoscanError
from pneumoscan.join import join_models, join_populations, train_plan


@pytest.mark.slow
def test_a_mixture_of_families_scores_the_mean_and_shares_the_guard_trunk(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    from pneumoscan import reader, runtime

    # A transfer trunk the guard can read: blurred as the guard's, not equalised (the bundled
    # recipe equalises since docs/experiments.md section 29, and then the guard runs its own).
    plain = quick("transfer", max_steps=6)
    plain.model_args = {**plain.model_args, "equalize": False, "input_blur": 1.0}
    train.train(plain, small_data, tmp_path / "transfer", "cpu", log=silent, progress=False)
    folders = [tiny_models["cnn"], tmp_path / "transfer"]
    joined = join_models(folders, small_data, tmp_path / "mix")
    assert joined.meta["architecture"] == "mixture" and joined.name == "cnn+transfer"
    assert joined.description == "cnn + transfer" and joined.members == 2
    images = np.stack([reader.load(f, 128) for f in xray_files])
    members = [model_folder.load(f) for f in folders]
    mean = np.mean([m.raw_scores(images)[0] for m in members], axis=0)
    loaded = model_folder.load(tmp_path / "mix")
    logits, distances = loaded.raw_scores(images)
    assert np.allclose(logits, mean, atol=1e-5)
    # The transfer member's frozen trunk is the guard's: it runs once, and gives its distances.
    assert loaded.scorer.guard_trunk is None
    assert np.allclose(distances, joined.raw_scores(images)[1], atol=1e-4)
    onnx = runtime.load(tmp_path / "mix")
    assert np.abs(onnx.probabilities(images) - loaded.probabilities(images)).max() < 1e-4
    cam = onnx.heatmap(images[0])  # the members' maps, weighted as their logits
    assert cam.shape == (128, 128) and cam.max() > 0
    with_dense = join_models(
        [tiny_models["dense"], tiny_models["cnn"]], small_data, tmp_path / "flat"
    )
    assert with_dense.scorer.guard_trunk is not None  # no member shares it: the guard runs its own
    equalised = join_models(
        [tiny_models["cnn"], tiny_models["transfer"]], small_data, tmp_path / "equalised"
    )
    assert equalised.scorer.guard_trunk is not None
    # Either way the guard reads the same features of the same images.
    assert np.allclose(equalised.raw_scores(images)[1], distances, rtol=1e-3, atol=1e-3)
    with pytest.raises(PneumoscanError, match="no spatial layer"):
        runtime.load(tmp_path / "flat").heatmap(images[0])
    with pytest.raises(PneumoscanError, match="already a mixture"):
        join_models([tmp_path / "mix", tiny_models["cnn"]], small_data, tmp_path / "x")


@pytest.mark.slow
def test_a_cnn_with_zoom_views_joins_exports_and_explains(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    from pneumoscan import reader, runtime

    cfg = quick("cnn", max_steps=4, model_args={"equalize": True, "zoom_views": [1.06]})
    zoomed = train.train(cfg, small_data, tmp_path / "zoom", "cpu", log=silent, progress=False)
    assert zoomed.network.views is not None and len(zoomed.network.views) == 3
    joined = join_models([tmp_path / "zoom", tiny_models["transfer"]], small_data, tmp_path / "mix")
    loaded = model_folder.load(tmp_path / "mix")
    images = np.stack([reader.load(f, 128) for f in xray_files])
    mean = np.mean(
        [
            model_folder.load(f).raw_scores(images)[0]
            for f in (tmp_path / "zoom", tiny_models["transfer"])
        ],
        axis=0,
    )
    assert np.allclose(joined.raw_scores(images)[0], mean, atol=1e-5)
    onnx = runtime.load(tmp_path / "mix")
    assert np.abs(onnx.probabilities(images) - loaded.probabilities(images)).max() < 1e-4
    cam = onnx.heatmap(images[0])  # the plain view's evidence
    assert cam.shape == (128, 128) and cam.max() > 0


@pytest.mark.slow
def test_one_call_trains_several_families_and_joins_them(
    small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    """`train --model dense,cnn --seeds 0,1`: an ensemble of seeds per family, then the families."""
    from pneumoscan import reader, runtime

    configs = load_plan("dense,cnn", **QUICK, max_steps=2)
    joined = train_plan(configs, [0, 1], small_data, tmp_path, log=silent)
    assert joined.description == "dense x2 + cnn x2" and joined.members == 4
    for name in ("dense", "cnn"):
        family = model_folder.load(tmp_path / name)
        assert family.members == 2 and (tmp_path / name / "seed-1" / "model.json").is_file()
    # An ensemble of seeds scores the mean of its members' logits.
    cnn = model_folder.load(tmp_path / "cnn")
    assert cnn.meta["model_args"]["members"] == 2
    assert [m["seed"] for m in cnn.meta["training"]["members"]] == [0, 1]
    images = np.stack([reader.load(f, 128) for f in xray_files])
    seeds = [model_folder.load(tmp_path / "cnn" / f"seed-{s}") for s in (0, 1)]
    mean = np.mean([m.raw_scores(images)[0] for m in seeds], axis=0)
    assert np.allclose(cnn.raw_scores(images)[0], mean, atol=1e-5)
    # A joined folder is a model like any other: ONNX at the same probabilities, heatmaps.
    for folder in (tmp_path / "cnn", tmp_path):
        graph, torch_model = runtime.load(folder), model_folder.load(folder)
        assert np.abs(graph.probabilities(images) - torch_model.probabilities(images)).max() < 1e-4
    cam = runtime.load(tmp_path / "cnn").heatmap(images[0])
    assert cam.shape == (128, 128) and cam.max() > 0
    with pytest.raises(PneumoscanError, match="already holds"):
        train_plan(configs, [0, 1], small_data, tmp_path, log=silent)
    # Members carved on other validation images are not joined: their refits would disagree.
    for change in ({"val_fraction": 0.3}, {"val_design": "earliest"}):
        other = quick("dense", max_steps=1, **change)
        train.train(other, small_data, tmp_path / "other", "cpu", log=silent, progress=False)
        with pytest.raises(PneumoscanError, match="another validation split"):
            join_models(
                [tmp_path / "dense" / "seed-0", tmp_path / "other"], small_data, tmp_path / "x"
            )
        shutil.rmtree(tmp_path / "other")


@pytest.mark.slow
def test_the_default_plan_trains_in_one_call_and_weighs_its_members(
    small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    """`train --model ensemble`: the cnn, and two `transfer` recipes (section 22) as two heads on
    one frozen trunk; logit weights 1/2, 1/4, 1/4; one seed, so no member is an ensemble."""
    from pneumoscan import reader, runtime
    from pneumoscan.models import MeanOfHeads

    plan = load_plan("ensemble", **QUICK, max_steps=2)
    joined = train_plan(plan, [0], small_data, tmp_path, log=silent, name="ensemble")
    assert joined.name == "ensemble" and joined.description == "cnn + transfer x2"
    assert joined.meta["architecture"] == "mixture"
    heads = tmp_path / "transfer+transfer-wide"
    parts = [tmp_path / "cnn", heads / "transfer", heads / "transfer-wide"]
    images = np.stack([reader.load(f, 128) for f in xray_files])
    logits = [model_folder.load(f).raw_scores(images)[0] for f in parts]
    expected = logits[0] / 2 + logits[1] / 4 + logits[2] / 4
    assert np.allclose(joined.raw_scores(images)[0], expected, atol=1e-5)
    two = model_folder.load(heads)
    assert two.meta["architecture"] == "transfer" and two.meta["model_args"]["members"] == 2
    assert isinstance(two.network.head, MeanOfHeads)  # one trunk, two heads
    assert np.allclose(two.raw_scores(images)[0], (logits[1] + logits[2]) / 2, atol=1e-5)
    recorded = [m["config"]["augment"]["scale"] for m in two.meta["training"]["members"]]
    assert recorded == [0.1, 0.25]
    onnx = runtime.load(tmp_path)
    assert np.abs(onnx.probabilities(images) - joined.probabilities(images)).max() < 1e-4


def test_joining_refuses_one_member_an_unknown_one_and_an_occupied_folder(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path
) -> None:
    """The library checks what the CLI relies on: `join` is a thin layer over `join_models`."""
    with pytest.raises(PneumoscanError, match="at least two model folders"):
        join_models([tiny_models["cnn"]], small_data, tmp_path / "x")
    with pytest.raises(PneumoscanError, match="join nowhere: not a bundled model"):
        join_models([tiny_models["cnn"], Path("nowhere")], small_data, tmp_path / "x")
    folders = [tiny_models["cnn"], tiny_models["transfer"]]
    with pytest.raises(PneumoscanError, match="already holds a model; pass --force"):
        join_models(folders, small_data, tiny_models["dense"])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_experts_per_population_are_gated_by_the_population_an_image_is_like(
    small_data: Path, nih_small: Path, tmp_path: Path
) -> None:
    """A model of children and one of adults joined as experts: the gate sends each image to
    its population's expert, the graph gives the same, and mistakes are refused in one line."""
    import torch

    from pneumoscan import reader, runtime

    children = f"chest_xray={small_data}"
    for folder, sets in (("children", children), ("adults", f"nih_adult={nih_small}")):
        cfg = quick("transfer", max_steps=4)
        train.train(cfg, sets, tmp_path / folder, "cpu", log=silent, progress=False)
    experts = {"chest_xray": tmp_path / "children", "nih_adult": tmp_path / "adults"}
    joined = join_populations(
        experts,
        [children, f"nih_adult={nih_small}"],
        tmp_path / "both",
        "both",
        {"default": 0.98, "nih_adult": 0.9},
    )
    assert joined.meta["model_args"]["populations"] == ["chest_xray", "nih_adult"]
    assert joined.meta["model_args"]["weights"] == [[1.0, 0.0], [0.0, 1.0]]
    assert joined.meta["training"]["gate"]["validation_accuracy"] > 0.9
    network = joined.network
    assert network.members[0].trunk is network.members[1].trunk  # one trunk, run once
    child = reader.load(sorted((small_data / "test" / "PNEUMONIA").iterdir())[0], 128)
    adult = reader.load(Path(nih_small.read_text().splitlines()[1].split(",")[0]), 128)
    images = np.stack([child, adult])
    x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
    with torch.no_grad():
        gate = network.population_weights(network.members[0].trunk(x))
        expected = [m(x) for m in network.members]
    assert gate[0, 0] > 0.9 and gate[1, 1] > 0.9
    mixed = (gate[:, 0] * expected[0] + gate[:, 1] * expected[1]).numpy()
    assert np.allclose(joined.raw_scores(images)[0], mixed, atol=1e-4)
    onnx = runtime.load(tmp_path / "both")
    assert np.abs(onnx.probabilities(images) - joined.probabilities(images)).max() < 1e-4
    assert onnx.heatmap(images[1]).shape == (128, 128)
    detection = joined.meta["operating_points"]["detection"]["populations"]
    assert detection["nih_adult"]["detection_target"] == 0.9
    assert onnx.assess(onnx.raw_scores(images)[1])[1] == ["chest_xray", "nih_adult"]
    with pytest.raises(PneumoscanError, match="trained on chest_xray, not on nih_adult"):
        join_populations(
            {"chest_xray": experts["chest_xray"], "nih_adult": experts["chest_xray"]},
            [children, f"nih_adult={nih_small}"],
            tmp_path / "x",
        )
    with pytest.raises(PneumoscanError, match="one data set per population"):
        join_populations(experts, [f"nih_adult={nih_small}", children], tmp_path / "y")
