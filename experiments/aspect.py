"""docs/experiments.md sections 17-18: how far a model's answer moves with the framing,
median logits on validation, per ratio.

    python experiments/aspect.py --data DIR [--model ensemble] [--ratios 0.8,0.9,1,1.1,1.25] [--zoom]

Each validation image (carved from train as the model's own training carved it) is warped so
that the anatomy is r times taller than wide at the same area, or with `--zoom` r times larger
(`ensembles.reframed`), and scored; the table gives the median logit of the normals and of the
pneumonia images per ratio. A model that reads the lungs, not the frame, barely moves
(docs/experiments.md, sections 17 and 18). Validation only: it diagnoses, it chooses nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ensembles import framings, reframed, scored_split

from pneumoscan import model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="ensemble", help="a bundled model or a model folder")
    parser.add_argument("--ratios", default="0.8,0.9,1,1.1,1.25")
    parser.add_argument("--zoom", action="store_true", help="zoom by each ratio instead")
    args = parser.parse_args()

    model = model_folder.load(args.model)
    images, labels, _ = scored_split(args.data, model.meta, test=False)
    print(f"{args.model}, {len(labels)} validation images ({int((labels == 0).sum())} normal)")
    print(
        f"| {'zoom' if args.zoom else 'height/width x'} | normals: median logit | pneumonia: median logit |"
    )
    print("|---:|---:|---:|")
    for r in (float(r) for r in args.ratios.split(",")):
        scales = framings([], [r]) if args.zoom else framings([r], [])
        warped = images if r == 1 else reframed(images, scales)
        z = model.raw_scores(warped)[0]
        print(f"| {r:g} | {np.median(z[labels == 0]):.2f} | {np.median(z[labels == 1]):.2f} |")


if __name__ == "__main__":
    main()
