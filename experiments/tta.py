"""docs/experiments.md section 10: test-time augmentation, judged on validation, each model's
mean logit over fixed views.

    python experiments/tta.py --data DIR --family cnn=runs/eq/cnn-s0,runs/eq/cnn-s1,runs/eq/cnn-s2
        --family transfer=runs/seeds/transfer-s0,... [--test]

The views are the training augmentation's own moves, fixed: shifts by 4% of the image
(left, right, up, down) and zooms by 6% (in, out), each with the plain image. For every view
set it scores each model, and each pair of the first two families' i-th models (the shape of
the bundled `ensemble`), on the validation images of their own split: AUC and specificity at
sensitivity 0.99, as mean and sd over the models. All models must share one validation split.
With --test it scores the test split instead: for the report of a choice already made.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ensembles import RESULTS, record, scored_split, specificity_at_sensitivity

from pneumoscan import metrics, model_folder, runtime
from pneumoscan.join import split_of

SHIFT = 0.04 * 2  # affine_grid's units: the image spans [-1, 1]
VIEWS = {
    "plain": [(1.0, 0.0, 0.0)],
    "shifts": [(1.0, 0.0, 0.0)]
    + [(1.0, dx, dy) for dx, dy in ((SHIFT, 0), (-SHIFT, 0), (0, SHIFT), (0, -SHIFT))],
    "zooms": [(1.0, 0.0, 0.0), (1.06, 0.0, 0.0), (1 / 1.06, 0.0, 0.0)],
}
VIEWS["shifts+zooms"] = VIEWS["shifts"] + VIEWS["zooms"][1:]


def view(x: torch.Tensor, zoom: float, dx: float, dy: float) -> np.ndarray:
    theta = torch.tensor([[1 / zoom, 0.0, dx], [0.0, 1 / zoom, dy]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--family", action="append", required=True, help="NAME=FOLDER,FOLDER,...")
    parser.add_argument("--test", action="store_true", help="score on test (a chosen recipe)")
    args = parser.parse_args()

    families = {}
    for entry in args.family:
        name, _, folders = entry.partition("=")
        families[name] = [Path(f) for f in folders.split(",")]
    cards = {f: model_folder.read_card(f) for fs in families.values() for f in fs}
    if len({split_of(c.meta) for c in cards.values()}) > 1:
        parser.error("the models were trained on different validation splits")
    images, labels, split = scored_split(args.data, next(iter(cards.values())).meta, args.test)
    x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)

    logits = {}  # (folder, view set) -> logits
    for folder in cards:
        model = runtime.load(folder)
        per_view = {  # each distinct view scored once, whichever view sets share it
            v: np.concatenate([model.run(view(x[i : i + 64], *v))[0] for i in range(0, len(x), 64)])
            for v in {v for views in VIEWS.values() for v in views}
        }
        for name, views in VIEWS.items():
            logits[folder, name] = np.mean([per_view[v] for v in views], axis=0)

    names = list(families)
    groups = {name: [[f] for f in folders] for name, folders in families.items()}
    if len(names) > 1:
        groups[f"{names[0]} + {names[1]}"] = [
            list(pair) for pair in zip(families[names[0]], families[names[1]], strict=False)
        ]
    rows = []
    for group, candidates in groups.items():
        for view_set in VIEWS:
            aucs, specs = [], []
            for members in candidates:
                z = np.mean([logits[f, view_set] for f in members], axis=0)
                aucs.append(metrics.auc(labels, z))
                specs.append(specificity_at_sensitivity(labels, z, 0.99))
            rows.append(
                {
                    "group": group,
                    "views": view_set,
                    "n_views": len(VIEWS[view_set]),
                    "split": split,
                    "n": len(labels),
                    "models": len(candidates),
                    "auc": [round(a, 4) for a in aucs],
                    "auc_mean": round(float(np.mean(aucs)), 4),
                    "auc_sd": round(float(np.std(aucs, ddof=1)), 4) if len(aucs) > 1 else None,
                    "spec_at_sens_0.99": [round(s, 4) for s in specs],
                    "spec_mean": round(float(np.mean(specs)), 4),
                    "spec_sd": round(float(np.std(specs, ddof=1)), 4) if len(specs) > 1 else None,
                    "date": date.today().isoformat(),
                }
            )
    for row in rows:
        print(json.dumps(row), flush=True)
    record.append("cpu_tta.jsonl", rows, RESULTS)


if __name__ == "__main__":
    main()
