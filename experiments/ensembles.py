"""docs/experiments.md sections 7-11 and 13-25: seed and family ensembles, judged on validation
only (test with --test, once, afterwards).

    python experiments/ensembles.py --data DIR --runs runs/seeds [--families cnn,transfer=runs/eq]
        [--seeds 0,1,2] [--set model_args.equalize=true ...]

Trains each family's bundled recipe once per seed (a run already in RUNS/FAMILY-sSEED is reused),
then scores every single model, every pair and every ensemble (the mean of its members'
logits; pairs of seeds and pairs across families also as mean and sd over seeds) on the
validation images carved from train: AUC, and specificity at the highest threshold that keeps
validation sensitivity >= 0.99 (how many normals a near-complete detection spares). With --test
it scores the same candidates on the test split: for the report of a recipe already chosen.
Each model is scored on the images at its own input size, so pairs may cross sizes.
`--set KEY=VALUE` changes the bundled recipe (dotted keys reach into dicts) for a variant's
study: give each variant its own RUNS folder. `--aspect 0.8,0.9,1.1,1.25` scores the images
once as they are and once per ratio with the anatomy made that much taller than wide (at the
same area, as every frame was squashed to a square from its own aspect ratio: section 17);
`--zoom 0.8,0.9,1.1,1.25` adds a copy per zoom (a tighter or looser frame: section 18).
`--resample 0.5,0.75` adds a copy per factor, shrunk to that fraction of its size and enlarged
back: the detail a smaller original would have had (section 24).
`--families cnn,transfer=runs/a+runs/b` makes each seed's `transfer` the mean of its runs in
both folders: two recipes' heads on one frozen trunk, as `pneumoscan join` builds it (section 22).
Train each folder's runs first, with its own `--set`: a missing run is trained with this
command's one recipe, in whichever folder lacks it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import record  # bench/record.py; the rows go to experiments/results, not bench's

from pneumoscan import data, metrics, model_folder, train
from pneumoscan.config import TrainConfig, load_config, saved_config

RESULTS = Path(__file__).parent / "results"


def specificity_at_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    positives = np.sort(scores[labels == 1])
    threshold = positives[int(np.floor((1 - target) * len(positives)))]
    return float(np.mean(scores[labels == 0] < threshold))


def scored_split(root: Path, meta: dict, test: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Images, labels and name of what a model is judged on: its own validation split, or test."""
    cfg = saved_config(meta)
    if test:
        images, kept = data.load_images(data.list_split(root, "test"), cfg.image_size)
        return np.asarray(images), kept.labels, "test"
    d = data.training_data(root, cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design)
    return np.asarray(d.images[d.val_idx]), d.labels[d.val_idx], "validation"


def framings(aspects: list[float], zooms: list[float]) -> list[tuple[float, float]]:
    """Content scale factors (width, height): each aspect ratio r makes the anatomy r times
    taller than wide at the same area; each zoom z scales it z times (> 1 crops the frame)."""
    return [(r**-0.5, r**0.5) for r in aspects] + [(z, z) for z in zooms]


