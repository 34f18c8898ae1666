"""Write the ONNX graph of model folders again from their weights, which stay as they are: after
a change to what the graph gives (its class activation maps, for heatmaps without torch). An
int8 graph is quantized again from the new one (calibrated on DATA_DIR's training images), and
model.json's checksums follow; the calibration, thresholds and every other entry are kept.

    python tools/reexport.py DATA_DIR [MODEL ...]     (default: every bundled model)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumoscan import model_folder, quantize
from pneumoscan.export import export_onnx


def reexport(model: str, data_root: Path) -> None:
    loaded = model_folder.load(model)
    meta, folder = loaded.meta, loaded.folder
    external = tuple(folder / meta[key]["file"] for key in meta["onnx"]["external"])
    export_onnx(loaded.scorer, loaded.input_size, folder / model_folder.ONNX_FILE, external)
    meta["onnx"]["sha256"] = model_folder._sha256(folder / model_folder.ONNX_FILE)
    model_folder.write_meta(folder, meta)
    if model_folder.INT8_KEY in meta:
        quantize.add_int8(folder, data_root)
    print(f"{model}: graph written again ({'maps' if loaded.has_maps else 'no maps'})")


if __name__ == "__main__":
    for name in sys.argv[2:] or ["ensemble", "dense", "cnn", "transfer"]:
        reexport(name, Path(sys.argv[1]))
