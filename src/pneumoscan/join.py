"""Several trained models as one: joining model folders, and training a plan of recipes.

Members of one network (the same architecture and model arguments: seeds of a recipe, or
recipes that differ only in how they trained) become heads on their one frozen trunk, which
then runs once (`models.heads_on_one_trunk`). Members of different networks become a
`mixture`, each run whole. Either way the joined model scores the mean logit, and its guard,
calibration and thresholds are fit again on validation (postfit.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pneumoscan import data, distributed, model_folder, postfit
from pneumoscan.checkpoint import CHECKPOINT_FILE
from pneumoscan.config import Plan, TrainConfig, saved_config
from pneumoscan.errors import PneumoscanError
from pneumoscan.train import check_out_dir, train


def split_of(meta: dict) -> tuple:
    """What fixes a model's validation images: its data, input size and split settings."""
    config = asdict(saved_config(meta))
    keys = ("image_size", "val_fraction", "split_seed", "val_design")
    return (meta["data"]["fingerprint"], *(config[k] for k in keys))


def join_models(
    folders: list[Path],
    data_root: data.DataSets,
    out_dir: Path,
    name: str | None = None,
    force: bool = False,
) -> model_folder.LoadedModel:
    """Trained models (at least two, of the same data and split) -> one model in `out_dir`."""
    if len(folders) < 2:
        raise PneumoscanError("join: give at least two model folders")
    if (Path(out_dir) / model_folder.META_FILE).exists() and not force:
        raise PneumoscanError(
            f"--out {out_dir}: already holds a model; pass --force to overwrite it"
        )
    for folder in folders:
        model_folder.resolve(folder, "join")
    return _join(folders, data_root, Path(out_dir), name)


def _join(folders: list[Path], data_root: data.DataSets, out_dir: Path, name: str | None):
    from pneumoscan.models import heads_on_one_trunk, mixture, share_trunk

    members = [model_folder.load(f) for f in folders]
    first = members[0]
    for folder, m in zip(folders, members, strict=True):
        if m.meta["architecture"] == "mixture":
            raise PneumoscanError(f"{folder}: already a mixture; join its members instead")
        if split_of(m.meta) != split_of(first.meta):
            raise PneumoscanError(
                f"{folder}: trained on other data or another validation split than {folders[0]};"
                " joined members must share them"
            )
    networks = [(m.meta["architecture"], m.meta["model_args"]) for m in members]
    one_network = (
        all(n == networks[0] for n in networks)
        and "members" not in networks[0][1]
        and share_trunk([m.network for m in members])
    )
    meta = _joined_meta(folders, members)
    if one_network:
        meta["model_args"] = {**first.meta["model_args"], "members": len(members)}
        network = heads_on_one_trunk([m.network for m in members])
    else:
        specs = [{"architecture": a, "model_args": args} for a, args in networks]
        meta.update(architecture="mixture", model_args={"members": specs})
        meta["name"] = "+".join(m.name for m in members)
        network = mixture([m.network for m in members], specs)
    if name is not None:
        meta["name"] = name
    model_folder.save(out_dir, network, meta)
    return postfit.fit_postprocessing(model_folder.load(out_dir), data_root)


def _joined_meta(folders: list[Path], members: list[model_folder.LoadedModel]) -> dict:
    """The first member's model.json with the members listed; post-fitting adds the rest."""
    first = members[0]
    configs = [asdict(saved_config(m.meta)) for m in members]
    same_recipe = all({**c, "seed": 0} == {**configs[0], "seed": 0} for c in configs)
    # The guard, calibration and thresholds are the joined model's own, fit afterwards.
    meta = {k: v for k, v in first.meta.items() if k != "ood"}
    meta["training"] = {
        **first.meta["training"],
        "members": [
            {
                "folder": str(f),
                "model": m.description,
                "seed": m.meta["training"]["config"]["seed"],
                "validation_auc": m.meta["validation"]["auc"],
                "wall_time_s": m.meta["training"]["wall_time_s"],
                # recipes that differ: each member's own (the joined model's is the first's)
                **({} if same_recipe else {"config": config}),
            }
            for f, m, config in zip(folders, members, configs, strict=True)
        ],
        "wall_time_s": round(sum(m.meta["training"]["wall_time_s"] for m in members), 1),
    }
    return meta


