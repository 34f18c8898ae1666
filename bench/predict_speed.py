"""Screening speed on this machine: images/s over a folder of files, and single-file latency.

    python bench/predict_speed.py --folder DIR [--model transfer] [--repeats 3] [--latency-files 50]

Both backends (torch eager, ONNX Runtime) run in the same process on the same files, so their
ratio is meaningful on a shared, noisy machine; each figure is the median over the repeats.
Everything from the file on disk to the result is timed: read, decode, resize, model, guard.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscan import bundle, predict, runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--model", default="transfer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-files", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    files = predict.expand_paths([args.folder])
    model = bundle.load(args.model)
    backends = {"torch": model.raw_scores, "onnx": runtime.runner_for(model).raw_scores}
    rows = []
    for name, scores in backends.items():
        list(predict.predict(model, files[:64], raw_scores=scores))  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            n = sum(
                1
                for _ in predict.predict(
                    model, files, batch_size=args.batch_size, raw_scores=scores
                )
            )
            rates.append(n / (time.perf_counter() - start))
        latencies = []
        for f in files[: args.latency_files]:
            start = time.perf_counter()
            next(predict.predict(model, [f], batch_size=1, workers=1, raw_scores=scores))
            latencies.append((time.perf_counter() - start) * 1000)
        rows.append(
            {
                "model": model.name,
                "backend": name,
                "files": len(files),
                "images_per_s": round(statistics.median(rates), 1),
                "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1),
                "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1),
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"onnx / torch throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
