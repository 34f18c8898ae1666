"""int8 against fp32, same run: does the quantized graph keep the answers, and is it faster?

On validation (carved from train, as training does) the bar for int8 to become the default:
probabilities within 0.02 of fp32's, no label flip at either operating point, and the guard's
outcome unchanged for every image. Then test AUC and both points for both precisions, and
images/s of the graph alone (batch 32, 2 threads). Writes bench/results/int8.json.

    python bench/int8.py --data ../shared/data/chest_xray [--model transfer --model ensemble]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pneumoscan import data, metrics, preprocess, runtime

RESULTS = Path(__file__).parent / "results" / "int8.json"


def scores(model: runtime.OnnxModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, distances = model.raw_scores(np.asarray(images), batch_size=32)
    return model.calibrate(logits), distances


def speed(model: runtime.OnnxModel, images: np.ndarray, rounds: int = 5) -> float:
    batch = preprocess.unit_range(np.asarray(images[:32]))
    model.run(batch)
    begin = time.perf_counter()
    for _ in range(rounds):
        model.run(batch)
    return rounds * len(batch) / (time.perf_counter() - begin)


def compare(name: str, root: Path) -> dict:
    fp32 = runtime.load(name, threads=2, precision="fp32")
    int8 = runtime.load(name, threads=2, precision="int8")
    _, val = data.carve(data.list_split(root, "train"))
    val_images, val = data.load_images(val, fp32.input_size)
    test_images, test = data.load_images(data.list_split(root, "test"), fp32.input_size)
    (p32, d32), (p8, d8) = scores(fp32, val_images), scores(int8, val_images)
    flips = {
        mode: int(np.sum((p32 >= fp32.threshold(mode)) != (p8 >= fp32.threshold(mode))))
        for mode in fp32.meta["operating_points"]
    }
    # The guard's outcome: its tier for each image (in_domain, shifted, not_chest_xray).
    guard_changes = sum(
        a != b for a, b in zip(fp32.assess(d32)[0], fp32.assess(d8)[0], strict=True)
    )
    max_diff = float(np.max(np.abs(p32 - p8)))
    out = {
        "model": name,
        "validation_images": len(val),
        "max_probability_difference": max_diff,
        "label_flips": flips,
        "guard_changes": guard_changes,
        "int8_meets_the_bar": max_diff <= 0.02 and not any(flips.values()) and not guard_changes,
        "test": {},
    }
    for precision, model in (("fp32", fp32), ("int8", int8)):
        probs, _ = scores(model, test_images)
        points = {
            mode: metrics.point_metrics(test.labels, probs, fp32.threshold(mode)).__dict__
            for mode in fp32.meta["operating_points"]
        }
        out["test"][precision] = {
            "auc": metrics.auc(test.labels, probs),
            "points": points,
            "graph_images_per_s": speed(model, test_images),
        }
    out["speed_ratio_int8_over_fp32"] = (
        out["test"]["int8"]["graph_images_per_s"] / out["test"]["fp32"]["graph_images_per_s"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", action="append", default=None)
    args = parser.parse_args()
    results = [compare(m, args.data) for m in args.model or ["transfer", "cnn"]]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    measured = {r["model"] for r in results}  # the other models' rows stay as they were
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    kept = [r for r in earlier if r["model"] not in measured]
    RESULTS.write_text(json.dumps(kept + results, indent=2) + "\n")
    for r in results:
        t = r["test"]
        print(
            f"{r['model']}: validation max |dp| {r['max_probability_difference']:.4f}, flips "
            f"{r['label_flips']}, guard changes {r['guard_changes']}, bar met: "
            f"{r['int8_meets_the_bar']}; test AUC fp32 {t['fp32']['auc']:.4f} int8 "
            f"{t['int8']['auc']:.4f}; graph speed int8/fp32 {r['speed_ratio_int8_over_fp32']:.2f}"
        )


if __name__ == "__main__":
    main()
