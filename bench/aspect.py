"""How far a model's answer moves with the framing: median logits on validation, per aspect ratio.

    python bench/aspect.py --data DIR [--model ensemble] [--ratios 0.8,0.9,1,1.1,1.25]

Each validation image (carved from train as the model's own training carved it) is warped so
that the anatomy is r times taller than wide, at the same area (`ensembles.with_aspects`), and
scored; the table gives the median logit of the normals and of the pneumonia images per ratio.
A model that reads the lungs, not the frame's proportions, barely moves (docs/experiments.md,
section 17). Validation only: this diagnoses, it chooses nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ensembles import scored_split, with_aspects

from pneumoscan import bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="ensemble", help="a bundled model or a model folder")
    parser.add_argument("--ratios", default="0.8,0.9,1,1.1,1.25")
    args = parser.parse_args()

    model = bundle.load(args.model)
    images, labels, _ = scored_split(args.data, model.meta, test=False)
    print(f"{args.model}, {len(labels)} validation images ({int((labels == 0).sum())} normal)")
    print("| height/width x | normals: median logit | pneumonia: median logit |")
    print("|---:|---:|---:|")
    for r in (float(r) for r in args.ratios.split(",")):
        warped = images if r == 1 else with_aspects(images, [r])[len(images) :]
        z = model.raw_scores(warped)[0]
        print(f"| {r:g} | {np.median(z[labels == 0]):.2f} | {np.median(z[labels == 1]):.2f} |")


if __name__ == "__main__":
    main()
