"""Screening speed on this machine, with peers and the FLOP bound, all in one run.

    python bench/predict_speed.py --folder DIR [--models dense,cnn,transfer] [--repeats 3]

For each bundled model and each backend (torch eager, ONNX Runtime): images/s over the folder's
files and single-file latency (p50, p95). Everything from the file on disk to the result is
timed: read, decode, resize, model, guard, calibration. The peers, DenseNet-121 (CheXNet,
torchxrayvision) and ResNet-18 (the MedMNIST baseline) at 224 px from torchvision with random
weights (speed does not depend on them), run through the same reader, threads and batch size.

The bound: each network's FLOPs per image (torch's FLOP counter) times images/s is the compute
it sustains; the matrix-multiply rate measured here in the same run is what the cores can do.
Figures are medians over the repeats; ratios are between rows of this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import record
import torch
from torch import nn

from pneumoscan import model_folder, runtime, screening
from pneumoscan.export import export_onnx


class Peer(nn.Module):
    """A torchvision ImageNet network fed greyscale as three equal channels: (logits, zeros)."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision

        self.net = getattr(torchvision.models, name)(num_classes=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x.expand(-1, 3, -1, -1)).squeeze(1)
        return logits, torch.zeros_like(logits)


def peer_models(name: str, folder: Path) -> dict[str, model_folder.ModelCard]:
    """Both backends of a peer, behind the same ModelCard interface as a bundled model."""
    scorer = Peer(name).eval()
    meta = {
        "input_size": 224,
        "class_names": ["NORMAL", "PNEUMONIA"],
        "operating_points": {"detection": {"threshold": 0.5}},
    }
    torch_model = model_folder.LoadedModel(name, folder, meta, scorer.net, scorer)
    path = export_onnx(scorer, 224, folder / f"{name}.onnx")
    onnx_model = runtime.OnnxModel(name, folder, meta, runtime.session(path))
    return {"torch": torch_model, "onnx": onnx_model}


def flops_per_image(scorer: nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        scorer.eval()(torch.zeros(1, 1, size, size))
    return float(counter.get_total_flops())


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """The best fp32 matrix-multiply rate of torch's and ONNX Runtime's kernels on these cores."""
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABC"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", *[spec[:2]], [spec[2]]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        path.write_bytes(helper.make_model(graph).SerializeToString())
        ort = runtime.session(path)
    feeds = {"A": a.numpy(), "B": b.numpy()}
    rates = []
    for run in (lambda: torch.mm(a, b), lambda: ort.run(None, feeds)):
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rates.append(2 * n**3 / min(times) / 1e9)
    return max(rates)


def measure(model: model_folder.ModelCard, files: list[Path], args: argparse.Namespace) -> dict:
    list(screening.predict(model, files[: args.batch_size * 2], batch_size=args.batch_size))
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        n = sum(1 for _ in screening.predict(model, files, batch_size=args.batch_size))
        rates.append(n / (time.perf_counter() - start))
    latencies = []
    for f in files[: args.latency_files]:
        start = time.perf_counter()
        next(screening.predict(model, [f], batch_size=1, workers=1))
        latencies.append((time.perf_counter() - start) * 1000)
    return {
        "files": len(files),
        "images_per_s": round(statistics.median(rates), 1),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--models", default="dense,cnn,transfer")
    parser.add_argument("--peers", default="densenet121,resnet18")
    parser.add_argument("--peer-files", type=int, default=128, help="peers are slow: fewer files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-files", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    files = screening.expand_paths([args.folder])
    peak = matmul_peak_gflops()
    print(f"matrix multiply peak (fp32, 2048^2, torch or ONNX Runtime): {peak:.1f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        candidates = []
        for name in filter(None, args.models.split(",")):
            loaded = model_folder.load(name)
            flops = flops_per_image(loaded.scorer, loaded.input_size)
            backends = {"torch": loaded, "onnx": runtime.load(name)}
            candidates.append((name, 128, flops, backends, files))
        for name in filter(None, args.peers.split(",")):
            backends = peer_models(name, Path(tmp))
            flops = flops_per_image(backends["torch"].scorer, 224)
            candidates.append((name, 224, flops, backends, files[: args.peer_files]))
        for name, size, flops, backends, subset in candidates:
            for backend, model in backends.items():
                row = {"model": name, "input": size, "backend": backend}
                row.update(measure(model, subset, args))
                row["gflops_per_image"] = round(flops / 1e9, 3)
                row["sustained_gflops"] = round(flops * row["images_per_s"] / 1e9, 1)
                row["fraction_of_matmul_peak"] = round(flops * row["images_per_s"] / 1e9 / peak, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    reference = {r["backend"]: r["images_per_s"] for r in rows if r["model"] == "densenet121"}
    for row in rows:
        if row["backend"] in reference:
            row["x_densenet121"] = round(row["images_per_s"] / reference[row["backend"]], 1)
    context = {
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "matmul_peak_gflops": round(peak, 1),
    }
    record.append("cpu_predict_speed.jsonl", [{**context, **row} for row in rows])
    print(
        "\n| model | input | backend | images/s | p50 ms | p95 ms | GFLOP/image | x DenseNet-121 "
        "| % of matmul peak |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['input']} | {r['backend']} | {r['images_per_s']} "
            f"| {r['latency_ms_p50']} | {r['latency_ms_p95']} | {r['gflops_per_image']} "
            f"| {r.get('x_densenet121', '')} | {100 * r['fraction_of_matmul_peak']:.1f} |"
        )


if __name__ == "__main__":
    main()
