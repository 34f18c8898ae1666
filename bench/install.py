"""The two installs, each into a fresh virtual environment: size on disk, install time, start-up.
    python bench/install.py [--extras ,train] [--image FILE] [--keep DIR]

For each extra (empty: the plain `pip install .`; `train`: `pip install '.[train]'`), a new
venv, then pip's wall time, the venv's size (du), and `pneumoscan predict IMAGE --json` as a new
process (the whole run: Python start, imports, model load, one image), median of 3. Then the
default model's probability in every venv, which must agree to 1e-6. pip's own cache is used
as it is, so the times are those of a machine that downloaded the packages before; the first
install on a new machine also downloads them. Appends to bench/results/cpu_install.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
import venv
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "pneumoscan" / "examples" / "person100_bacteria_475.jpeg"


def du(path: Path) -> int:
    return int(
        subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default=",train", help="comma-separated; empty = plain")
    parser.add_argument("--image", type=Path, default=EXAMPLE)
    parser.add_argument("--keep", type=Path, help="build the venvs here and keep them")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="pneumoscan-install-"))
    rows = []
    try:
        for extra in args.extras.split(","):
            target = base / (extra or "plain")
            shutil.rmtree(target, ignore_errors=True)
            venv.create(target, with_pip=True)
            empty = du(target)
            spec = f"{ROOT}[{extra}]" if extra else str(ROOT)
            start = time.perf_counter()
            subprocess.run(
                [target / "bin" / "python", "-m", "pip", "install", "--quiet", spec], check=True
            )
            seconds = time.perf_counter() - start
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                out = subprocess.run(
                    [target / "bin" / "pneumoscan", "predict", str(args.image), "--json"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(time.perf_counter() - start)
            has_torch = (
                subprocess.run(
                    [target / "bin" / "python", "-c", "import torch"], capture_output=True
                ).returncode
                == 0
            )
            rows.append(
                {
                    "install": f"pip install '.[{extra}]'" if extra else "pip install .",
                    "venv_mb": round(du(target) / 1e6, 1),
                    "empty_venv_mb": round(empty / 1e6, 1),
                    "install_s": round(seconds, 1),
                    "predict_one_image_s": round(sorted(runs)[1], 2),
                    "torch": has_torch,
                    "probability": json.loads(out.stdout)[0]["probability"],
                    "date": time.strftime("%Y-%m-%d"),
                }
            )
            print(json.dumps(rows[-1]))
            if not args.keep:
                shutil.rmtree(target)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    probabilities = [r["probability"] for r in rows]
    spread = max(probabilities) - min(probabilities)
    print(f"largest difference between the installs' probabilities: {spread:.2e}")
    record.append("cpu_install.jsonl", rows)


if __name__ == "__main__":
    main()
