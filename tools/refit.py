"""Refit what follows the weights of model folders in place: the guard, the domain check's
tiers, calibration and both operating points (postfit.fit_postprocessing). The weights stay.

    python tools/refit.py DATA_DIR [MODEL ...]     (default: every bundled model)

For folders fitted before a change to postfit; bundle_models.py does the same for new ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumoscan import model_folder
from pneumoscan.postfit import fit_postprocessing


def main() -> None:
    data_root = Path(sys.argv[1])
    for name in sys.argv[2:] or ["ensemble", "dense", "cnn", "transfer"]:
        model = fit_postprocessing(model_folder.load(name), data_root)
        points = model.meta["operating_points"]
        print(
            f"{name}: validation AUC {model.meta['validation']['auc']:.4f}, "
            + ", ".join(
                f"{k} {v['threshold']:.3f} (sensitivity {v['sensitivity_ci'][0]:.3f}-"
                f"{v['sensitivity_ci'][1]:.3f})"
                for k, v in points.items()
            )
        )


if __name__ == "__main__":
    main()
