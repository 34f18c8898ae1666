"""The README's results plots: the bundled models scored on test, drawn by `report.write_benchmark`.

    python tools/plot_results.py DATA_DIR OUT_DIR   # then copy OUT_DIR/{roc,thresholds}.png to docs/

OUT_DIR gets the same results.md, plots and report.html as `pneumoscan benchmark` writes after
training; here the models are the bundled ones, not retrained.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumoscan import model_folder, report
from pneumoscan.evaluate import evaluate


def main(data_root: Path, out: Path) -> None:
    models = [model_folder.load(name) for name in ("dense", "cnn", "transfer", "ensemble")]
    written = report.write_benchmark([(m, evaluate(m, data_root, "test")) for m in models], out)
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
