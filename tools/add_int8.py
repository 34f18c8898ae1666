"""Give model folders an int8 graph beside the fp32 one (quantize.py), checksummed in model.json.

    python tools/add_int8.py --data ../shared/data/chest_xray src/pneumoscan/bundled/cnn ...

Calibrates on 128 training images (validation carved out first); `--precision int8` then runs
the quantized graph. Whether it may be the default is bench/int8.py's question.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Model folders (with model.json).")
    parser.add_argument("--data", type=Path, required=True, help="The data root (train/).")
    args = parser.parse_args()
    for folder in args.folders:
        path = quantize.add_int8(folder, args.data)
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
