"""Time the training of each model from its repository config, then score it on the test split.

    python bench/train_time.py --data DIR --out DIR [--device cuda] [--models dense,cnn,transfer]

Prints one JSON line per model: wall time (data decode and frozen-feature caching included),
best epoch, validation AUC and the test AUC of the finished model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pneumoscan import train
from pneumoscan.config import load_config
from pneumoscan.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="dense,cnn,transfer")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    for name in args.models.split(","):
        cfg = load_config(name, seed=args.seed)
        start = time.perf_counter()
        model = train.train(
            cfg,
            args.data,
            args.out / name,
            args.device,
            force=True,
            log=lambda _: None,
            progress=False,
        )
        wall = time.perf_counter() - start
        result = evaluate(model, args.data, "test", n_boot=200)
        print(
            json.dumps(
                {
                    "model": name,
                    "device": model.meta["training"]["device"],
                    "wall_s": round(wall, 1),
                    "best_epoch": model.meta["training"]["best_epoch"],
                    "val_auc": round(model.meta["validation"]["auc"], 4),
                    "test_auc": round(result.auc, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
