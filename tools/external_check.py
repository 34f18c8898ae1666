"""Record in model folders what each did on chest X-rays from other hospitals (model.json's
`external_check`, which `/api/v1/model` and the page show).

    python tools/external_check.py --films ../shared/data/external/figure1_covid_cxr \
        src/pneumoscan/bundled/ensemble src/pneumoscan/bundled/cnn ...

`--films` is a folder of images (`images/` under it if there is one) with, optionally, the
published `metadata.csv` (`patientid` = file stem, `finding`). Each model scores every film
at its detection point, as `pneumoscan predict` does; the record holds how many were recognised
as chest X-rays, how many `shifted`, how the labels fell, and the labels of the films whose
metadata says "No finding". Nothing is fitted on the films. Saving a folder anew (train, refit,
calibrate) drops the record, since it was of the folder replaced.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
from pathlib import Path

from pneumoscan import domain, model_folder, runtime, screening


def no_finding(metadata: Path) -> set[str]:
    """Stems of the films whose published metadata says "No finding"."""
    if not metadata.is_file():
        return set()
    with metadata.open(newline="", encoding="utf-8") as handle:
        return {
            row["patientid"]
            for row in csv.DictReader(handle)
            if row.get("finding", "").strip().lower() == "no finding"
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Model folders (with model.json).")
    parser.add_argument("--films", type=Path, required=True)
    parser.add_argument(
        "--describe",
        default="frontal chest X-rays of adults from other hospitals (Figure 1 COVID-19 "
        "Chest X-ray Dataset)",
        help="What the films are, for the record.",
    )
    parser.add_argument(
        "--exclude",
        default="COVID-00020",
        help="Comma-separated file stems to leave out (default: COVID-00020, a Kermany "
        "training image, as the films' README says).",
    )
    args = parser.parse_args()
    images = args.films / "images" if (args.films / "images").is_dir() else args.films
    left_out = set(args.exclude.split(","))
    files = [f for f in screening.expand_paths([images]) if f.stem not in left_out]
    clean = no_finding(args.films / "metadata.csv")
    for folder in args.folders:
        model = runtime.load(folder)
        results = list(screening.predict(model, files, mode="detection"))
        record = {
            "films": args.describe,
            **domain.external_summary(results, clean),
            "point": "detection",
            "threshold": model.threshold("detection"),
            "date": datetime.date.today().isoformat(),
            "command": f"python tools/external_check.py --films {args.films} FOLDER",
        }
        model_folder.write_meta(model.folder, {**model.meta, model_folder.EXTERNAL_KEY: record})
        print(f"{folder}: {json.dumps({k: record[k] for k in ('recognised', 'domain', 'labels')})}")


if __name__ == "__main__":
    main()
