"""Exposure and windowing invariance: does the same X-ray keep its label and probability?

    python bench/exposure.py --data DIR [--models ensemble,dense,cnn,transfer]
                             [--splits validation,test] [--every 4]

For every `--every`-th image of each split (validation: carved from train as the models' own
split, for decisions; test: for the record) and each transform, the detection-point label flips,
the largest change of the calibrated probability against the untouched image, how many images
it moves by more than 0.05 (`over_tolerance`), and how many images change domain-check outcome
(domain.py). Transforms:
`shift.EXPOSURE` (offset +-20 grey levels, gain 0.85/1.15, gamma 0.8/1.25) applied to the
decoded pixels, and DICOM encodings read back through the reader: 12-bit with a VOI window,
MONOCHROME1 over the full bit depth, and MONOCHROME1 inverted over the image's own pixel range.
Rows go to bench/results/cpu_exposure.jsonl.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np
import record

from pneumoscan import data, reader, runtime, shift

TOLERANCE = 0.05  # issue 19: the same X-ray's probability within 0.05 under every transform


def measure(model, originals: list[np.ndarray]) -> list[dict]:
    size = model.input_size
    threshold = model.threshold("detection")

    def scored(images: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        logits, distances = model.raw_scores(np.stack([reader.resize(i, size) for i in images]))
        return model.calibrate(logits), model.assess(distances)[0]

    base, base_domains = scored(originals)
    rows = []
    for name, transform in shift.INVARIANT.items():
        moved, domains = scored([transform(im) for im in originals])
        flips = int(((base >= threshold) != (moved >= threshold)).sum())
        change = np.abs(moved - base)
        rows.append(
            {
                "transform": name,
                "flips": flips,
                "max_change": round(float(change.max()), 4),
                "over_tolerance": int((change > TOLERANCE).sum()),
                "domain_changes": sum(a != b for a, b in zip(base_domains, domains, strict=True)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", default="ensemble,dense,cnn,transfer")
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()

    files = {}
    if "validation" in args.splits:
        files["validation"] = data.carve(data.list_split(args.data, "train"))[1].files
    if "test" in args.splits:
        files["test"] = data.list_split(args.data, "test").files
    out = []
    for split, listed in files.items():
        originals = [reader.read_image(f) for f in listed[:: args.every]]
        for name in args.models.split(","):
            model = runtime.load(name)
            for row in measure(model, originals):
                row = {
                    "date": date.today().isoformat(),
                    "model": name,
                    "split": split,
                    "images": len(originals),
                    **row,
                }
                print(row)
                out.append(row)
    record.append("cpu_exposure.jsonl", out)


if __name__ == "__main__":
    main()
