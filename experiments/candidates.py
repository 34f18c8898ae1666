"""docs/experiments.md sections 34, 36 and 37: build a candidate model as it would ship: fp16
weights, guard, calibration and both points fitted again on validation (as
tools/bundle_models.py does for the bundled models).

    python experiments/candidates.py join DATA_DIR OUT SEED_FOLDER...
    python experiments/candidates.py member DATA_DIR OUT MEMBER_FOLDER [--default ensemble] [--at 0]

`join`: the seeds joined (`pneumoscan join`), named `cnn` (docs/experiments.md sections 34 and
36: C3x3, C5). `member`: the default with its member `--at` replaced by the model in
MEMBER_FOLDER, the other members' weights unchanged, named `ensemble` (E2, E4). OUT/raw keeps
the unrefitted folder.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from pneumoscan import model_folder
from pneumoscan.join import join_models
from pneumoscan.postfit import fit_postprocessing


def shipped(source: model_folder.LoadedModel, target: Path, name: str, data_root: Path) -> None:
    meta = {**source.meta, "name": name}
    model_folder.save(target, source.network, meta, dtype=torch.float16, ood=source.scorer.guard)
    model = fit_postprocessing(model_folder.load(target), data_root)
    print(f"{target}: validation AUC {model.meta['validation']['auc']:.4f}")


def with_member(default: model_folder.LoadedModel, folder: Path, at: int):
    """The default's network and model.json with member `at` replaced by the model in `folder`."""
    member = model_folder.load(folder)
    network = default.network
    network.members[at] = member.network
    meta = copy.deepcopy(default.meta)
    meta["model_args"]["members"][at]["model_args"] = member.meta["model_args"]
    if at == 0:
        meta["training"]["config"] = member.meta["training"]["config"]
    meta["training"]["members"][at].update(
        folder=str(folder),
        model=member.description,
        seed=member.meta["training"]["config"]["seed"],
        validation_auc=member.meta["validation"]["auc"],
        wall_time_s=member.meta["training"]["wall_time_s"],
        config=member.meta["training"]["config"],
    )
    return network, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join")
    member = commands.add_parser("member")
    for command in (join, member):
        command.add_argument("data", type=Path)
        command.add_argument("out", type=Path)
    join.add_argument("seeds", type=Path, nargs="+")
    member.add_argument("member", type=Path)
    member.add_argument("--default", default="ensemble")
    member.add_argument("--at", type=int, default=0)
    args = parser.parse_args()

    raw = args.out / "raw"
    if args.command == "join":
        joined = join_models(args.seeds, args.data, raw, name="cnn", force=True)
        shipped(joined, args.out, "cnn", args.data)
    else:
        network, meta = with_member(model_folder.load(args.default), args.member, args.at)
        model_folder.save(raw, network, {k: v for k, v in meta.items() if k != "ood"})
        shipped(model_folder.load(raw), args.out, "ensemble", args.data)


if __name__ == "__main__":
    main()
