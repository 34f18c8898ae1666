"""Fit (or refit) the not-a-chest-X-ray guard of existing model folders without retraining them.

    python tools/fit_guard.py DATA_DIR MODEL [MODEL ...]    # bundled names or folders

`pneumoscan train` fits the guard itself; this is for folders trained before it existed.
The network's weights are rewritten unchanged (same bytes, same SHA-256).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumoscan import bundle, train


def main(data_root: Path, models: list[str]) -> None:
    for name in models:
        model = train.fit_guard(bundle.load(name), data_root)
        ood = model.meta["ood"]
        print(
            f"{model.folder}: guard threshold {ood['threshold']:.2f}, "
            f"validation pass rate {ood['validation_pass_rate']:.3f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
