"""GPU inference throughput of a bundled model: from decoded tensors and from JPEG bytes in memory.

    python bench/gpu_infer.py --jpegs DIR [--model transfer] [--batch 1024] [--compile]

From tensors: uint8 (N, S, S) already on the GPU -> scorer (classifier + guard), bf16,
channels-last. From JPEG bytes: files read into memory beforehand, then batched GPU decoding
(torchvision.io.decode_jpeg on a list, device="cuda"), antialiased resize to S and the same
scorer. Each figure is the median of 5 timed rounds after warm-up, with CUDA synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode

from pneumoscan import model_folder


def timed(fn, rounds: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=Path, required=True)
    parser.add_argument("--model", default="transfer")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    model = model_folder.load(args.model)
    size = model.input_size
    scorer = model.scorer.cuda().eval().to(memory_format=torch.channels_last)
    if args.compile:
        scorer = torch.compile(scorer)
    files = sorted(p for p in args.jpegs.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    blobs = [torchvision.io.read_file(str(p)) for p in files]

    def run(images_uint8: torch.Tensor) -> None:
        x = (
            images_uint8.unsqueeze(1)
            .float()
            .div_(255)
            .contiguous(memory_format=torch.channels_last)
        )
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for start in range(0, len(x), args.batch):
                scorer(x[start : start + args.batch])

    n = 16384
    tensors = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, device="cuda")
    from_tensors = n / timed(lambda: run(tensors))

    reps = max(1, 8192 // len(blobs))
    batch_blobs = blobs * reps

    def decode_and_run() -> None:
        for start in range(0, len(batch_blobs), args.batch):
            decoded = torchvision.io.decode_jpeg(
                batch_blobs[start : start + args.batch], mode=ImageReadMode.GRAY, device="cuda"
            )
            resized = torch.cat(
                [
                    F.interpolate(
                        d[None].float(), size=(size, size), mode="bilinear", antialias=True
                    )
                    for d in decoded
                ]
            )
            run(resized[:, 0].clamp_(0, 255).to(torch.uint8))

    from_jpeg = len(batch_blobs) / timed(decode_and_run)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "model": model.name,
                "input": size,
                "batch": args.batch,
                "compiled": args.compile,
                "images_per_s_from_tensors": round(from_tensors),
                "images_per_s_from_jpeg_bytes": round(from_jpeg),
                "jpeg_files": len(files),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