def join_populations(
    experts: dict[str, str | Path],
    data_root: data.DataSets,
    out_dir: Path,
    name: str | None = None,
    detection_sensitivity: float | dict | None = None,
    reference: data.DataSets | None = None,
    force: bool = False,
) -> model_folder.LoadedModel:
    """Models of different populations as one (`models.Mixture` with populations): each model
    the expert of the source it was trained on (`experts`: source name -> model), and a gate,
    fitted here on the training images of every source, that weighs the experts by which
    population an image is like. Then the guard (a Gaussian per population), calibration and
    both points are fitted on each source's validation, carved as each expert's own training
    carved it, so no validation image trained anything."""
    if len(experts) < 2:
        raise PneumoscanError("join --population: give at least two populations")
    out_dir = Path(out_dir)
    if (out_dir / model_folder.META_FILE).exists() and not force:
        raise PneumoscanError(
            f"--out {out_dir}: already holds a model; pass --force to overwrite it"
        )
    loaded = {source: model_folder.load(model) for source, model in experts.items()}
    configs = {source: saved_config(m.meta) for source, m in loaded.items()}
    first = next(iter(configs.values()))
    for source, m in loaded.items():
        if m.populations != [source]:
            raise PneumoscanError(
                f"--population {source}={experts[source]}: that model was trained on "
                f"{', '.join(m.populations)}, not on {source}"
            )
        cfg = configs[source]
        if (cfg.image_size, cfg.split_seed, cfg.val_design) != (
            first.image_size,
            first.split_seed,
            first.val_design,
        ):
            raise PneumoscanError(
                f"--population {source}: its input size or validation design differs from the "
                "first population's; experts must share them"
            )
    shares = {s: c.val_fraction for s, c in configs.items()}
    d = data.training_data(data_root, first.image_size, shares, first.split_seed, first.val_design)
    if d.manifest.source_names != list(experts):
        raise PneumoscanError(
            f"--data: holds the sources {', '.join(d.manifest.source_names)}; give one data set "
            f"per population, in the order of --population ({', '.join(experts)})"
        )
    for source, m in loaded.items():
        part = d.manifest.subset(d.manifest.of_source(source))
        if data.fingerprint(part.files) != m.meta["data"]["fingerprint"]:
            raise PneumoscanError(
                f"--data: the {source} images are not those {experts[source]} was trained on"
            )
    network, meta = _population_network(loaded, d, first.image_size)
    meta["name"] = name or "+".join(experts)
    cfg = replace(
        first,
        val_fraction=shares,
        detection_sensitivity=detection_sensitivity or first.detection_sensitivity,
    )
    meta["training"] = {
        "config": asdict(cfg),
        "populations": {
            source: {
                "model": m.name,
                "folder": str(m.folder),
                "description": m.description,
                "validation_auc": m.meta["validation"]["auc"],
                "config": asdict(configs[source]),
            }
            for source, m in loaded.items()
        },
        "gate": meta.pop("gate"),
        "wall_time_s": round(sum(m.meta["training"]["wall_time_s"] for m in loaded.values()), 1),
    }
    model_folder.save(out_dir, network, meta)
    return postfit.fit_postprocessing(model_folder.load(out_dir), data_root, reference)


