"""Refit what follows the weights of model folders in place: the guard, the domain check's
tiers, calibration and both operating points (postfit.fit_postprocessing). The weights stay.

    python tools/refit.py DATA_DIR [--reference NAME=DATA ...] [MODEL ...]
        (default: the study's bundled models)

`--reference` adds a population the models were not trained on to their guards (e.g. the
nih_adult development films for the models of children): an image most like it is never in
domain. Refitting drops a folder's int8 graph and external check (tools/add_int8.py and
tools/external_check.py make them again).

For folders fitted before a change to postfit; bundle_models.py does the same for new ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan import model_folder
from pneumoscan.postfit import fit_postprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("models", nargs="*", default=["ensemble", "dense", "cnn", "transfer"])
    parser.add_argument("--reference", action="append", default=None)
    args = parser.parse_args()
    for name in args.models:
        model = fit_postprocessing(model_folder.load(name), args.data, args.reference)
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