def reframed(images: np.ndarray, scales: list[tuple[float, float]]) -> np.ndarray:
    """A copy of the images per (width, height) scale of the content, edges replicated."""
    x = torch.from_numpy(images).float()[:, None]
    views = []
    for sx, sy in scales:
        theta = torch.tensor([[1 / sx, 0, 0], [0, 1 / sy, 0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        views.append(warped)
    return _pixels(views)


def resampled(images: np.ndarray, factors: list[float]) -> np.ndarray:
    """A copy of the images per factor f: shrunk to f times their size (antialiased), then
    enlarged back, so that only the detail a smaller original would have had is left."""
    x = torch.from_numpy(images).float()[:, None]
    size = x.shape[-2:]
    views = []
    for f in factors:
        small = [max(1, round(f * s)) for s in size]
        low = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
        back = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        views.append(back)
    return _pixels(views)


def _pixels(views: list[torch.Tensor]) -> np.ndarray:
    """(N, 1, H, W) float views -> one (sum N, H, W) uint8 array, as the images came."""
    return torch.cat(views)[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def recipe(family: str, seed: int, changes: list[str]) -> TrainConfig:
    cfg = load_config(family, seed=seed)
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
    parser.add_argument(
        "--families",
        default="cnn,transfer",
        help="comma-separated; FAMILY=DIR takes that family's runs from DIR instead of --runs;"
        " FAMILY=DIR1+DIR2: each seed's member is the mean of its runs in both (section 22)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--test", action="store_true", help="score on test (a chosen recipe)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE recipe change")
    parser.add_argument("--aspect", default="", help="ratios, e.g. 0.8,0.9,1.1,1.25 (section 17)")
    parser.add_argument("--zoom", default="", help="zooms, e.g. 0.8,0.9,1.1,1.25 (section 18)")
    parser.add_argument("--resample", default="", help="factors, e.g. 0.5,0.75 (section 24)")
    args = parser.parse_args()
    scales = framings(
        [float(r) for r in args.aspect.split(",") if r],
        [float(z) for z in args.zoom.split(",") if z],
    )
    factors = [float(f) for f in args.resample.split(",") if f]

    seeds = [int(s) for s in args.seeds.split(",")]
    families = {}  # label -> (family, folders of its runs)
    for entry in args.families.split(","):
        family, _, folders = entry.partition("=")
        runs = [Path(f) for f in folders.split("+")] if folders else [args.runs]
        label = f"{family}[{'&'.join(r.name for r in runs)}]" if folders else family
        families[label] = (family, runs)
    models = {}  # name -> the loaded runs whose mean logit it is
    for (label, (family, runs)), seed in itertools.product(families.items(), seeds):
        models[f"{label}-s{seed}"] = []
        for folder in (r / f"{family}-s{seed}" for r in runs):
            if not (folder / "model.json").exists():
                cfg = recipe(family, seed, args.set)
                train.train(cfg, args.data, folder, args.device, log=print, progress=False)
            models[f"{label}-s{seed}"].append(model_folder.load(folder))

    scored = {}  # input size -> (images, labels, split name): each model sees its own size

    def logits_of(model: model_folder.LoadedModel) -> np.ndarray:
        size = model.meta["input_size"]
        if size not in scored:
            images, labels, split = scored_split(args.data, model.meta, args.test)
            if scales or factors:
                images = np.concatenate(
                    [images]
                    + ([reframed(images, scales)] if scales else [])
                    + ([resampled(images, factors)] if factors else [])
                )
                labels = np.tile(labels, len(scales) + len(factors) + 1)
                split += f" reframed: aspects {args.aspect or '-'}, zooms {args.zoom or '-'}"
                split += f", resampled {args.resample}" if factors else ""
            scored[size] = images, labels, split
        return model.raw_scores(scored[size][0])[0]

    logits = {
        name: np.mean([logits_of(run) for run in loaded], axis=0) for name, loaded in models.items()
    }
    (_, labels, split), *others = scored.values()
    if any(not np.array_equal(labels, other[1]) for other in others):
        raise SystemExit("the models' input sizes give different images to score")

    candidates = {name: [name] for name in logits}
    groups = {}  # candidates summarised together: mean and sd
    for label in families:
        candidates[f"{label} x{len(seeds)}"] = [f"{label}-s{s}" for s in seeds]
        pairs = [f"{label}-s{a}+{label}-s{b}" for a, b in itertools.combinations(seeds, 2)]
        groups[f"pairs of seeds of {label}"] = pairs
        for pair in pairs:
            candidates[pair] = pair.split("+")
    if len(families) > 1:
        candidates[" + ".join(f"{label} x{len(seeds)}" for label in families)] = list(logits)
        crossed = ["+".join(f"{label}-s{s}" for label in families) for s in seeds]
        groups[f"{' + '.join(families)}, one seed each"] = crossed
        for name in crossed:
            candidates[name] = name.split("+")
    rows = []
    scores = {}
    for name, members in candidates.items():
        z = np.mean([logits[m] for m in members], axis=0)
        scores[name] = (metrics.auc(labels, z), specificity_at_sensitivity(labels, z, 0.99))
        rows.append(_row(name, len(members), split, labels, *scores[name], args))
    for name, members in groups.items():
        if len(members) < 2:  # one seed: no pairs of seeds, and no spread to report
            continue
        aucs, specs = zip(*(scores[m] for m in members), strict=True)
        row = _row(
            f"{name} (mean of {len(members)})",
            len(members[0].split("+")),
            split,
            labels,
            float(np.mean(aucs)),
            float(np.mean(specs)),
            args,
        )
        row.update(
            auc_sd=round(float(np.std(aucs, ddof=1)), 4),
            spec_sd=round(float(np.std(specs, ddof=1)), 4),
        )
        rows.append(row)
    for row in rows:
        print(json.dumps(row), flush=True)
    record.append("cpu_ensembles.jsonl", rows, RESULTS)


def _row(name, members, split, labels, auc, spec, args) -> dict:
    return {
        "candidate": name,
        "members": members,
        "split": split,
        "n": len(labels),
        "auc": round(auc, 4),
        "spec_at_sens_0.99": round(spec, 4),
        "runs": str(args.runs),
        "families": args.families,
        "changes": args.set,
        "date": date.today().isoformat(),
    }


if __name__ == "__main__":
    main()
