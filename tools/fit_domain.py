"""Fit the domain check's outer tier (domain.fit_outer) into model folders, weights untouched.

    python tools/fit_domain.py DATA_DIR [MODEL ...]     (default: every bundled model)

Models trained from now on get it from postfit; this adds it to folders made before it existed.
Only model.json changes: the `ood` section gains outer_threshold and how it was fitted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumoscan import domain, model_folder, runtime


def main() -> None:
    data_root = Path(sys.argv[1])
    names = sys.argv[2:] or ["ensemble", "dense", "cnn", "transfer"]
    for name in names:
        model = runtime.load(name)
        model.meta["ood"].update(domain.fit_outer(model, data_root))
        model_folder.write_meta(model.folder, model.meta)
        ood = model.meta["ood"]
        print(
            f"{name}: in_domain <= {ood['threshold']:.2f} < shifted <= {ood['outer_threshold']:.2f}"
        )


if __name__ == "__main__":
    main()
