"""The int8 fast path: an ONNX Runtime static quantization of a model folder's graph.

QDQ format, per-channel int8 weights in a 7-bit range (so that CPUs without VNNI do not
saturate), activations calibrated on training images (the part of `train/` that trains, never
validation or test). Only the classifier's convolutions are quantized. The guard stays in fp32
(its thresholds are quantiles of fp32 distances): its distance, and its own feature extractor
where the model has one (`Scorer.guard_trunk`: every model whose trunk is not the guard's), so
that its outcomes are those of the fp32 graph. The graph is written beside the fp32 one as
`model.int8.onnx` and checksummed in model.json like every other file;
`runtime.load(..., precision="int8")` runs it. Whether int8 may be the default is
bench/int8.py's question (docs/experiments.md, sections 29, 31 and 39: not yet).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pneumoscan import data, model_folder, preprocess, screening
from pneumoscan.errors import PneumoscanError
from pneumoscan.export import store_exact_fp16

INT8_FILE, INT8_KEY = model_folder.INT8_FILE, model_folder.INT8_KEY
CALIBRATION_IMAGES = 128
GUARD_SCOPE = "/guard_trunk/"  # the ONNX names of the guard's own stages (Scorer.guard_trunk)


def calibration_images(
    data_root: data.DataSets, size: int, count: int = CALIBRATION_IMAGES
) -> np.ndarray:
    """`count` training images (validation carved out first), spread evenly over the classes."""
    training, _ = data.carve(data.read_all(data_root, "train"))
    rng = np.random.default_rng(0)
    picked = []
    for label in np.unique(training.labels):
        index = np.flatnonzero(training.labels == label)
        picked.extend(rng.choice(index, count // 2, replace=False))
    images = [screening.decode(training.files[i], size).image for i in sorted(picked)]
    return np.stack([i for i in images if i is not None])


def _fp32_graph(card: model_folder.ModelCard, target: Path) -> None:
    """The folder's graph as one plain fp32 file: weights inlined, the fp16 casts folded away."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(card.file("onnx")), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(graph, str(card.folder))
    casts = {}
    for node in graph.graph.node:
        if node.op_type == "Cast" and node.input[0].endswith(".fp16"):
            casts[node.input[0]] = node
    for init in list(graph.graph.initializer):
        if init.name in casts:
            values = numpy_helper.to_array(init).astype(np.float32)
            graph.graph.initializer.remove(init)
            graph.graph.initializer.append(
                numpy_helper.from_array(values, casts[init.name].output[0])
            )
            graph.graph.node.remove(casts[init.name])
    onnx.save(graph, str(target))


def add_int8(folder: Path, data_root: data.DataSets) -> Path:
    """Quantize the graph of the model folder `folder` and record it in its model.json."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    card = model_folder.read_card(folder)
    if "onnx" not in card.meta:
        raise PneumoscanError(f"{folder}: has no model.onnx to quantize; export it first")
    images = preprocess.unit_range(calibration_images(data_root, card.input_size))

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, len(images) // 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory() as tmp:
        plain, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        _fp32_graph(card, plain)
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        guard_nodes = [
            node.name
            for node in onnx.load(str(prepared), load_external_data=False).graph.node
            if node.name.startswith(GUARD_SCOPE)
        ]
        out = Path(tmp) / INT8_FILE
        quantize_static(
            str(prepared),
            str(out),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=guard_nodes,
            calibrate_method=CalibrationMethod.Percentile,
            # 7-bit weights: x86 CPUs without VNNI (AVX2, most laptops) multiply uint8 by int8
            # with VPMADDUBSW, whose 16-bit sums saturate at full 8-bit range; on such a CPU the
            # bundled cnn's int8 probabilities moved by up to 0.8 (ONNX Runtime's quantization
            # docs recommend reduce_range there; section 39).
            reduce_range=True,
        )
        quantized = onnx.load(str(out))
        store_exact_fp16(quantized)  # what stays fp32 came from fp16 weights: half the bytes
        onnx.save(quantized, str(card.folder / INT8_FILE))
    entry = {
        "file": INT8_FILE,
        "sha256": model_folder._sha256(card.folder / INT8_FILE),
        "calibration": f"{len(images)} training images (validation carved out), "
        "per-channel QDQ, 7-bit weights",
    }
    model_folder.write_meta(card.folder, {**card.meta, INT8_KEY: entry})  # card.meta: model.json
    return card.folder / INT8_FILE
