"""docs/experiments.md sections 1 and 3: a validation-only sweep, training variants of a config
over seeds and reporting validation AUC and loss.

    python experiments/sweep.py --data DIR --model transfer --vary model_args.trainable_blocks=0,1,2 --seeds 0,1,2

The test split is never read here: choices between recipes are made on these numbers.
`noise_dp_*` is the change of probability on validation images when faint noise (1 grey
level sd) is added: a screening model should not answer pixel noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from ensembles import recipe  # experiments/ is the script's folder, so on its path

from pneumoscan import data, train


def noise_sensitivity(model, images: np.ndarray) -> np.ndarray:
    noisy = np.rint(images + np.random.default_rng(0).normal(0, 1, images.shape))
    return np.abs(
        model.probabilities(np.clip(noisy, 0, 255).astype(np.uint8)) - model.probabilities(images)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--vary", required=True, help="key=v1,v2,... ; dotted keys reach into dicts"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    key, values = args.vary.split("=", 1)
    for raw in values.split(","):
        value = yaml.safe_load(raw)
        aucs, losses, walls, noise_mean, noise_p99 = [], [], [], [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = recipe(args.model, seed, [f"{key}={raw}"])
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                model = train.train(
                    cfg, args.data, Path(out), args.device, log=lambda _: None, progress=False
                )
            walls.append(time.perf_counter() - start)
            d = data.training_data(
                args.data, cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design
            )
            dp = noise_sensitivity(model, np.asarray(d.images[d.val_idx]))
            noise_mean.append(float(dp.mean()))
            noise_p99.append(float(np.quantile(dp, 0.99)))
            history = model.meta["training"]["history"]
            best = model.meta["training"]["best_epoch"]
            aucs.append(model.meta["validation"]["auc"])
            losses.append(next(h["val_loss"] for h in history if h["epoch"] == best))
        print(
            json.dumps(
                {
                    "model": args.model,
                    key: value,
                    "seeds": args.seeds,
                    "val_auc_mean": round(statistics.mean(aucs), 4),
                    "val_auc_sd": round(statistics.stdev(aucs), 4),
                    "val_loss_mean": round(statistics.mean(losses), 4),
                    "val_loss_sd": round(statistics.stdev(losses), 4),
                    "wall_s_mean": round(statistics.mean(walls), 1),
                    "noise_dp_mean": round(statistics.mean(noise_mean), 4),
                    "noise_dp_p99": round(statistics.mean(noise_p99), 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
