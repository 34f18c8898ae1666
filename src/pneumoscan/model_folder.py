"""Any trained model as a self-describing folder (the bundled ones too): weights, guard, an ONNX
graph and `model.json`.

Whoever loads the folder needs nothing else to preprocess, calibrate, threshold and label.
Loading reads tensors and JSON only: nothing is ever unpickled. This module imports torch only
when a network is built or saved: a `ModelCard` (model.json) and the ONNX graph (runtime.py)
are all that screening on a CPU needs, which keeps `pneumoscan predict` quick to start.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumoscan import metrics, preprocess
from pneumoscan.errors import PneumoscanError

if TYPE_CHECKING:
    import torch

    from pneumoscan.guard import Guard
    from pneumoscan.models import Classifier, Scorer

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
GUARD_FILE = "guard.safetensors"
ONNX_FILE = "model.onnx"
INT8_FILE, INT8_KEY = "model.int8.onnx", "onnx_int8"  # quantize.add_int8 writes it
EXTERNAL_KEY = "external_check"  # tools/external_check.py writes it (domain.external_summary)
META_FILE = "model.json"
# Heatmaps need a spatial layer before the global pooling: every architecture but `dense`.
SPATIAL_ARCHITECTURES = ("cnn", "transfer")


@dataclass
class ModelCard:
    """What model.json says about a model: enough to preprocess, calibrate and threshold."""

    name: str
    folder: Path
    meta: dict

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def description(self) -> str:
        """What the network is: `cnn`, `cnn x3` (three heads on one trunk), `cnn x3 + transfer`;
        for experts per population, each population's, e.g. `chest_xray: cnn + transfer x2;
        nih_adult: transfer`."""

        def named(part: tuple[str, dict]) -> str:
            architecture, args = part
            members = args.get("members", 1)
            return f"{architecture} x{members}" if members > 1 else architecture

        every = parts(self.meta)
        args = self.meta.get("model_args", {})
        if not args.get("populations"):
            return " + ".join(named(p) for p in every)
        return "; ".join(
            f"{population}: " + " + ".join(named(p) for p, w in zip(every, row, strict=True) if w)
            for population, row in zip(args["populations"], args["weights"], strict=True)
        )

    @property
    def gated(self) -> bool:
        """Whether the model is one expert per population behind a gate (join --population)."""
        return bool(self.meta.get("model_args", {}).get("populations"))

    @property
    def members(self) -> int:
        """How many trained networks the model averages (1: a single model)."""
        return sum(int(args.get("members", 1)) for _, args in parts(self.meta))

    @property
    def populations(self) -> list[str]:
        """The sources the model was trained and validated on (a model saved before sources
        were recorded was trained on the Kermany data set: `chest_xray`)."""
        sources = self.meta.get("data", {}).get("sources")
        return list(sources) if sources else ["chest_xray"]

    def assess(self, distances: np.ndarray) -> tuple[list[str], list[str | None], np.ndarray]:
        """Per image: its domain tier, the population it is most like, its score
        (domain.assess)."""
        from pneumoscan import domain

        return domain.assess(distances, self.meta.get("ood"))

    def warning(self, tier: str, nearest: str | None = None) -> str | None:
        from pneumoscan import domain

        return domain.warning(tier, self.populations, nearest)

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA from raw logits (Platt scaling fit on validation)."""
        calibration = self.meta.get("calibration", {})
        return metrics.sigmoid(
            calibration.get("scale", 1.0) * logits + calibration.get("bias", 0.0)
        )

    def threshold(self, mode: str) -> float:
        points = self.meta["operating_points"]
        if mode not in points:
            raise PneumoscanError(f"--mode {mode!r}: choose one of {', '.join(points)}")
        return float(points[mode]["threshold"])

    def point_note(self, mode: str) -> str:
        """The operating point, and the sensitivity interval it was fitted with if known."""
        ci = self.meta["operating_points"].get(mode, {}).get("sensitivity_ci")
        interval = f", expected sensitivity {ci[0]:.2f}-{ci[1]:.2f}" if ci else ""
        return f"{mode} point{interval}"

    def file(self, key: str) -> Path:
        """The file model.json names under `key`, after checking its SHA-256."""
        entry = self.meta[key]
        path = self.folder / entry["file"]
        if not path.is_file():
            raise PneumoscanError(f"{path}: file is missing; the model folder is incomplete")
        if _sha256(path) != entry["sha256"]:
            raise PneumoscanError(
                f"{path}: checksum does not match model.json; the file is damaged or was changed"
            )
        return path

    def probabilities(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA of uint8 images shaped (N, S, S)."""
        return self.calibrate(self.raw_scores(images, batch_size)[0])

    def raw_scores(
        self, images: np.ndarray, batch_size: int = 64, maps: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Logits and guard distances of uint8 images shaped (N, S, S), in batches; with `maps`,
        also each image's class activation map (N, S, S), signed, in logit units."""
        outputs: list[list[np.ndarray]] = [[], [], []] if maps else [[], []]
        for start in range(0, len(images), batch_size):
            batch = self.run(preprocess.unit_range(images[start : start + batch_size]), maps)
            for collected, part in zip(outputs, batch, strict=True):
                collected.append(part)
        if not outputs[0]:
            size = self.input_size
            empty = (np.zeros(0, np.float32), np.zeros(0, np.float32))
            return (*empty, np.zeros((0, size, size), np.float32)) if maps else empty
        return tuple(np.concatenate(parts) for parts in outputs)

    def run(self, x: np.ndarray, maps: bool = False) -> tuple[np.ndarray, ...]:
        """One batch in [0, 1] shaped (N, 1, S, S) -> logits, guard distances (and with `maps`
        the class activation maps): the backend's part."""
        raise NotImplementedError

    @property
    def has_maps(self) -> bool:
        """Whether this model draws heatmaps: its graph gives class activation maps."""
        raise NotImplementedError

    def heatmap(self, image: np.ndarray, label: str | None = None) -> np.ndarray:
        """Where this model found its evidence for `label` (default PNEUMONIA) in one model-ready
        uint8 image (S, S): float32 (S, S) in [0, 1] (explain.heatmap)."""
        from pneumoscan import explain

        self.check_heatmaps()
        size = self.input_size
        if image.shape != (size, size):
            raise PneumoscanError(
                f"heatmap: image is {'x'.join(map(str, image.shape))}, the model needs "
                f"{size}x{size} (read it with pneumoscan.read_image(path, size={size}))"
            )
        cam = self.raw_scores(image[None], maps=True)[2][0]
        return explain.heatmap(cam, label in (None, self.class_names[1]))

    def check_heatmaps(self) -> None:
        """Refuse heatmaps where they cannot be drawn: a network without spatial layers."""
        if self.has_maps:
            return
        flat = next((a for a, _ in parts(self.meta) if a not in SPATIAL_ARCHITECTURES), None)
        if flat is not None:
            raise PneumoscanError(
                f"heatmaps need a convolutional model (cnn or transfer); {flat} has no spatial layer"
            )
        raise PneumoscanError(
            f"{self.folder}: its graph has no heatmap output (saved by an older pneumoscan); "
            "re-save it with pneumoscan[train] installed to draw heatmaps"
        )


@dataclass
class LoadedModel(ModelCard):
    """A model card with its torch network: for training, fine-tuning and GPUs."""

    network: Classifier
    scorer: Scorer

    def run(self, x: np.ndarray, maps: bool = False) -> tuple[np.ndarray, ...]:
        import torch

        self.scorer.eval()
        with torch.no_grad():
            batch = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            outputs = self.scorer(batch)
        return tuple(o.float().numpy() for o in outputs[: 3 if maps else 2])

    @property
    def has_maps(self) -> bool:
        return self.scorer.with_map


def save(
    folder: Path,
    network: Classifier,
    meta: dict,
    dtype: torch.dtype | None = None,
    ood: Guard | None = None,
) -> None:
    """Write weights (and the guard), the ONNX graph, then model.json with each file's SHA-256.

    The ONNX graph holds exactly the weights that ship (rounded to `dtype`), so both backends
    give the same answers. An int8 graph quantized from the folder's previous graph is removed
    (quantize.add_int8 makes a new one), and so is the record of what the previous folder did
    on external films (tools/external_check.py measures it again).
    """
    import torch

    from pneumoscan.export import export_onnx
    from pneumoscan.models import Mixture, Scorer

    dtype = dtype or torch.float32
    folder.mkdir(parents=True, exist_ok=True)
    if INT8_KEY in meta:  # quantized from the graph this save replaces: stale now
        (folder / INT8_FILE).unlink(missing_ok=True)
    stale = (INT8_KEY, EXTERNAL_KEY)  # the external films' outcome was of the folder replaced
    meta = {
        **{k: v for k, v in meta.items() if k not in stale},
        "format_version": FORMAT_VERSION,
        "preprocessing": preprocess.record(int(meta["input_size"])),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _write_tensors(folder / WEIGHTS_FILE, network, dtype),
            "dtype": str(dtype).split(".")[-1],
        },
        "versions": library_versions(),
    }
    if ood is not None:
        meta["ood"] = {
            **meta["ood"],
            "file": GUARD_FILE,
            "sha256": _write_tensors(folder / GUARD_FILE, ood, torch.float32),
        }
    shipped = copy.deepcopy(network).eval()
    shipped.load_state_dict(  # what the weights file holds: its tensors rounded to `dtype`
        {k: v.to(dtype).to(v.dtype) for k, v in network.state_dict().items()}
    )
    if isinstance(shipped, Mixture):  # the member that feeds the guard, as `meta` says now
        shipped.shared = guard_member(meta)
    scorer = Scorer(shipped, ood, shares_guard_trunk(meta), guard_input(meta))
    external = ["weights"] + (["ood"] if ood is not None else [])
    export_onnx(
        scorer,
        int(meta["input_size"]),
        folder / ONNX_FILE,
        tuple(folder / meta[key]["file"] for key in external),
    )
    meta["onnx"] = {
        "file": ONNX_FILE,
        "sha256": _sha256(folder / ONNX_FILE),
        "external": external,  # model.json keys of the files that hold the graph's weights
    }
    write_meta(folder, meta)


def write_meta(folder: Path, meta: dict) -> None:
    """Replace a model folder's model.json (written beside it, then renamed into place)."""
    tmp = folder / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_FILE)


def _write_tensors(path: Path, module: torch.nn.Module, dtype: torch.dtype) -> str:
    """Atomically write a module's state as safetensors; return the file's SHA-256."""
    from safetensors.torch import save_file

    state = {  # cloned: members that share a trunk module hold its tensors twice
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
        for k, v in module.state_dict().items()
    }
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return _sha256(path)


def read_card(model: str | Path) -> ModelCard:
    """model.json of a bundled model (`dense`, `cnn`, `transfer`) or a model folder."""
    folder = resolve(model)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PneumoscanError(f"{folder / META_FILE}: cannot read model metadata ({exc})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PneumoscanError(
            f"{folder}: model format version {version!r} is not supported "
            f"(this pneumoscan reads version {FORMAT_VERSION})"
        )
    preprocess.check(meta, folder)
    return ModelCard(meta.get("name", folder.name), folder, meta)


def load(model: str | Path) -> LoadedModel:
    """Load a bundled model by name (`dense`, `cnn`, `transfer`) or a model folder, in torch."""
    from pneumoscan.extras import require_train

    require_train("a model in PyTorch")
    import torch

    from pneumoscan.guard import Guard
    from pneumoscan.models import Mixture, Scorer, create_model

    card = read_card(model)
    meta = card.meta
    args = {**meta.get("model_args", {})}
    if meta["architecture"] == "mixture":
        args["members"] = [
            {"architecture": a, "model_args": _without_pretraining(a, x)} for a, x in parts(meta)
        ]
        args["guard_input"] = guard_input(meta)
    else:
        args = _without_pretraining(meta["architecture"], args)
    network = create_model(meta["architecture"], meta["input_size"], **args)
    network.load_state_dict(_read_tensors(card, "weights"))
    if isinstance(network, Mixture):
        network.share_trunks()
    ood = None
    if "ood" in meta:
        ood = Guard(len(meta["ood"].get("populations") or [None]))
        ood.load_state_dict(_read_tensors(card, "ood"))
    scorer = Scorer(network, ood, shares_guard_trunk(meta), guard_input(meta))
    scorer = scorer.eval().to(memory_format=torch.channels_last)
    return LoadedModel(card.name, card.folder, meta, network, scorer)


def parts(meta: dict) -> list[tuple[str, dict]]:
    """(architecture, model_args) of each model a mixture joins; of the model itself otherwise.

    Mixtures are never nested (`join.join_models` refuses it).
    """
    args = meta.get("model_args", {})
    if meta["architecture"] == "mixture":
        return [(m["architecture"], m["model_args"]) for m in args["members"]]
    return [(meta["architecture"], args)]


def guard_input(meta: dict) -> dict:
    """How the guard's feature extractor prepares its input (`input_blur`, `equalize`), as
    model.json's `ood` section says. A folder fitted before it said read the trunk of its
    unequalised transfer member, if it had one (with that member's blur), or a plain one; one
    fitted before `ood.equalize` read an unequalised input."""
    ood = meta.get("ood", {})
    if "input_blur" in ood:
        return {"input_blur": float(ood["input_blur"]), "equalize": ood.get("equalize", False)}
    from pneumoscan import models

    for architecture, args in parts(meta):
        own = {"input_blur": float(args.get("input_blur", 0.0)), "equalize": False}
        if models.shares_guard_trunk(architecture, args, own):
            return own
    return {"input_blur": 0.0, "equalize": False}


def guard_member(meta: dict) -> int | None:
    """Which of `parts(meta)` has a frozen trunk that is exactly the guard's extractor (its
    index), or None."""
    from pneumoscan import models

    return models.guard_member(parts(meta), guard_input(meta))


def shares_guard_trunk(meta: dict) -> bool:
    """Whether the model's own frozen trunk (a member's) is exactly the guard's extractor."""
    return guard_member(meta) is not None


def _without_pretraining(architecture: str, args: dict) -> dict:
    """Model arguments that skip loading ImageNet weights: the saved weights replace them."""
    return {**args, "pretrained": False} if architecture == "transfer" else dict(args)


def _read_tensors(card: ModelCard, key: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file named in model.json after checking its SHA-256."""
    from safetensors.torch import load_file

    path = card.file(key)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise PneumoscanError(f"{path}: unreadable tensor file ({exc})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def resolve(model: str | Path, argument: str = "--model") -> Path:
    """A bundled name or a folder holding model.json; a clear error otherwise."""
    text = str(model)
    bundled = bundled_dir() / text
    if "/" not in text and (bundled / META_FILE).is_file() and not Path(text).is_dir():
        return bundled
    folder = Path(text)
    if not (folder / META_FILE).is_file():
        names = sorted(p.parent.name for p in bundled_dir().glob(f"*/{META_FILE}"))
        raise PneumoscanError(
            f"{argument} {text}: not a bundled model ({', '.join(names)}) "
            f"nor a folder holding {META_FILE}"
        )
    return folder


def bundled_dir() -> Path:
    return Path(str(resources.files("pneumoscan") / "bundled"))


def library_versions() -> dict:
    import sklearn
    import timm
    import torch

    from pneumoscan import __version__

    return {
        "pneumoscan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
