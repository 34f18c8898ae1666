"""ONNX export: a model's `Scorer` (network and guard) as an ONNX graph, written with torch.

Weights that fp16 holds exactly (all of a bundled model's) are stored as fp16 and cast back
when the session starts: half the file, the same answers. In a model folder the graph holds no
copy of the weights: its tensors point into the folder's safetensors files (ONNX external data),
so each weight is stored once. runtime.py runs the graph without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

OPSET = 17


def export_onnx(
    scorer: nn.Module, input_size: int, path: Path, external: tuple[Path, ...] = ()
) -> Path:
    """Write `scorer` to `path` as ONNX with a dynamic batch dimension.

    Tensors whose bytes one of the safetensors files in `external` (beside `path`) holds are
    not copied: the graph points at them there.
    """
    import onnx
    import torch

    scorer = scorer.eval().to(memory_format=torch.contiguous_format)
    outputs = ["logit", "ood_score"] + (["cam"] if getattr(scorer, "with_map", False) else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracing chatter is not the user's business
        torch.onnx.export(
            scorer,
            (torch.zeros(2, 1, input_size, input_size),),
            str(tmp),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
            opset_version=OPSET,
            dynamo=False,
            # Folding BatchNorm into the convolutions would change weights that fp16 holds
            # exactly into ones it does not; ONNX Runtime folds them itself, in fp32, at start.
            do_constant_folding=False,
        )
    graph = onnx.load(str(tmp))
    store_exact_fp16(graph)
    _point_into(graph, external)
    onnx.save(graph, str(tmp))
    os.replace(tmp, path)
    return path


def store_exact_fp16(model: Any) -> None:
    """Store each fp32 initializer that fp16 represents exactly as fp16, cast back in the graph."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        values = numpy_helper.to_array(init)
        if values.dtype != np.float32 or values.size < 64:
            continue
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(half, f"{init.name}.fp16"))
        casts.append(
            helper.make_node("Cast", [f"{init.name}.fp16"], [init.name], to=TensorProto.FLOAT)
        )
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _point_into(model: Any, files: tuple[Path, ...]) -> None:
    """Replace each initializer whose bytes a safetensors file holds by a pointer into it."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    found = {}
    for path in files:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
            body = handle.read()
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            digest = hashlib.sha256(body[begin:end]).digest()
            found[(entry["dtype"], digest)] = (path.name, 8 + size + begin, end - begin)
    dtypes = {TensorProto.FLOAT16: "F16", TensorProto.FLOAT: "F32"}
    for init in model.graph.initializer:
        if init.data_type not in dtypes or not init.raw_data:
            continue
        key = (dtypes[init.data_type], hashlib.sha256(init.raw_data).digest())
        if key in found:
            location, offset, length = found[key]
            set_external_data(init, location, offset, length)
            init.data_location = TensorProto.EXTERNAL
            init.ClearField("raw_data")