def _population_network(
    loaded: dict[str, model_folder.LoadedModel], d: data.TrainingData, size: int
) -> tuple:
    """Every expert's members side by side, a weights row per population, and the gate: a
    logistic regression of the population on the pooled features of the first frozen trunk."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pneumoscan.device import trunk_features
    from pneumoscan.guard import Guard
    from pneumoscan.models import Mixture, mixture

    members, specs, rows = [], [], []
    for m in loaded.values():
        network = m.network
        if isinstance(network, Mixture):
            own = list(network.members)
            weights = network.weights[0].tolist()
            parts = model_folder.parts(m.meta)
        else:
            own, weights, parts = [network], [1.0], [(m.meta["architecture"], m.meta["model_args"])]
        rows.append((len(members), weights))
        members += own
        specs += [{"architecture": a, "model_args": args} for a, args in parts]
    matrix = [[0.0] * len(members) for _ in rows]
    for k, (start, weights) in enumerate(rows):
        matrix[k][start : start + len(weights)] = weights
    gate_member = next((i for i, m in enumerate(members) if m.has_frozen_trunk), None)
    if gate_member is None:
        raise PneumoscanError(
            "join --population: the gate reads a frozen ImageNet trunk; give at least one "
            "transfer model"
        )
    guard_input = model_folder.guard_input(next(iter(loaded.values())).meta)
    network = mixture(members, specs, guard_input, matrix, gate_member)
    network.share_trunks()
    trunk = members[gate_member].trunk
    pooled = Guard.pool(
        trunk_features(trunk, d.images, d.train_idx, torch.device("cpu"), 64)
    ).numpy()
    names = list(loaded)
    target = np.asarray([names.index(s) for s in d.sources[d.train_idx]])
    scaler = StandardScaler().fit(pooled)
    fitted = LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced")
    fitted.fit(scaler.transform(pooled), target)
    coef = fitted.coef_ / scaler.scale_
    bias = fitted.intercept_ - coef @ scaler.mean_
    if len(names) == 2:  # scikit-learn's binary model: one row, for the second class
        coef, bias = np.stack([-coef[0] / 2, coef[0] / 2]), np.asarray([-bias[0] / 2, bias[0] / 2])
    with torch.no_grad():
        network.gate.weight.copy_(torch.from_numpy(coef).float())
        network.gate.bias.copy_(torch.from_numpy(bias).float())
    val_pooled = Guard.pool(
        trunk_features(trunk, d.images, d.val_idx, torch.device("cpu"), 64)
    ).numpy()
    val_target = np.asarray([names.index(s) for s in d.sources[d.val_idx]])
    gate = {
        "method": "logistic regression of the population on the mean- and std-pooled output of "
        f"member {gate_member}'s frozen trunk, fit on the training images",
        "train_accuracy": float(fitted.score(scaler.transform(pooled), target)),
        "validation_accuracy": float(
            (fitted.predict(scaler.transform(val_pooled)) == val_target).mean()
        ),
    }
    first = next(iter(loaded.values()))
    meta = {
        "architecture": "mixture",
        "input_size": size,
        "class_names": first.class_names,
        "model_args": {
            "members": specs,
            "weights": matrix,
            "gate_member": gate_member,
            "populations": names,
        },
        "data": d.describe(),
        "gate": gate,
    }
    return network, meta


@dataclass
class _PlanRun:
    """The settings every member of a plan trains and joins with."""

    seeds: list[int]
    data_root: data.DataSets
    resume: bool
    force: bool
    log: Callable[[str], None]
    options: dict  # for `train`: device_name, progress, devices


def train_plan(
    plan: TrainConfig | Plan,
    seeds: list[int],
    data_root: data.DataSets,
    out_dir: Path,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    name: str | None = None,
    **options,
) -> model_folder.LoadedModel | None:
    """Train each recipe of `plan` once per seed, then join all of them into one model in OUT.

    One recipe (a config): members in OUT/seed-N. Several groups (a mixture, e.g. `cnn` and
    `transfer`): each group in OUT/GROUP, itself joined from OUT/GROUP/seed-N when there are
    several seeds. A group of several recipes of one network (`transfer+transfer-wide`): each
    recipe in OUT/GROUP/RECIPE, joined as heads on its one frozen trunk. Joins take the mean
    logit at each level, so the default `ensemble` (`cnn,transfer+transfer-wide`, seed 0)
    weighs its members 1/2, 1/4, 1/4. With `resume`, members already trained are kept and an
    interrupted one resumes from its checkpoint. `options` go to `train` (device_name,
    progress, devices). Returns None on the ranks other than 0 under torchrun.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume, force)
    if isinstance(plan, TrainConfig):
        plan = [{plan.model: plan}]
    run = _PlanRun(seeds, data_root, resume, force, log, options)
    folders = _parts(run, plan, out_dir)
    if not distributed.is_main():  # under torchrun: rank 0 joins
        return None
    return _join(folders, run.data_root, out_dir, name)


def _parts(run: _PlanRun, groups: Plan, folder: Path) -> list[Path]:
    """The trained folders that `groups` joins from, inside `folder`."""
    if len(groups) > 1:
        return [_built(run, [g], folder / "+".join(g)) for g in groups]
    if len(groups[0]) > 1:
        return [_built(run, [{r: c}], folder / r) for r, c in groups[0].items()]
    (recipe,) = groups[0].values()
    return [_member(run, recipe, s, folder / f"seed-{s}") for s in run.seeds]


def _built(run: _PlanRun, groups: Plan, folder: Path) -> Path:
    """A part of the whole: one recipe with one seed trains in place, the rest join."""
    if len(groups) == 1 and len(groups[0]) == 1 and len(run.seeds) == 1:
        (recipe,) = groups[0].values()
        return _member(run, recipe, run.seeds[0], folder)
    folders = _parts(run, groups, folder)
    if distributed.is_main():
        _join(folders, run.data_root, folder, None)
    return folder


def _member(run: _PlanRun, recipe: TrainConfig, seed: int, folder: Path) -> Path:
    """One recipe trained with one seed in `folder` (kept as it is when resuming a plan)."""
    if run.resume and (folder / model_folder.META_FILE).exists():
        run.log(f"member {recipe.model} seed {seed}: kept the model already in {folder}")
        return folder
    run.log(f"== member {recipe.model} seed {seed} in {folder}")
    again = run.resume and (folder / CHECKPOINT_FILE).exists()
    train(
        replace(recipe, seed=seed),
        run.data_root,
        folder,
        resume=again,
        force=run.force,
        log=run.log,
        **run.options,
    )
    return folder
