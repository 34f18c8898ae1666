"""Exposure and windowing invariance: does the same X-ray keep its label and probability?

    python bench/exposure.py --data DIR [--data NAME=CSV ...] [--test-data CSV ...]
                             [--models ensemble,dense,cnn,transfer] [--splits validation,test]
                             [--every 4]

For every `--every`-th image of each split of each source (validation: carved from the
training data sets as the first model's own training carved them, for decisions; test: each
Kermany-layout folder's test/ and each --test-data set, for the record) and each transform, the detection-point label flips,
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

import numpy as np
import record

from pneumoscan import data, reader, runtime, shift
from pneumoscan.config import saved_config

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
    parser.add_argument("--data", action="append", required=True, help="repeatable")
    parser.add_argument("--test-data", action="append", default=[], help="repeatable")
    parser.add_argument("--models", default="ensemble,dense,cnn,transfer")
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()

    cfg = saved_config(runtime.load(args.models.split(",")[0]).meta)
    parts = {}
    if "validation" in args.splits:
        carved = data.carve(data.read_all(args.data, "train"), cfg.val_fraction, cfg.split_seed)
        for source in carved[1].source_names:
            parts[("validation", source)] = carved[1].subset(carved[1].of_source(source)).files
    if "test" in args.splits:
        tested = [s for s in args.data if not str(s).endswith(".csv")] + args.test_data
        listed = data.read_all(tested, "test")
        for source in listed.source_names:
            parts[("test", source)] = listed.subset(listed.of_source(source)).files
    out = []
    for (split, source), listed in parts.items():
        originals = [reader.read_image(f) for f in listed[:: args.every]]
        for name in args.models.split(","):
            model = runtime.load(name)
            for row in measure(model, originals):
                row = {
                    "date": date.today().isoformat(),
                    "model": name,
                    "split": split,
                    "source": source,
                    "images": len(originals),
                    **row,
                }
                print(row)
                out.append(row)
    record.append("cpu_exposure.jsonl", out)


if __name__ == "__main__":
    main()
