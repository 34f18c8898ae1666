"""What defines a training run: its config, the bundled recipes, and plans of several recipes.

A recipe is a YAML file in `configs/` (`transfer-wide` extends `transfer`); a plan names
several recipes to train and join (`cnn,transfer+transfer-wide`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

from pneumoscan import data
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import MODEL_NAMES


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the model."""

    model: str
    image_size: int = 128
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 6
    seed: int = 0
    val_fraction: float | dict = 0.1  # of each source's images; or {source: share, default: share}
    split_seed: int = 0
    val_design: str = "random"  # data.VAL_DESIGNS
    feature_views: int = 1  # 0: no cache; the frozen trunk sees fresh augmentations each step
    lr_decay: float = 1.0  # layer-wise rates: layer k down from the output gets lr * lr_decay^k
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off
    mixup: float = 0.0  # Beta(a, a) blend of each batch with itself shuffled; 0 = off
    label_smoothing: float = 0.0  # targets eps/2 and 1 - eps/2
    # {weight, offset, gain, gamma}: each batch also scored under another exposure, and the
    # two answers' Jensen-Shannon divergence added, times weight, to the loss; {} = off
    consistency: dict = field(default_factory=dict)
    max_steps: int | None = None
    augment: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)
    # {source: factor}: that source's images weigh `factor` times more in the loss (default 1)
    source_weight: dict = field(default_factory=dict)
    init: str | None = None  # fine-tuning: start from this trained model's weights
    # The detection point's validation sensitivity target: one for every source, or
    # {source: target, default: target}
    detection_sensitivity: float | dict = 0.98


# A plan trains several recipes and joins them: groups split by ",", recipes of one group
# (heads on one frozen trunk) joined by "+". The bundled default (docs/experiments.md, 23).
PLANS = {"ensemble": "cnn,transfer+transfer-wide"}

Plan = list[dict[str, TrainConfig]]


def recipes() -> list[str]:
    """The bundled recipes: one YAML config each (e.g. `transfer-wide` extends `transfer`)."""
    folder = resources.files("pneumoscan") / "configs"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def _recipe_values(recipe: str) -> dict:
    """A bundled recipe's values; `extends: BASE` starts from BASE's (dicts merged key by key)."""
    import yaml

    if recipe not in recipes():
        choices = ", ".join([*recipes(), *PLANS])
        raise PneumoscanError(f"--model {recipe!r}: choose one of {choices}")
    text = (resources.files("pneumoscan") / "configs" / f"{recipe}.yaml").read_text()
    own = yaml.safe_load(text) or {}
    base = own.pop("extends", None)
    values = {"model": recipe} if base is None else _recipe_values(base)
    for key, value in own.items():
        merge = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if merge else value
    return values


def load_config(recipe: str, path: Path | None = None, **overrides) -> TrainConfig:
    """A bundled recipe's config (or the YAML at `path` for model `recipe`), with non-None
    overrides on top."""
    import yaml

    if path is None:
        values = _recipe_values(recipe)
    else:
        if recipe not in MODEL_NAMES:
            raise PneumoscanError(
                f"--model {recipe!r}: with --config choose one of {', '.join(MODEL_NAMES)}"
            )
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise PneumoscanError(f"--config {path}: cannot read ({exc.strerror})") from None
        values["model"] = recipe
    values.update({k: v for k, v in overrides.items() if v is not None})
    _check(values, f"--config {path}" if path is not None else f"config for {recipe}")
    return TrainConfig(**values)


def _check(values: dict, source: str) -> None:
    """Refuse a config that names an unknown model, key or value, saying which."""
    if values.get("val_design", "random") not in data.VAL_DESIGNS:
        raise PneumoscanError(
            f"--val-design {values['val_design']!r}: choose one of {', '.join(data.VAL_DESIGNS)}"
        )
    if values["model"] not in MODEL_NAMES:
        raise PneumoscanError(f"{source}: model must be one of {', '.join(MODEL_NAMES)}")
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise PneumoscanError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    if not 0 < float(values.get("lr_decay", 1.0)) <= 1:
        raise PneumoscanError(f"{source}: lr_decay must be in (0, 1] (1: one rate for all)")
    consistency = values.get("consistency") or {}
    if consistency and (
        not isinstance(consistency, dict) or float(consistency.get("weight", 0)) <= 0
    ):
        raise PneumoscanError(
            f"{source}: consistency must be a mapping with a positive weight "
            "(e.g. {weight: 12, offset: 0.1, gain: 0.2, gamma: 0.3})"
        )
    if consistency and float(values.get("mixup", 0.0)) > 0:
        raise PneumoscanError(f"{source}: consistency and mixup cannot be combined; set one")
    shares = values.get("val_fraction", 0.1)
    for share in shares.values() if isinstance(shares, dict) else [shares]:
        if not 0 < float(share) < 1:
            raise PneumoscanError(f"{source}: val_fraction must be in (0, 1), e.g. 0.1")
    if not 0 <= float(values.get("ema", 0.0)) < 1:
        raise PneumoscanError(f"{source}: ema must be in [0, 1) (0: off; e.g. 0.995)")


def load_plan(spec: str, path: Path | None = None, **overrides) -> Plan:
    """`--model` -> groups of recipes: "cnn,transfer" two groups, "transfer+transfer-wide" one
    group of two heads, "ensemble" the bundled default's plan. A config at `path` stands for
    a single model's; overrides go to every recipe."""
    full = PLANS.get(spec, spec)
    groups = [[n.strip() for n in group.split("+")] for group in full.split(",")]
    if path is not None and sum(map(len, groups)) > 1:
        raise PneumoscanError(f"--config: give it one --model, not {spec!r}")
    for names in groups:
        if len(set(names)) < len(names):
            raise PneumoscanError(f"--model {spec}: {'+'.join(names)} names a recipe twice")
    if len({"+".join(names) for names in groups}) < len(groups):
        raise PneumoscanError(f"--model {spec}: a group is named twice")
    return [{n: load_config(n, path, **overrides) for n in names} for names in groups]


# Fine-tuning a trained model on a site's own images: its own recipe, at a fifth of its learning
# rate, for at most 10 epochs, with a fifth of the site's patients carved out for validation (a
# site's set is small: thresholds need enough of both classes there).
FINETUNE = {"lr_scale": 0.2, "max_epochs": 10, "patience": 4, "val_fraction": 0.2}


def finetune_config(init: str | Path, **overrides) -> TrainConfig:
    """The config that fine-tunes the model `init` (a bundled name or a model folder): the
    recipe it was trained with, adapted by FINETUNE, with non-None overrides on top."""
    from pneumoscan import model_folder

    card = model_folder.read_card(init)
    saved = asdict(saved_config(card.meta))
    values = {
        **saved,
        "lr": saved["lr"] * FINETUNE["lr_scale"],
        "epochs": min(saved["epochs"], FINETUNE["max_epochs"]),
        "patience": FINETUNE["patience"],
        "val_fraction": FINETUNE["val_fraction"],
        "source_weight": {},
        "max_steps": None,
        "init": str(init),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    _check(values, f"--init {init}")
    return TrainConfig(**values)


def saved_config(meta: dict) -> TrainConfig:
    """The training config a model.json records; one saved before a field existed holds its
    default."""
    return TrainConfig(**meta["training"]["config"])
