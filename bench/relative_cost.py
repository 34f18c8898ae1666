"""Model cost relative to a reference, on preloaded images: the models alone, interleaved.

    python bench/relative_cost.py --data DIR --models transfer,ensemble [--rounds 7]

`bench/predict_speed.py` times whole files (decoding included) one model after another, so a
busy neighbour on a shared CPU can land on one model's turn. Here each round times every model
once, in turn, on the same decoded test images (ONNX Runtime, the default backend): batches of
32 for throughput, single images for latency. Medians over rounds, and each model's ratio to
the first named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import record

from pneumoscan import data, runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", default="transfer,ensemble")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-images", type=int, default=64)
    args = parser.parse_args()

    names = args.models.split(",")
    models = {name: runtime.load(name) for name in names}
    images, _ = data.load_images(data.list_split(args.data, "test"), 128)
    images = np.asarray(images)
    for model in models.values():
        model.raw_scores(images[:64], 32)  # warm-up
    per_image = {name: [] for name in names}
    latency = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.raw_scores(images, 32)
            per_image[name].append((time.perf_counter() - start) / len(images) * 1000)
            times = []
            for image in images[: args.latency_images]:
                start = time.perf_counter()
                model.raw_scores(image[None], 1)
                times.append((time.perf_counter() - start) * 1000)
            latency[name].append(statistics.median(times))
    reference = names[0]
    rows = []
    for name in names:
        ms = statistics.median(per_image[name])
        p50 = statistics.median(latency[name])
        rows.append(
            {
                "model": name,
                "backend": "onnx",
                "rounds": args.rounds,
                "ms_per_image_batch32": round(ms, 3),
                "latency_ms_batch1": round(p50, 3),
                f"x_{reference}_batch32": round(ms / statistics.median(per_image[reference]), 2),
                f"x_{reference}_batch1": round(p50 / statistics.median(latency[reference]), 2),
                "round_ratios_batch32": [
                    round(a / b, 2)
                    for a, b in zip(per_image[name], per_image[reference], strict=True)
                ],
                "cpus": os.cpu_count(),
                "date": date.today().isoformat(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    record.append("cpu_relative_cost.jsonl", rows)


if __name__ == "__main__":
    main()
