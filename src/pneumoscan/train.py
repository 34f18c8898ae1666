"""Training, top to bottom: data, model, loop, best checkpoint, calibration and thresholds.

Validation is carved from train by patient; the test split is never read here.

Several devices train one model with PyTorch's DistributedDataParallel: `devices=N` starts N
local processes (gloo on CPUs, NCCL on GPUs), and under `torchrun` (several machines) the
process group comes from its environment. Each global batch is split across the ranks, whose
gradients DDP averages; rank 0 validates, decides, and writes checkpoints and the model.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pneumoscan import bundle, data, guard, metrics
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import MODEL_NAMES, create_model

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_MAGIC = b"pneumoscan-checkpoint sha256="


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with the model."""

    model: str
    image_size: int = 128
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 6
    seed: int = 0
    val_fraction: float = 0.1
    split_seed: int = 0
    val_design: str = "random"  # data.VAL_DESIGNS
    feature_views: int = 1  # 0: no cache; the frozen trunk sees fresh augmentations each step
    lr_decay: float = 1.0  # layer-wise rates: layer k down from the output gets lr * lr_decay^k
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off
    mixup: float = 0.0  # Beta(a, a) blend of each batch with itself shuffled; 0 = off
    label_smoothing: float = 0.0  # targets eps/2 and 1 - eps/2
    max_steps: int | None = None
    augment: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)


# A plan trains several recipes and joins them: groups split by ",", recipes of one group
# (heads on one frozen trunk) joined by "+". The bundled default (docs/experiments.md, 23).
PLANS = {"ensemble": "cnn,transfer+transfer-wide"}


def recipes() -> list[str]:
    """The bundled recipes: one YAML config each (e.g. `transfer-wide` extends `transfer`)."""
    folder = resources.files("pneumoscan") / "configs"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def _recipe_values(recipe: str) -> dict:
    """A bundled recipe's values; `extends: BASE` starts from BASE's (dicts merged key by key)."""
    import yaml

    if recipe not in recipes():
        choices = ", ".join([*recipes(), *PLANS])
        raise PneumoscanError(f"--model {recipe!r}: choose one of {choices}")
    text = (resources.files("pneumoscan") / "configs" / f"{recipe}.yaml").read_text()
    own = yaml.safe_load(text) or {}
    base = own.pop("extends", None)
    values = {"model": recipe} if base is None else _recipe_values(base)
    for key, value in own.items():
        merge = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if merge else value
    return values


def load_config(recipe: str, path: Path | None = None, **overrides) -> TrainConfig:
    """A bundled recipe's config (or the YAML at `path` for model `recipe`), with non-None
    overrides on top."""
    import yaml

    if path is None:
        values = _recipe_values(recipe)
    else:
        if recipe not in MODEL_NAMES:
            raise PneumoscanError(
                f"--model {recipe!r}: with --config choose one of {', '.join(MODEL_NAMES)}"
            )
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise PneumoscanError(f"--config {path}: cannot read ({exc.strerror})") from None
        values["model"] = recipe
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("val_design", "random") not in data.VAL_DESIGNS:
        raise PneumoscanError(
            f"--val-design {values['val_design']!r}: choose one of {', '.join(data.VAL_DESIGNS)}"
        )
    source = f"--config {path}" if path is not None else f"config for {recipe}"
    if values["model"] not in MODEL_NAMES:
        raise PneumoscanError(f"{source}: model must be one of {', '.join(MODEL_NAMES)}")
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise PneumoscanError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
        )
    if not 0 < float(values.get("lr_decay", 1.0)) <= 1:
        raise PneumoscanError(f"{source}: lr_decay must be in (0, 1] (1: one rate for all)")
    if not 0 <= float(values.get("ema", 0.0)) < 1:
        raise PneumoscanError(f"{source}: ema must be in [0, 1) (0: off; e.g. 0.995)")
    return TrainConfig(**values)


Plan = list[dict[str, TrainConfig]]


