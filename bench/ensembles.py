"""Seed and family ensembles, judged on validation only (test with --test, once, afterwards).

    python bench/ensembles.py --data DIR --runs runs/seeds [--families cnn,transfer] [--seeds 0,1,2]
        [--set model_args.equalize=true ...]

Trains each family's bundled recipe once per seed (a run already in RUNS/FAMILY-sSEED is reused),
then scores every single model and every ensemble (the mean of its members' logits) on the
validation images carved from train: AUC, and specificity at the highest threshold that keeps
validation sensitivity >= 0.99 (how many normals a near-complete detection spares). With --test
it scores the same candidates on the test split: for the report of a recipe already chosen.
`--set KEY=VALUE` changes the bundled recipe (dotted keys reach into dicts) for a variant's
study: give each variant its own RUNS folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
from datetime import date
from pathlib import Path

import numpy as np
import yaml

from pneumoscan import bundle, data, metrics, train

RESULTS = Path(__file__).parent / "results"


def specificity_at_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    positives = np.sort(scores[labels == 1])
    threshold = positives[int(np.floor((1 - target) * len(positives)))]
    return float(np.mean(scores[labels == 0] < threshold))


def recipe(family: str, seed: int, changes: list[str]) -> train.TrainConfig:
    cfg = train.load_config(family, seed=seed)
    for change in changes:
        key, value = change.split("=", 1)
        *parents, leaf = key.split(".")
        target = cfg.__dict__
        for p in parents:
            target = target[p]
        target[leaf] = yaml.safe_load(value)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--families", default="cnn,transfer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--test", action="store_true", help="score on test (a chosen recipe)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE recipe change")
    args = parser.parse_args()

    families = args.families.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    models = {}
    for family, seed in itertools.product(families, seeds):
        folder = args.runs / f"{family}-s{seed}"
        if not (folder / "model.json").exists():
            cfg = recipe(family, seed, args.set)
            train.train(cfg, args.data, folder, args.device, log=print, progress=False)
        models[f"{family}-s{seed}"] = bundle.load(folder)

    reference = next(iter(models.values()))
    cfg = train.TrainConfig(**reference.meta["training"]["config"])
    if args.test:
        listed = data.list_split(args.data, "test")
        images, kept = data.load_images(listed, cfg.image_size)
        labels, split = kept.labels, "test"
    else:
        d = train._prepare_data(args.data, cfg)
        images, labels, split = d.images[d.val_idx], d.labels[d.val_idx], "validation"
    images = np.asarray(images)
    logits = {name: model.raw_scores(images)[0] for name, model in models.items()}

    candidates = {name: [name] for name in logits}
    for family in families:
        candidates[f"{family} x{len(seeds)}"] = [f"{family}-s{s}" for s in seeds]
    if len(families) > 1:
        candidates[f"{'+'.join(families)} x{len(seeds)}"] = list(logits)
        candidates["+".join(f"{f}-s{seeds[0]}" for f in families)] = [
            f"{f}-s{seeds[0]}" for f in families
        ]
    rows = []
    for name, members in candidates.items():
        z = np.mean([logits[m] for m in members], axis=0)
        rows.append(
            {
                "candidate": name,
                "runs": str(args.runs),
                "changes": args.set,
                "members": len(members),
                "split": split,
                "n": len(labels),
                "auc": round(metrics.auc(labels, z), 4),
                "spec_at_sens_0.99": round(specificity_at_sensitivity(labels, z, 0.99), 4),
                "date": date.today().isoformat(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "cpu_ensembles.jsonl").open("a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
