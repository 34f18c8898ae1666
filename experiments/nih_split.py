"""docs/experiments.md section 40: the nih_adult films cut once, by patient, into a development
part (training and validation) and a test part scored once per finished recipe.

    python experiments/nih_split.py [--nih ../shared/data/external/nih_adult]

Writes experiments/nih_adult/dev.csv and test.csv (file,label,patient_id,view; files relative
to the CSV, so the source is named nih_adult). The PNEUMONIA films that RSNA's radiologists
read as normal (`rsna_2018` = Normal) are left out of both, as the data set's README asks for
validation and test figures: as training labels they are noise too. The test part is a quarter
of the patients, stratified by class and view (data.carve, seed 0).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from pneumoscan import data

OUT = Path(__file__).resolve().parent / "nih_adult"
ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "external" / "nih_adult"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT)
    args = parser.parse_args()
    with (args.nih / "labels.csv").open(newline="") as handle:
        rows = [
            r
            for r in csv.DictReader(handle)
            if not (r["label"] == "PNEUMONIA" and r["rsna_2018"] == "Normal")
        ]
    OUT.mkdir(exist_ok=True)
    every = OUT / "all.csv"
    _write(every, rows, args.nih)
    manifest = data.read(every)
    dev, test = data.carve(manifest, 0.25, seed=0)
    for name, part in (("dev", dev), ("test", test)):
        keep = {f.name for f in part.files}
        _write(OUT / f"{name}.csv", [r for r in rows if Path(r["file"]).name in keep], args.nih)
        print(name, part.counts())
    every.unlink()


def _write(path: Path, rows: list[dict], nih: Path) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["file", "label", "patient_id", "view"])
        for r in rows:
            image = os.path.relpath(nih / r["file"], path.parent)
            out.writerow([image, r["label"], r["patient_id"], r["view"]])


if __name__ == "__main__":
    main()
