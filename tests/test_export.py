"""ONNX export: the graph holds the weights that ship, once, and takes any batch size."""

from pathlib import Path

import numpy as np
from helpers import run_cli

from pneumoscan import model_folder, runtime


def test_bundled_onnx_stores_fp16_weights_exactly() -> None:
    import onnx
    from onnx import TensorProto

    folder = model_folder.bundled_dir() / "transfer"
    graph = onnx.load(str(folder / "model.onnx")).graph
    halves = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(halves) > 100  # the network's weights, cast back to fp32 when the session starts
    # The graph holds no second copy of them: it points into weights.safetensors.
    pointers = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer
    assert {e.value for i in pointers for e in i.external_data if e.key == "location"} == {
        "weights.safetensors",
        "guard.safetensors",
    }
    # What the graph holds inline is the guard's own ImageNet stages (the equalised transfer
    # trunk is not its extractor since docs/experiments.md section 29) and small constants.
    inline = [i for i in pointers if not i.external_data]
    guard_stages = sum(len(i.raw_data) for i in inline if i.name.startswith("guard_trunk."))
    others = sum(len(i.raw_data) for i in inline if not i.name.startswith("guard_trunk."))
    weights = (folder / "weights.safetensors").stat().st_size
    assert others < 0.01 * weights and guard_stages < 0.5 * weights


def test_export_command_writes_a_dynamic_batch_model(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "model.onnx"
    args = ("export", "--model", str(tiny_models["dense"]), "--onnx", str(target))
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert "wrote" in stdout and "'image' (N, 1, 128, 128)" in stdout
    graph = runtime.session(target)
    for n in (1, 5):
        logits, distances = graph.run(None, {"image": np.zeros((n, 1, 128, 128), np.float32)})
        assert logits.shape == (n,) and distances.shape == (n,)
    code, _, stderr = run_cli(*args)
    assert code == 1 and "--force" in stderr
