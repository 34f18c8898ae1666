"""Train the bundled default, `ensemble`, from scratch: one command (docs/experiments.md, 23).

    python tools/train_default.py --data ../shared/data/chest_xray --out runs/default

The default is the `cnn` (seed 0) joined with a two-headed `transfer` (seed 0): the bundled
`transfer` recipe's head and one trained with the wider scale augmentation (`scale: 0.25`), on
one frozen trunk. Each member trains in OUT/MEMBER with the bundled configs (a member already
trained there is kept, so an interrupted run goes on), then OUT/transfer2 joins the two heads and
OUT/ensemble joins it with the `cnn`: logit weights 1/2, 1/4, 1/4. Then
`python tools/bundle_models.py DATA OUT ensemble` ships it. Test is never read.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from pneumoscan import bundle, train

# The wider-scale `transfer` head (sections 19-23): the bundled recipe with `scale: 0.25`.
WIDE_SCALE = 0.25


def members(seed: int) -> dict[str, train.TrainConfig]:
    cnn = train.load_config("cnn", seed=seed)
    transfer = train.load_config("transfer", seed=seed)
    wide = replace(transfer, augment={**transfer.augment, "scale": WIDE_SCALE})
    return {"cnn": cnn, "transfer": transfer, "transfer-wide": wide}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for name, cfg in members(args.seed).items():
        folder = args.out / name
        if (folder / bundle.META_FILE).exists():
            print(f"{name}: kept the model already in {folder}")
            continue
        resume = (folder / train.CHECKPOINT_FILE).exists()
        train.train(cfg, args.data, folder, args.device, resume=resume, log=print, progress=False)
    heads = [args.out / "transfer", args.out / "transfer-wide"]
    train.join_members(heads, args.data, args.out / "transfer2")
    joined = train.join_members(
        [args.out / "cnn", args.out / "transfer2"], args.data, args.out / "ensemble", "ensemble"
    )
    print(f"{args.out / 'ensemble'}: validation AUC {joined.meta['validation']['auc']:.4f}")


if __name__ == "__main__":
    main()
