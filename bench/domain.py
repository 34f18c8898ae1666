"""The domain check's outcomes on every set we have, per model.

    python bench/domain.py --data DIR [--external DIR] [--models ensemble,dense,cnn,transfer]

Sets: validation (carved from train, as the model's own split), test, the external adult films
(none of them used to fit anything), and non-X-rays: images that packages ship (matplotlib's
sample data, scikit-learn's sample photos) and generated ones (noise, blank and constant frames,
gradients, a text page, a CT-like phantom, a screenshot-like layout). Prints the count per
outcome and appends rows to bench/results/cpu_domain.jsonl.
"""

from __future__ import annotations

import argparse
import collections
from datetime import date
from pathlib import Path

import matplotlib
import numpy as np
import record
from PIL import Image, ImageDraw

from pneumoscan import data, domain, reader, runtime
from pneumoscan.screening import expand_paths


def packaged_non_xrays() -> list[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_sample_image

    found = [
        (p.name, reader.read_image(p))
        for p in sorted(Path(matplotlib.get_data_path(), "sample_data").rglob("*"))
        if p.suffix.lower() in (".jpg", ".png")
    ]
    found += [
        (name, reader.to_grey_uint8(Image.fromarray(load_sample_image(name))))
        for name in ("china.jpg", "flower.jpg")
    ]
    from pydicom.data import get_testdata_file

    for name in ("MR_small.dcm", "CT_small.dcm"):  # an MRI and a CT slice that pydicom ships
        found.append((name, reader.read_image(get_testdata_file(name))))
    terrain = np.load(Path(matplotlib.get_data_path(), "sample_data", "jacksboro_fault_dem.npz"))
    elevation = terrain["elevation"].astype(np.float64)
    elevation = (elevation - elevation.min()) / np.ptp(elevation) * 255
    found.append(("terrain", elevation.astype(np.uint8)))  # a relief map, greyscale
    return found


def generated_non_xrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    made = {
        "noise": rng.integers(0, 256, (256, 256), dtype=np.uint8),
        "black": np.zeros((256, 256), np.uint8),
        "white": np.full((256, 256), 255, np.uint8),
        "grey": np.full((256, 256), 128, np.uint8),
        "gradient": np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1)),
    }
    page = Image.new("L", (600, 800), 255)
    draw = ImageDraw.Draw(page)
    for i in range(30):
        draw.text(
            (40, 20 + 25 * i), f"Discharge summary, line {i}: lorem ipsum dolor sit amet", fill=0
        )
    made["text-page"] = np.asarray(page)
    ct = Image.new("L", (512, 512), 0)
    draw = ImageDraw.Draw(ct)
    draw.ellipse((56, 96, 456, 416), fill=200)
    draw.ellipse((96, 136, 416, 376), fill=90)
    draw.ellipse((140, 180, 240, 330), fill=20)
    draw.ellipse((272, 180, 372, 330), fill=20)
    made["ct-phantom"] = np.asarray(ct)
    screen = Image.new("L", (800, 500), 235)
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 800, 40), fill=60)
    for i in range(8):
        draw.rectangle((20, 60 + 50 * i, 380, 95 + 50 * i), outline=120, fill=250)
        draw.text((30, 70 + 50 * i), f"Worklist item {i}", fill=20)
    made["screenshot"] = np.asarray(screen)
    return list(made.items())


def outcomes(model, images: list[np.ndarray]) -> collections.Counter:
    batch = np.stack([reader.resize(im, model.input_size) for im in images])
    _, distances = model.raw_scores(batch)
    return collections.Counter(model.assess(distances)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--external", type=Path, default=Path("../shared/data/external/figure1_covid_cxr/images")
    )
    parser.add_argument("--models", default="ensemble,dense,cnn,transfer")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="NAME=PATH: another labelled set (a folder or CSV data.read takes), e.g. "
        "nih_adult_test=experiments/nih_adult/test.csv; repeatable",
    )
    args = parser.parse_args()

    train = data.list_split(args.data, "train")
    _, val = data.carve(train)
    sets = {
        "validation": [reader.read_image(f) for f in val.files],
        "test": [reader.read_image(f) for f in data.list_split(args.data, "test").files],
        # COVID-00020 is a Kermany training image (the set's README): no external film.
        "external": [
            reader.read_image(f)
            for f in expand_paths([args.external])
            if not f.name.startswith("COVID-00020.")
        ],
        "non_xray_packaged": [im for _, im in packaged_non_xrays()],
        "non_xray_generated": [im for _, im in generated_non_xrays()],
    }
    for spec in args.set:
        name, _, path = spec.partition("=")
        sets[name] = [reader.read_image(f) for f in data.read(path).files]
    rows = []
    for name in args.models.split(","):
        model = runtime.load(name)
        for set_name, images in sets.items():
            counts = outcomes(model, images)
            row = {
                "date": date.today().isoformat(),
                "model": name,
                "set": set_name,
                "n": len(images),
            }
            row.update({d: counts.get(d, 0) for d in domain.DOMAINS})
            rows.append(row)
            print(row)
    record.append("cpu_domain.jsonl", rows)


if __name__ == "__main__":
    main()
