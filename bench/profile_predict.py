"""Where screening's time goes, stage by stage, and how near the pipeline comes to its bound.

    python bench/profile_predict.py --folder ../shared/data/chest_xray/test [--model ensemble]

1. Each stage alone, one after another, over the folder's files: read (the file's bytes),
   decode (reader.read_image), resize, batch (stacking), the graph (scaling to [0, 1] and ONNX
   Runtime, batch 32, its default threads), calibration and results (the rest of
   `score_decoded`), output (the CSV rows). Milliseconds per image.
2. Inside the graph: ONNX Runtime's own profiler, node times summed by the part of the network
   they belong to (each member of the classifier, the guard's own stages, the guard's distance).
3. The pipeline, file to result (`screening.predict`, as `pneumoscan predict` runs it), against
   the graph alone on the same batches: the graph runs on every core, so the pipeline can at
   best hide the other stages behind it. Variants in the same run: decode workers (1, 2, 4)
   and ONNX Runtime's spin-waiting threads on and off.

Appends to bench/results/cpu_profile_predict.jsonl; prints the tables docs/performance.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import record

from pneumoscan import model_folder, preprocess, reader, report, runtime, screening


@dataclass
class Clock:
    """Seconds spent in named stages. (Wall time: ONNX Runtime's threads spin-wait after each
    run, so the process's CPU time would charge the stages after the graph with it.)"""

    wall: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def time(self, stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.wall[stage] += time.perf_counter() - start
        return out


class Answered:
    """The model with its graph's answer for the batch already known: what `score_decoded`
    does besides running the graph."""

    def __init__(self, model: runtime.OnnxModel, scores: tuple[np.ndarray, np.ndarray]):
        self.model, self.scores = model, scores

    def raw_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scores

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def stages(model: runtime.OnnxModel, files: list[Path], batch_size: int) -> Clock:
    """Every stage of `screening.predict`, run alone and in order, over `files`."""
    clock = Clock()
    mode = "detection"
    threshold = model.threshold(mode)
    results = []

    def rest(answered: Answered, decoded: list[screening.Decoded]) -> list[screening.Prediction]:
        return list(screening.score_decoded(answered, decoded, mode, threshold))

    for start in range(0, len(files), batch_size):
        decoded = []
        for path in files[start : start + batch_size]:
            content = clock.time("read", path.read_bytes)
            original = clock.time("decode", reader.read_image, content, str(path))
            image = clock.time("resize", reader.resize, original, model.input_size)
            decoded.append(screening.Decoded(str(path), path.stem, image))
        images = clock.time("batch", np.stack, [d.image for d in decoded])
        scores = clock.time("graph", model.raw_scores, images)
        answered = Answered(model, scores)
        results.extend(clock.time("calibration and results", rest, answered, decoded))
    with tempfile.TemporaryDirectory() as tmp:
        clock.time("output", report.write_predictions_csv, results, Path(tmp) / "out.csv")
    return clock


def graph_parts(model_path: Path, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Share of the graph's node time per part of the network (ONNX Runtime's profiler)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(rounds):
            session.run(None, {"image": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    parts: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        parts[part_of(event["name"])] += event["dur"]
    total = sum(parts.values())
    return {name: round(us / total, 3) for name, us in sorted(parts.items(), key=lambda p: -p[1])}


def part_of(node: str) -> str:
    """The part of the network an ONNX node name belongs to, e.g. "/network/members.1/..."."""
    path = node.lstrip("/").split("/")
    if path[0] == "network" and len(path) > 2 and path[1].startswith("members."):
        return f"classifier member {path[1].split('.')[1]}"
    return {
        "network": "classifier",
        "guard_trunk": "guard's own stages",
        "guard": "guard distance",
    }.get(path[0], "other")


def pipeline_rate(
    model: model_folder.ModelCard, files: list[Path], batch_size: int, workers: int, repeats: int
) -> float:
    list(screening.predict(model, files[: batch_size * 2], batch_size=batch_size, workers=workers))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in screening.predict(model, files, batch_size=batch_size, workers=workers))
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def with_spinning(model: runtime.OnnxModel, path: Path, spinning: bool) -> runtime.OnnxModel:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return runtime.OnnxModel(model.name, model.folder, model.meta, session)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-rounds", type=int, default=10)
    args = parser.parse_args()

    files = screening.expand_paths([args.folder])
    model = runtime.load(args.model)
    stages(model, files[: args.batch_size * 2], args.batch_size)  # warm the caches
    clock = stages(model, files, args.batch_size)
    n = len(files)
    total = sum(clock.wall.values())
    rows = []
    print(f"{args.model}, {n} files, {os.cpu_count()} cores\n")
    print("| stage, alone | ms / image | share |\n|---|---:|---:|")
    for stage, seconds in clock.wall.items():
        print(f"| {stage} | {1000 * seconds / n:.2f} | {100 * seconds / total:.0f}% |")
        rows.append({"kind": "stage", "stage": stage, "ms_per_image": round(1000 * seconds / n, 3)})

    path = model.folder / model.meta["onnx"]["file"]
    x = preprocess.unit_range(
        np.stack([screening.decode(f, model.input_size).image for f in files[: args.batch_size]])
    )
    parts = graph_parts(path, x, args.profile_rounds)
    print("\n| part of the graph | share of node time |\n|---|---:|")
    for name, share in parts.items():
        print(f"| {name} | {100 * share:.0f}% |")
    rows.append({"kind": "graph_parts", **parts})

    graph_alone = n / clock.wall["graph"]
    serial = n / total
    print(f"\nthe graph alone: {graph_alone:.0f} images/s; every stage in turn: {serial:.0f}\n")
    print("| pipeline, file to result | images/s | of the graph alone |\n|---|---:|---:|")
    for spinning in (True, False):
        variant = with_spinning(model, path, spinning)
        for workers in (1, 2, 4):
            rate = pipeline_rate(variant, files, args.batch_size, workers, args.repeats)
            label = f"{workers} decode worker{'s' * (workers > 1)}, spin-wait {'on' if spinning else 'off'}"
            print(f"| {label} | {rate:.0f} | {rate / graph_alone:.2f} |")
            rows.append(
                {
                    "kind": "pipeline",
                    "workers": workers,
                    "spinning": spinning,
                    "rate": round(rate, 1),
                }
            )
    context = {
        "date": date.today().isoformat(),
        "model": args.model,
        "files": n,
        "cpus": os.cpu_count(),
        "graph_alone_images_per_s": round(graph_alone, 1),
        "serial_images_per_s": round(serial, 1),
    }
    record.append("cpu_profile_predict.jsonl", [{**context, **row} for row in rows])


if __name__ == "__main__":
    main()
