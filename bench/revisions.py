"""Screening speed of this working tree against an earlier revision, in one run, interleaved.

    python bench/revisions.py --rev e736d2a~1 --folder ../shared/data/chest_xray/test \
        [--models ensemble,transfer] [--rounds 5]

The revision is checked out into a temporary git worktree (its own code and its own bundled
models); each round times every (revision, model) pair once, in turn, each in a fresh process
importing that tree's `pneumoscan`: `predict.predict` over the folder's files with ONNX
Runtime, file to result, as `pneumoscan predict` runs it. Medians over the rounds, and the
ratio of this tree to the revision for each model. The machine is shared: quote the ratios.
Appends to bench/results/cpu_revisions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parent.parent

# Run in the child: the same few calls in every revision since the ONNX Runtime path exists.
CHILD = """
import json, sys, time
import pneumoscan
from pneumoscan import runtime
try:  # the module was pneumoscan.predict before the Python API took that name
    from pneumoscan import screening as predict
except ImportError:
    from pneumoscan import predict
files = predict.expand_paths([sys.argv[2]])
model = runtime.load(sys.argv[1])
list(predict.predict(model, files[:64]))
start = time.perf_counter()
n = sum(1 for _ in predict.predict(model, files))
print(json.dumps({"images_per_s": n / (time.perf_counter() - start), "from": pneumoscan.__file__}))
"""


def rate(tree: Path, model: str, folder: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(answer["from"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the child imported {answer['from']}, not the tree at {tree}")
    return answer["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="A git revision of this repository.")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--models", default="ensemble,transfer")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), commit],
            check=True,
        )
        try:
            trees = {"this tree": ROOT, commit: old}
            rates: dict[tuple[str, str], list[float]] = {(t, m): [] for t in trees for m in models}
            for _ in range(args.rounds):
                for model in models:
                    for name, tree in trees.items():
                        rates[name, model].append(rate(tree, model, args.folder.resolve()))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
    rows = []
    print(f"\n| model | {commit} images/s | this tree images/s | this tree / {commit} |")
    print("|---|---:|---:|---:|")
    for model in models:
        before = statistics.median(rates[commit, model])
        after = statistics.median(rates["this tree", model])
        print(f"| {model} | {before:.0f} | {after:.0f} | {after / before:.2f}x |")
        rows.append(
            {
                "date": date.today().isoformat(),
                "cpus": os.cpu_count(),
                "revision": commit,
                "model": model,
                "revision_images_per_s": round(before, 1),
                "this_tree_images_per_s": round(after, 1),
                "rounds": args.rounds,
            }
        )
    record.append("cpu_revisions.jsonl", rows)


if __name__ == "__main__":
    main()