def load_plan(spec: str, path: Path | None = None, **overrides) -> Plan:
    """`--model` -> groups of recipes: "cnn,transfer" two groups, "transfer+transfer-wide" one
    group of two heads, "ensemble" the bundled default's plan. A config at `path` stands for
    a single model's; overrides go to every recipe."""
    full = PLANS.get(spec, spec)
    groups = [[n.strip() for n in group.split("+")] for group in full.split(",")]
    if path is not None and sum(map(len, groups)) > 1:
        raise PneumoscanError(f"--config: give it one --model, not {spec!r}")
    for names in groups:
        if len(set(names)) < len(names):
            raise PneumoscanError(f"--model {spec}: {'+'.join(names)} names a recipe twice")
    if len({"+".join(names) for names in groups}) < len(groups):
        raise PneumoscanError(f"--model {spec}: a group is named twice")
    return [{n: load_config(n, path, **overrides) for n in names} for names in groups]


def augment(x: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation, shift, scale, aspect, brightness, contrast, sharpness and noise.

    No left-right flip: the heart sits on the left, and a mirrored chest is not a real X-ray.
    `aspect` (a) makes the anatomy taller and narrower, or shorter and wider, by a ratio up to
    1 + a at the same area: every frame was squashed to a square from its own aspect ratio,
    which differs between the classes' sources (docs/experiments.md, section 17).
    Sharpness (a blend towards or away from a blurred copy) and faint noise stand for the
    scanners, resamplings and re-encodings an image meets before it reaches the model.
    """
    if not cfg:
        return x
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * limit

    angle = uniform(math.radians(cfg.get("rotate", 0.0)))
    scale = 1 + uniform(cfg.get("scale", 0.0))
    tx, ty = uniform(cfg.get("translate", 0.0)), uniform(cfg.get("translate", 0.0))
    brightness = uniform(cfg.get("brightness", 0.0))
    contrast = 1 + uniform(cfg.get("contrast", 0.0))
    root = torch.ones(n)  # the square root of the anatomy's change of height/width
    if cfg.get("aspect"):  # drawn only when set: recipes without it keep their random draws
        root = torch.exp(uniform(math.log1p(cfg["aspect"])) / 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * root, -sin * root, tx], 1),
            torch.stack([sin / root, cos / root, ty], 1),
        ],
        1,
    )
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.to(x).view(-1, 1, 1, 1) + mean + brightness.to(x).view(-1, 1, 1, 1)
    if cfg.get("sharpness"):
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = x + uniform(cfg["sharpness"]).to(x).view(-1, 1, 1, 1) * (blurred - x)
    if cfg.get("noise"):
        sigma = torch.rand(n, generator=gen) * cfg["noise"]
        x = x + torch.randn(x.shape, generator=gen).to(x) * sigma.to(x).view(-1, 1, 1, 1)
    return x.clamp_(0, 1)


def _soft_targets(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch, its targets and class weights after mixup and label smoothing (if set).

    Mixup blends each input with another of the batch, by a share drawn from Beta(a, a) (one
    per batch, from `gen`, so a resumed run draws the same), and blends targets and weights
    alike.
    """
    target = y.float()
    if cfg.mixup > 0:
        from scipy.special import betaincinv

        share = float(betaincinv(cfg.mixup, cfg.mixup, torch.rand(1, generator=gen).item()))
        other = torch.randperm(len(y), generator=gen).to(x.device)
        x = share * x + (1 - share) * x[other]
        target = share * target + (1 - share) * target[other]
        weight = share * weight + (1 - share) * weight[other]
    if cfg.label_smoothing > 0:
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
    return x, target, weight


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PneumoscanError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise PneumoscanError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


@dataclass
class _Data:
    images: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    fingerprint: str
    n_val_patients: int


def _prepare_data(root: Path, cfg: TrainConfig) -> _Data:
    listed = data.list_split(root, "train")
    images, kept = data.load_images(listed, cfg.image_size)
    train_split, val_split = data.train_val_split(
        kept, cfg.val_fraction, cfg.split_seed, cfg.val_design
    )
    position = {f: i for i, f in enumerate(kept.files)}
    return _Data(
        images=images,
        train_idx=np.asarray([position[f] for f in train_split.files]),
        val_idx=np.asarray([position[f] for f in val_split.files]),
        labels=kept.labels,
        class_names=kept.class_names,
        fingerprint=data.fingerprint(kept.files),
        n_val_patients=len({data.patient_id(f.name) for f in val_split.files}),
    )


@torch.no_grad()
def _trunk_features(trunk, images, idx, device, batch_size, cfg=None, gen=None) -> torch.Tensor:
    """Frozen-trunk outputs, computed once (optionally of augmented views)."""
    trunk.eval()  # the pretrained BatchNorm statistics, never batch statistics
    out = []
    for start in range(0, len(idx), batch_size * 4):
        x = to_input(images[idx[start : start + batch_size * 4]], device)
        if cfg:
            x = augment(x, cfg, gen)
        with _autocast(device):
            out.append(trunk(x).to(torch.float16))
    return torch.cat(out)


def layer_groups(network: torch.nn.Module, lr: float, decay: float) -> list[dict]:
    """The optimizer's parameter groups: layer-wise learning rates, highest at the output.

    Each trained child of the network's head (for `transfer`: the base's top stages, its
    conv_head, the new linear layer) is a layer; a BatchNorm goes with the layer before it.
    Counting from the output, layer k learns at lr * decay**k; decay 1 is one rate for all.
    """
    layers: list[list[torch.nn.Parameter]] = []
    for child in network.head.children():
        params = [p for p in child.parameters() if p.requires_grad]
        if not params:
            continue
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and layers:
            layers[-1] += params
        else:
            layers.append(params)
    return [
        {"params": params, "lr": lr * decay ** (len(layers) - 1 - k)}
        for k, params in enumerate(layers)
    ]


def _averaged(network: torch.nn.Module, decay: float) -> torch.nn.Module | None:
    """An EMA copy of the network (weights and BatchNorm statistics); None when decay is 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(
    cfg: TrainConfig,
    data_root: Path,
    out_dir: Path,
    device_name: str = "auto",
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    devices: int = 1,
) -> bundle.LoadedModel | None:
    """Train one model and write it to `out_dir` as a model folder.

    With `devices` > 1, that many processes train it together (see the module's docstring).
    Returns the model; None on the ranks other than 0 of a distributed run.
    """
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_FILE
    if (out_dir / bundle.META_FILE).exists() and not (resume or force):
        raise PneumoscanError(
            f"{out_dir} already holds a trained model; pass --force to overwrite it"
        )
    if resume and not checkpoint_path.exists():
        raise PneumoscanError(f"--resume: no checkpoint in {out_dir}; start without --resume")
    device = pick_device(device_name)
    if devices > 1 and not dist.is_initialized():
        _spawn(devices, device, cfg, data_root, out_dir, resume, log, progress)
        return bundle.load(out_dir)
    rank, world, device = _join_process_group(device)
    main = rank == 0
    if not main:
        log, progress = _silent, False
    start_time = time.perf_counter()
    torch.manual_seed(cfg.seed)
    d = _prepare_data(Path(data_root), cfg)
    if len(d.class_names) != 2 or len(np.unique(d.labels[d.train_idx])) != 2:
        raise PneumoscanError(f"{data_root}/train: need two classes with images in each")
    log(
        f"data: {len(d.train_idx)} train / {len(d.val_idx)} validation images "
        f"({d.n_val_patients} validation patients), {cfg.image_size}px, device {device}"
        + (f" x {world} processes" if world > 1 else "")
    )

    network = create_model(cfg.model, cfg.image_size, **cfg.model_args)
    network = network.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        layer_groups(network, cfg.lr, cfg.lr_decay), weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(d.train_idx) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (
            1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup)))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # The epochs' order is shared by all ranks; augmentation draws differ per rank.
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    order_gen = gen if world == 1 else torch.Generator().manual_seed(cfg.seed)
    train_labels = d.labels[d.train_idx]
    counts = np.bincount(train_labels, minlength=2)
    class_weight = torch.tensor(
        len(train_labels) / (2 * counts), dtype=torch.float32, device=device
    )
    val_labels = d.labels[d.val_idx]

    # Frozen trunk: its outputs are computed once per image (and per augmented view).
    features = val_features = None
    if network.has_frozen_trunk and cfg.feature_views > 0:
        t0 = time.perf_counter()
        view_gen = torch.Generator().manual_seed(cfg.seed + 1)
        features = torch.stack(
            [
                _trunk_features(
                    network.trunk,
                    d.images,
                    d.train_idx,
                    device,
                    cfg.batch_size,
                    cfg.augment if view else None,
                    view_gen,
                )
                for view in range(cfg.feature_views)
            ]
        )
        val_features = None
        if main:
            val_features = _trunk_features(
                network.trunk, d.images, d.val_idx, device, cfg.batch_size
            )
        log(
            f"cached frozen-base features of {cfg.feature_views} view(s) in {time.perf_counter() - t0:.1f}s"
        )

    state = {
        "epoch": 0,
        "step": 0,
        "best_auc": -1.0,
        "best_epoch": 0,
        "best_state": None,
        "history": [],
    }
    if resume:
        ckpt = _load_checkpoint(checkpoint_path, cfg, world)
        network.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["gen_states"][rank])
        order_gen.set_state(ckpt["order_gen_state"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = {k: ckpt[k] for k in state}
        log(f"resumed from {checkpoint_path} after epoch {state['epoch']}")
    trained = network.head if features is not None else network
    ema = _averaged(network, cfg.ema)
    kept = network if ema is None else ema.module  # what is validated and kept
    if resume and ema is not None:
        ema.load_state_dict(ckpt["ema"])
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained)

    def batch_input(idx_positions: np.ndarray) -> torch.Tensor:
        if features is not None:
            view = torch.randint(cfg.feature_views, (1,), generator=gen).item()
            return features[view][torch.from_numpy(idx_positions).to(features.device)].float()
        x = to_input(d.images[d.train_idx[idx_positions]], device)
        return augment(x, cfg.augment, gen)

    def validate() -> tuple[float, float]:
        kept.eval()
        logits = []
        with torch.no_grad(), _autocast(device):
            for start in range(0, len(d.val_idx), cfg.batch_size * 4):
                if val_features is not None:
                    out = kept.head(val_features[start : start + cfg.batch_size * 4].float())
                else:
                    out = kept(
                        to_input(d.images[d.val_idx[start : start + cfg.batch_size * 4]], device)
                    )
                logits.append(out.float().reshape(-1).cpu())
        z = torch.cat(logits)
        y = torch.from_numpy(val_labels).float()
        loss = float(
            F.binary_cross_entropy_with_logits(z, y, weight=class_weight.cpu()[val_labels])
        )
        return loss, metrics.auc(val_labels, z.numpy())

    epochs = cfg.epochs if cfg.max_steps is None else math.ceil(cfg.max_steps / steps_per_epoch)
    stop = False
    for epoch in range(state["epoch"] + 1, epochs + 1):
        network.train()
        order = torch.randperm(len(d.train_idx), generator=order_gen).numpy()
        running, seen = 0.0, 0
        bar = _progress(progress, steps_per_epoch, f"epoch {epoch}/{epochs}")
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            if len(batch) < 2 * world:
                continue  # BatchNorm needs two samples on every rank
            positions = batch[rank::world]  # this rank's share
            x = batch_input(positions)
            y = torch.from_numpy(train_labels[positions]).to(device)
            x, target, weight = _soft_targets(x, y, class_weight[y], cfg, gen)
            with _autocast(device):
                out = trained(x).reshape(-1)
            loss = F.binary_cross_entropy_with_logits(out.float(), target, weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(network)
            state["step"] += 1
            running += loss.item() * len(positions)
            seen += len(positions)
            bar.advance()
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if world > 1:
            _sync_buffers(network)  # BatchNorm statistics: rank 0's, as DDP's forward does
        val_loss, val_auc = _on_rank_0(validate, main, world)
        improved = val_auc > state["best_auc"]
        if improved:
            state.update(
                best_auc=val_auc,
                best_epoch=epoch,
                best_state={k: v.detach().cpu().clone() for k, v in kept.state_dict().items()},
            )
        state["epoch"] = epoch
        state["history"].append(
            {
                "epoch": epoch,
                "train_loss": running / max(seen, 1),
                "val_loss": val_loss,
                "val_auc": val_auc,
                "lr": optimizer.param_groups[-1]["lr"],  # the output layer's
            }
        )
        log(
            f"epoch {epoch:>3}/{epochs}  train loss {running / max(seen, 1):.4f}  "
            f"val loss {val_loss:.4f}  val AUC {val_auc:.4f}{'  *best' if improved else ''}"
        )
        gen_states = [gen.get_state()]
        if world > 1:
            gen_states = [None] * world
            dist.all_gather_object(gen_states, gen.get_state())
        if main:
            extra = {"gen_states": gen_states, "order_gen_state": order_gen.get_state()}
            if ema is not None:
                extra["ema"] = ema.state_dict()
            _save_checkpoint(checkpoint_path, network, optimizer, scheduler, extra, state, cfg)
        if epoch - state["best_epoch"] >= cfg.patience:
            log(f"early stop: no validation AUC gain for {cfg.patience} epochs")
            break
        if stop:
            break

    if world > 1:
        _check_ranks_agree(network, world, log)
        if not main:
            return None
    network.load_state_dict(state["best_state"])
    meta = _describe(cfg, d, state, device, time.perf_counter() - start_time)
    meta["training"]["processes"] = world
    network.to("cpu")
    bundle.save(out_dir, network, meta)
    loaded = fit_postprocessing(bundle.load(out_dir), data_root)
    ood = loaded.meta["ood"]
    log(
        f"saved {out_dir} (best epoch {state['best_epoch']}, validation AUC "
        f"{loaded.meta['validation']['auc']:.4f}; guard passes {ood['validation_pass_rate']:.1%} "
        "of validation X-rays)"
    )
    return loaded


def train_ensemble(
    plan: TrainConfig | Plan,
    seeds: list[int],
    data_root: Path,
    out_dir: Path,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    name: str | None = None,
    **options,
) -> bundle.LoadedModel | None:
    """Train each recipe of `plan` once per seed, then join all of them into one model in OUT.

    One recipe (a config): members in OUT/seed-N. Several groups (a mixture, e.g. `cnn` and
    `transfer`): each group in OUT/GROUP, itself joined from OUT/GROUP/seed-N when there are
    several seeds. A group of several recipes of one network (`transfer+transfer-wide`): each
    recipe in OUT/GROUP/RECIPE, joined as heads on its one frozen trunk. Joins take the mean
    logit at each level, so the default `ensemble` (`cnn,transfer+transfer-wide`, seed 0)
    weighs its members 1/2, 1/4, 1/4. With `resume`, members already trained are kept and an
    interrupted one resumes from its checkpoint. `options` go to `train` (device_name,
    progress, devices).
    """
    out_dir = Path(out_dir)
    if (out_dir / bundle.META_FILE).exists() and not (resume or force):
        raise PneumoscanError(
            f"{out_dir} already holds a trained model; pass --force to overwrite it"
        )
    if isinstance(plan, TrainConfig):
        plan = [{plan.model: plan}]
    joiner = not dist.is_initialized() or dist.get_rank() == 0  # under torchrun: rank 0 joins

    def member(recipe: TrainConfig, seed: int, folder: Path) -> Path:
        if resume and (folder / bundle.META_FILE).exists():
            log(f"member {recipe.model} seed {seed}: kept the model already in {folder}")
        else:
            log(f"== member {recipe.model} seed {seed} in {folder}")
            again = resume and (folder / CHECKPOINT_FILE).exists()
            trained = replace(recipe, seed=seed)
            train(trained, data_root, folder, resume=again, force=force, log=log, **options)
        return folder

    def parts(groups: Plan, folder: Path) -> list[Path]:
        """The trained folders that `groups` joins from, inside `folder`."""
        if len(groups) > 1:
            return [built([g], folder / "+".join(g)) for g in groups]
        if len(groups[0]) > 1:
            return [built([{r: c}], folder / r) for r, c in groups[0].items()]
        (recipe,) = groups[0].values()
        return [member(recipe, s, folder / f"seed-{s}") for s in seeds]

    def built(groups: Plan, folder: Path) -> Path:
        """A part of the whole: one recipe with one seed trains in place, the rest join."""
        if len(groups) == 1 and len(groups[0]) == 1 and len(seeds) == 1:
            (recipe,) = groups[0].values()
            return member(recipe, seeds[0], folder)
        folders = parts(groups, folder)
        if joiner:
            join_members(folders, data_root, folder)
        return folder

    folders = parts(plan, out_dir)
    return join_members(folders, data_root, out_dir, name) if joiner else None


def _config(meta: dict) -> dict:
    """A model's training config; one saved before a field existed holds its default."""
    return asdict(TrainConfig(**meta["training"]["config"]))


def split_of(meta: dict) -> tuple:
    """What fixes a model's validation images: its data, input size and split settings."""
    config = _config(meta)
    keys = ("image_size", "val_fraction", "split_seed", "val_design")
    return (meta["data"]["fingerprint"], *(config[k] for k in keys))


def join_members(
    folders: list[Path], data_root: Path, out_dir: Path, name: str | None = None
) -> bundle.LoadedModel:
    """Trained models -> one model (their mean logit) in OUT.

    Members of one network (the same architecture and model arguments: seeds of a recipe, or
    recipes that differ only in how they trained) share their frozen trunk, which then runs
    once under their heads. Members of different networks (a `mixture`) each run whole. All
    must have been trained on the same data and validation split. Calibration, thresholds and
    the guard are fit again, on validation, for the joined model.
    """
    from pneumoscan.models import ensemble, mixture, share_trunk

    members = [bundle.load(f) for f in folders]
    first = members[0]
    for folder, m in zip(folders, members, strict=True):
        if m.meta["architecture"] == "mixture":
            raise PneumoscanError(f"{folder}: already a mixture; join its members instead")
        if split_of(m.meta) != split_of(first.meta):
            raise PneumoscanError(
                f"{folder}: trained on other data or another validation split than {folders[0]};"
                " ensemble members must share them"
            )
    recipes = [{**_config(m.meta), "seed": 0} for m in members]
    same_recipe = all(r == recipes[0] for r in recipes)
    networks = [(m.meta["architecture"], m.meta["model_args"]) for m in members]
    one_network = (
        all(n == networks[0] for n in networks)
        and "members" not in networks[0][1]
        and share_trunk([m.network for m in members])
    )
    # The guard, calibration and thresholds are the joined model's own, fit below.
    meta = {k: v for k, v in first.meta.items() if k not in ("ood", "test")}
    meta["training"] = {
        **first.meta["training"],
        "members": [
            {
                "folder": str(f),
                "model": m.description,
                "seed": m.meta["training"]["config"]["seed"],
                "validation_auc": m.meta["validation"]["auc"],
                "wall_time_s": m.meta["training"]["wall_time_s"],
                # recipes that differ: each member's own (the joined model's is the first's)
                **({} if same_recipe else {"config": _config(m.meta)}),
            }
            for f, m in zip(folders, members, strict=True)
        ],
        "wall_time_s": round(sum(m.meta["training"]["wall_time_s"] for m in members), 1),
    }
    if one_network:
        meta["model_args"] = {**first.meta["model_args"], "members": len(members)}
        network = ensemble([m.network for m in members])
    else:
        specs = [
            {"architecture": m.meta["architecture"], "model_args": m.meta["model_args"]}
            for m in members
        ]
        meta.update(architecture="mixture", model_args={"members": specs})
        meta["name"] = "+".join(m.name for m in members)
        network = mixture([m.network for m in members], specs)
    if name is not None:
        meta["name"] = name
    bundle.save(out_dir, network, meta)
    return fit_postprocessing(bundle.load(out_dir), data_root)


def fit_postprocessing(model: bundle.LoadedModel, data_root: Path) -> bundle.LoadedModel:
    """Fit what follows the network on the model's own split, through the inference path.

    The not-a-chest-X-ray guard on training images; then, on validation, Platt calibration and
    the two operating points. Run after training, and again after a model's weights are
    converted (e.g. to fp16 for bundling), so the thresholds match the weights that ship.
    """
    cfg = TrainConfig(**model.meta["training"]["config"])
    d = _prepare_data(Path(data_root), cfg)
    if d.fingerprint != model.meta["data"]["fingerprint"]:
        raise PneumoscanError(
            f"{data_root}: not the data this model was trained on (fingerprint differs)"
        )
    if bundle.shares_guard_trunk(model.meta):
        trunk = model.network.trunk  # a mixture's: that of its member which shares it
    else:
        from pneumoscan.models import imagenet_trunk

        trunk = imagenet_trunk(guard.FROZEN_STAGES)
    trunk = trunk.to(memory_format=torch.channels_last)

    def pooled(idx: np.ndarray) -> np.ndarray:
        features = _trunk_features(trunk, d.images, idx, torch.device("cpu"), cfg.batch_size)
        return guard.Guard.pool(features).numpy()

    ood, ood_threshold, pass_rate = guard.fit(pooled(d.train_idx), pooled(d.val_idx))
    val_labels = d.labels[d.val_idx]
    val_logits, _ = model.raw_scores(d.images[d.val_idx])
    meta = {**model.meta, **_operating_points(val_labels, val_logits)}  # save() renews the rest
    meta["validation"] = {
        "auc": metrics.auc(val_labels, val_logits),
        "n": len(val_labels),
        "patients": d.n_val_patients,
    }
    meta["ood"] = {
        "method": guard.DESCRIPTION,
        "threshold": ood_threshold,
        "validation_pass_rate": pass_rate,
    }
    bundle.save(
        model.folder,
        model.network,
        meta,
        dtype=getattr(torch, model.meta["weights"]["dtype"]),
        ood=ood,
    )
    return bundle.load(model.folder)


def _operating_points(val_labels: np.ndarray, val_logits: np.ndarray) -> dict:
    """Platt calibration and both thresholds, all from validation."""
    scale, bias = metrics.fit_platt(val_labels, val_logits)
    raw = metrics.sigmoid(val_logits)
    probs = metrics.sigmoid(scale * val_logits + bias)
    balanced = metrics.youden_threshold(val_labels, probs)
    # Detection trades accuracy for sensitivity, so it is never less sensitive than balanced.
    detection = min(metrics.detection_threshold(val_labels, probs), balanced)
    rules = {
        "balanced": (balanced, "max Youden's J on validation"),
        "detection": (
            detection,
            f"highest threshold with validation sensitivity >= {metrics.DETECTION_SENSITIVITY}"
            " (and at most the balanced threshold)",
        ),
    }
    return {
        "operating_points": {
            name: {
                "threshold": t,
                "rule": rule,
                "validation": metrics.point_metrics(val_labels, probs, t).to_dict(),
            }
            for name, (t, rule) in rules.items()
        },
        "calibration": {
            "method": "Platt scaling of the logit, fit on validation",
            "scale": scale,
            "bias": bias,
            "validation_ece_before": metrics.expected_calibration_error(val_labels, raw),
            "validation_ece_after": metrics.expected_calibration_error(val_labels, probs),
        },
    }


def _describe(cfg: TrainConfig, d: _Data, state: dict, device: torch.device, wall: float) -> dict:
    """What model.json says about the network and its training (post-fitting adds the rest)."""
    return {
        "name": cfg.model,
        "architecture": cfg.model,
        "input_size": cfg.image_size,
        "model_args": cfg.model_args,
        "class_names": d.class_names,
        "positive_class": d.class_names[1],
        "training": {
            "config": asdict(cfg),
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "history": state["history"],
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu x{torch.get_num_threads()}",
            "wall_time_s": round(wall, 1),
        },
        "data": {
            "fingerprint": d.fingerprint,
            "n_train": len(d.train_idx),
            "n_val": len(d.val_idx),
            "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed,
            "val_design": cfg.val_design,
            "grouped_by": "patient id from the file name",
        },
    }


def _load_checkpoint(path: Path, cfg: TrainConfig, world: int) -> dict:
    """The checkpoint of an interrupted run of the same config; a clear error otherwise.

    The file is a header line with the SHA-256 of what follows, then torch's own format: a
    flipped bit anywhere is caught, not only where torch's zip reader happens to look.
    """
    damaged = PneumoscanError(
        f"{path}: checkpoint is damaged or not a pneumoscan checkpoint; "
        "delete it and train again without --resume"
    )
    raw = path.read_bytes()
    header, _, body = raw.partition(b"\n")
    if not header.startswith(CHECKPOINT_MAGIC):
        raise damaged
    if (
        header[len(CHECKPOINT_MAGIC) :].decode("ascii", "replace")
        != hashlib.sha256(body).hexdigest()
    ):
        raise damaged
    try:
        ckpt = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for foreign files
        raise damaged from None
    if ckpt.get("config") != asdict(cfg):
        raise PneumoscanError(
            f"{path}: checkpoint was written with another config; resume with the same "
            "options, or train again without --resume"
        )
    if len(ckpt["gen_states"]) != world:
        raise PneumoscanError(
            f"{path}: checkpoint was written by {len(ckpt['gen_states'])} process(es); "
            f"resume with --devices {len(ckpt['gen_states'])}"
        )
    return ckpt


def _save_checkpoint(path: Path, network, optimizer, scheduler, extra, state, cfg) -> None:
    """Write the run's state atomically (temporary file, then rename), with its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": asdict(cfg),
        **extra,  # generator states; the EMA weights, when on
        **state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(CHECKPOINT_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n")
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _silent(_: str) -> None:
    pass


def _spawn(devices: int, device: torch.device, cfg, data_root, out_dir, resume, log, progress):
    """Run `train` in `devices` local processes joined in one process group."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise PneumoscanError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) here")
    with socket.socket() as probe:  # a free port for the rendezvous on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = (devices, port, device.type, cfg, data_root, out_dir, resume, log, progress)
    try:
        mp.start_processes(_worker, args=args, nprocs=devices, start_method="spawn")
    except mp.ProcessRaisedException as exc:  # its message is the worker's whole traceback
        raise PneumoscanError(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) from None


def _worker(rank, world, port, device_type, cfg, data_root, out_dir, resume, log, progress):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        train(cfg, data_root, out_dir, device_type, resume, True, log, progress)
        # Rank 0 saves and post-fits alone; a rank that tore the group down meanwhile could
        # abort in gloo's teardown. All leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): from torchrun's or _spawn's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _on_rank_0(compute: Callable[[], tuple], main: bool, world: int) -> tuple:
    """`compute()` on rank 0, its result on every rank."""
    result = [compute() if main else None]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def _sync_buffers(network: torch.nn.Module) -> None:
    for buffer in network.buffers():
        dist.broadcast(buffer, src=0)


def _check_ranks_agree(network: torch.nn.Module, world: int, log: Callable[[str], None]) -> None:
    """Every rank must end with the same weights; a difference is a bug, never ignored."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"distributed training: the ranks' weights differ ({digests})")
    log(f"all {world} processes hold identical weights (sha256 {digests[0][:12]})")


class _NullBar:
    def advance(self) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int, description: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._task = self._progress.add_task(description, total=total)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int, description: str):
    return _RichBar(total, description) if enabled else _NullBar()
