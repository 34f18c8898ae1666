from dataclasses import replace
from pathlib import Path

import pytest

from pneumoscan.config import load_config, load_plan, saved_config
from pneumoscan.errors import PneumoscanError


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PneumoscanError, match="cnn, dense, transfer, transfer-wide, ensemble"):
        load_config("vgg")
    with pytest.raises(PneumoscanError, match="with --config choose one of dense, cnn, transfer"):
        load_config("transfer-wide", tmp_path / "mine.yaml")
    config = tmp_path / "mine.yaml"
    config.write_text("epochs: 3\nemma: 0.99\n")
    with pytest.raises(PneumoscanError, match=r"--config .*mine.yaml: unknown key\(s\) emma; kn"):
        load_config("cnn", config)
    with pytest.raises(PneumoscanError, match="lr_decay must be in"):
        load_config("transfer", lr_decay=0)
    with pytest.raises(PneumoscanError, match="ema must be in"):
        load_config("transfer", ema=1.0)
    cfg = load_config("transfer", epochs=2, image_size=224)
    assert cfg.epochs == 2 and cfg.image_size == 224 and cfg.model_args["trainable_blocks"] == 2


def test_a_recipe_extends_another_and_the_default_plan_names_its_members() -> None:
    transfer, wide = load_config("transfer"), load_config("transfer-wide")
    assert wide.model == "transfer" and wide.augment["scale"] == 0.25
    # `extends` merges dicts key by key: only the scale differs from `transfer`.
    assert replace(wide, augment={**wide.augment, "scale": transfer.augment["scale"]}) == transfer
    plan = load_plan("ensemble", seed=3)
    assert [list(group) for group in plan] == [["cnn"], ["transfer", "transfer-wide"]]
    assert all(cfg.seed == 3 for group in plan for cfg in group.values())
    assert [list(g) for g in load_plan("dense, cnn")] == [["dense"], ["cnn"]]


def test_a_saved_config_from_before_a_field_existed_holds_its_default() -> None:
    cfg = load_config("cnn")
    old = {k: v for k, v in vars(cfg).items() if k not in ("ema", "mixup")}
    restored = saved_config({"training": {"config": old}})
    assert restored == cfg and restored.ema == 0.0
