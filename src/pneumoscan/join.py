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
