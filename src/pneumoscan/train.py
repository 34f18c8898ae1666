"""Training one model, top to bottom: data, network, the epoch loop, the best epoch, post-fitting.

Validation is carved from train by patient; the test split is never read here. `train` reads
as its steps: build the run, cache the frozen trunk's features, resume, loop over epochs
(train, validate, keep the best, checkpoint, stop early), then save the best epoch's network
and fit its guard, calibration and operating points (postfit.py). With `devices` > 1 several
processes train one model together (distributed.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pneumoscan import checkpoint, data, distributed, metrics, model_folder, postfit
from pneumoscan.augment import augment, exposure_variant, soft_targets
from pneumoscan.config import TrainConfig
from pneumoscan.device import autocast, pick_device, to_input, trunk_features
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import Classifier, create_model
from pneumoscan.progress import progress_bar


@dataclass
class LoopState:
    """What the epoch loop carries from one epoch to the next; the checkpoint holds all of it."""

    epoch: int = 0
    step: int = 0
    best_auc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def record(self, epoch: int, entry: dict, kept: torch.nn.Module) -> bool:
        """Log an epoch's figures; keep `kept`'s weights when its validation AUC is the best."""
        improved = entry["val_auc"] > self.best_auc
        if improved:
            self.best_auc, self.best_epoch = entry["val_auc"], epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
        self.epoch = epoch
        self.history.append({"epoch": epoch, **entry})
        return improved


@dataclass
class Run:
    """What one training run works with, built once before the loop."""

    cfg: TrainConfig
    data: data.TrainingData
    device: torch.device
    rank: int
    world: int
    network: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # this rank's augmentation draws
    order_gen: torch.Generator  # the epochs' order, shared by all ranks
    weight: torch.Tensor  # each image's weight in the loss (train and validation positions)
    ema: torch.nn.Module | None  # an average of the weights (AveragedModel), when cfg.ema > 0
    features: torch.Tensor | None = None  # cached frozen-trunk outputs: (views, [2,] N, ...)
    val_features: torch.Tensor | None = None
    trained: torch.nn.Module | None = None  # what the optimizer steps (DDP-wrapped if world > 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def kept(self) -> torch.nn.Module:
        """What is validated and saved: the averaged weights when EMA is on."""
        return self.network if self.ema is None else self.ema.module

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train_idx) / self.cfg.batch_size)

    @property
    def train_labels(self) -> np.ndarray:
        return self.data.labels[self.data.train_idx]


def train(
    cfg: TrainConfig,
    data_root: data.DataSets,
    out_dir: Path,
    device_name: str = "auto",
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    devices: int = 1,
) -> model_folder.LoadedModel | None:
    """Train one model on one or more data sets and write it to `out_dir` as a model folder.

    With `cfg.init` (a model folder or bundled name) the network starts from that model's
    weights: fine-tuning on `data_root`, a site's own images. With `devices` > 1, that many
    processes train it together (distributed.py). Returns the model; None on the ranks other
    than 0 of a distributed run.
    """
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / checkpoint.CHECKPOINT_FILE
    check_out_dir(out_dir, resume, force)
    if resume and not checkpoint_path.exists():
        raise PneumoscanError(f"--resume: no checkpoint in {out_dir}; start without --resume")
    device = pick_device(device_name)
    if devices > 1 and not dist.is_initialized():
        options = dict(
            cfg=cfg, data_root=data_root, out_dir=out_dir, resume=resume, log=log, progress=progress
        )
        distributed.spawn(train, devices, device, options)
        return model_folder.load(out_dir)
    rank, world, device = distributed.join_process_group(device)
    if rank != 0:
        log, progress = _silent, False
    start_time = time.perf_counter()

    torch.manual_seed(cfg.seed)
    d = _load_data(data_root, cfg)
    sources = d.manifest.source_names
    log(
        f"data: {len(d.train_idx)} train / {len(d.val_idx)} validation images "
        f"({d.n_val_patients} validation patients"
        + (f"; sources {', '.join(sources)}" if len(sources) > 1 else "")
        + f"), {cfg.image_size}px, device {device}"
        + (f" x {world} processes" if world > 1 else "")
    )
    run = _build(cfg, d, device, rank, world)
    if getattr(run.network, "has_frozen_trunk", False) and cfg.feature_views > 0:
        _cache_features(run, log)
    state = LoopState()
    if resume:
        state = _restore(run, checkpoint.load(checkpoint_path, asdict(cfg), world))
        log(f"resumed from {checkpoint_path} after epoch {state.epoch}")
    trained = run.network.head if run.features is not None else run.network
    run.trained = torch.nn.parallel.DistributedDataParallel(trained) if world > 1 else trained

    epochs = cfg.epochs if cfg.max_steps is None else math.ceil(cfg.max_steps / run.steps_per_epoch)
    for epoch in range(state.epoch + 1, epochs + 1):
        bar = progress_bar(progress, run.steps_per_epoch, f"epoch {epoch}/{epochs}")
        train_loss, out_of_steps = _train_epoch(run, state, bar)
        bar.close()
        if world > 1:
            distributed.sync_buffers(run.network)  # BatchNorm statistics: rank 0's
        val_loss, val_auc = distributed.on_rank_0(partial(_validate, run), run.main, world)
        entry = {
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_auc": val_auc,
            "lr": run.optimizer.param_groups[-1]["lr"],  # the output layer's
        }
        improved = state.record(epoch, entry, run.kept)
        log(
            f"epoch {epoch:>3}/{epochs}  train loss {train_loss:.4f}  "
            f"val loss {val_loss:.4f}  val AUC {val_auc:.4f}{'  *best' if improved else ''}"
        )
        _save_checkpoint(run, state, checkpoint_path)
        if epoch - state.best_epoch >= cfg.patience:
            log(f"early stop: no validation AUC gain for {cfg.patience} epochs")
            break
        if out_of_steps:
            break

    if world > 1:
        distributed.check_ranks_agree(run.network, world, log)
        if not run.main:
            return None
    return _save_best(run, state, out_dir, data_root, time.perf_counter() - start_time, log)


def check_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to train over a model already in `out_dir`, unless resuming or forced."""
    if (out_dir / model_folder.META_FILE).exists() and not (resume or force):
        raise PneumoscanError(
            f"{out_dir} already holds a trained model; pass --force to overwrite it"
        )


def _load_data(sets: data.DataSets, cfg: TrainConfig) -> data.TrainingData:
    d = data.training_data(sets, cfg.image_size, cfg.val_fraction, cfg.split_seed, cfg.val_design)
    for source in d.manifest.source_names:
        index = d.manifest.of_source(source)
        train = np.intersect1d(index, d.train_idx)
        missing = [c for k, c in enumerate(d.class_names) if not (d.labels[train] == k).any()]
        if missing:
            raise PneumoscanError(
                f"--data: source {source!r} has no {' or '.join(missing)} image to train on; "
                "every source needs images of both classes"
            )
    if len(d.class_names) != 2:
        raise PneumoscanError(f"--data: need two classes, found {', '.join(d.class_names)}")
    return d


def _build(
    cfg: TrainConfig, d: data.TrainingData, device: torch.device, rank: int, world: int
) -> Run:
    """The network, its optimizer and schedule, the generators and the images' weights."""
    network = initial_network(cfg)
    network = network.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        layer_groups(network, cfg.lr, cfg.lr_decay), weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(d.train_idx) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps)
    )
    # The epochs' order is shared by all ranks; augmentation draws differ per rank.
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    order_gen = gen if world == 1 else torch.Generator().manual_seed(cfg.seed)
    weight = torch.from_numpy(image_weights(d, cfg.source_weight)).to(device)
    ema = averaged(network, cfg.ema)
    return Run(
        cfg,
        d,
        device,
        rank,
        world,
        network,
        optimizer,
        scheduler,
        gen,
        order_gen,
        weight,
        ema,
    )


def initial_network(cfg: TrainConfig) -> torch.nn.Module:
    """A new network of the recipe, or with `cfg.init` the network of that trained model."""
    if cfg.init is None:
        return create_model(cfg.model, cfg.image_size, **cfg.model_args)
    start = model_folder.load(cfg.init)
    if start.input_size != cfg.image_size:
        raise PneumoscanError(
            f"--init {cfg.init}: the model reads {start.input_size} px images, not "
            f"{cfg.image_size}; leave --image-size out"
        )
    return start.network


def image_weights(d: data.TrainingData, source_weight: dict[str, float]) -> np.ndarray:
    """Each image's weight in the loss: the classes balanced within each source (train is 74%
    pneumonia), each source weighing as many images as it has training images, times its
    `source_weight` (default 1). Validation images take their source's and class's weight."""
    weight = np.ones(len(d.labels), np.float32)
    sources = d.sources
    training = np.zeros(len(d.labels), bool)
    training[d.train_idx] = True
    for source in d.manifest.source_names:
        of_source = sources == source
        n = (of_source & training).sum()
        for k in range(len(d.class_names)):
            members = of_source & (d.labels == k)
            count = (members & training).sum()
            weight[members] = n / (len(d.class_names) * max(count, 1))
        weight[of_source] *= float(source_weight.get(source, 1.0))
    return weight


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning rate's factor: a linear warm-up over `warmup` steps, then a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def layer_groups(network: torch.nn.Module, lr: float, decay: float) -> list[dict]:
    """The optimizer's parameter groups: layer-wise learning rates, highest at the output.

    Each trained child of the network's head (for `transfer`: the base's top stages, its
    conv_head, the new linear layer) is a layer; a BatchNorm goes with the layer before it.
    Counting from the output, layer k learns at lr * decay**k; decay 1 is one rate for all.
    """
    if not hasattr(network, "head"):  # a mixture, fine-tuned as a whole: one rate
        return [{"params": [p for p in network.parameters() if p.requires_grad], "lr": lr}]
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


def averaged(network: torch.nn.Module, decay: float) -> torch.nn.Module | None:
    """An EMA copy of the network (weights and BatchNorm statistics); None when decay is 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _cache_features(run: Run, log: Callable[[str], None]) -> None:
    """The frozen trunk's outputs, once per image and augmented view; validation on rank 0."""
    cfg, d, trunk = run.cfg, run.data, run.network.trunk
    t0 = time.perf_counter()
    view_gen = torch.Generator().manual_seed(cfg.seed + 1)
    views = [
        trunk_features(
            trunk,
            d.images,
            d.train_idx,
            run.device,
            cfg.batch_size,
            cfg.augment if view else None,
            view_gen,
            cfg.consistency or None,  # each view paired with itself under another exposure
        )
        for view in range(cfg.feature_views)
    ]
    run.features = torch.stack(views)
    if run.main:
        run.val_features = trunk_features(trunk, d.images, d.val_idx, run.device, cfg.batch_size)
    log(
        f"cached frozen-base features of {cfg.feature_views} view(s) in {time.perf_counter() - t0:.1f}s"
    )


def _restore(run: Run, ckpt: dict) -> LoopState:
    """Put the run back where an interrupted one left it: weights, optimizer, generators."""
    run.network.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.gen.set_state(ckpt["gen_states"][run.rank])
    run.order_gen.set_state(ckpt["order_gen_state"])
    torch.set_rng_state(ckpt["torch_rng"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    return LoopState(**{f.name: ckpt[f.name] for f in fields(LoopState)})


def _train_epoch(run: Run, state: LoopState, bar) -> tuple[float, bool]:
    """One pass over the training images in a fresh order: (mean loss, max_steps reached)."""
    cfg, world = run.cfg, run.world
    run.network.train()
    order = torch.randperm(len(run.data.train_idx), generator=run.order_gen).numpy()
    running, seen = 0.0, 0
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        if len(batch) < 2 * world:
            continue  # BatchNorm needs two samples on every rank
        positions = batch[run.rank :: world]  # this rank's share
        running += _step(run, positions) * len(positions)
        seen += len(positions)
        state.step += 1
        bar.advance()
        if cfg.max_steps and state.step >= cfg.max_steps:
            return running / max(seen, 1), True
    return running / max(seen, 1), False


def _step(run: Run, positions: np.ndarray) -> float:
    """One optimizer step on the training images at `positions`; returns the batch's loss."""
    x = _batch_input(run, positions)
    y = torch.from_numpy(run.train_labels[positions]).to(run.device)
    weight = run.weight[torch.from_numpy(run.data.train_idx[positions]).to(run.device)]
    x, target, weight = soft_targets(x, y, weight, run.cfg, run.gen)
    consistency = run.cfg.consistency  # x then holds the batch and the same under another exposure
    with autocast(run.device):
        out = run.trained(x).reshape(-1).float()
    if consistency:
        out, variant = out.chunk(2)
    loss = F.binary_cross_entropy_with_logits(out, target, weight=weight)
    if consistency:
        loss = loss + consistency["weight"] * bernoulli_js(out, variant)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.network)
    return loss.item()


def bernoulli_js(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean Jensen-Shannon divergence between the Bernoulli answers of logits `a` and `b`:
    AugMix's consistency term (Hendrycks et al., 2020), for one output."""
    p = torch.stack([torch.sigmoid(a), torch.sigmoid(b)]).clamp(1e-7, 1 - 1e-7)
    m = p.mean(0)

    def kl_to_m(q: torch.Tensor) -> torch.Tensor:
        return q * torch.log(q / m) + (1 - q) * torch.log((1 - q) / (1 - m))

    return 0.5 * (kl_to_m(p[0]) + kl_to_m(p[1])).mean()


def _batch_input(run: Run, positions: np.ndarray) -> torch.Tensor:
    """A training batch: cached features of a random view, or freshly augmented images; with
    the consistency term, followed by the same batch under another exposure."""
    consistency = run.cfg.consistency
    if run.features is not None:
        view = torch.randint(run.cfg.feature_views, (1,), generator=run.gen).item()
        at = torch.from_numpy(positions).to(run.features.device)
        cached = run.features[view]
        return (cached[:, at].flatten(0, 1) if consistency else cached[at]).float()
    x = to_input(run.data.images[run.data.train_idx[positions]], run.device)
    x = augment(x, run.cfg.augment, run.gen)
    return torch.cat([x, exposure_variant(x, consistency, run.gen)]) if consistency else x


def _validate(run: Run) -> tuple[float, float]:
    """The kept network's weighted loss and AUC on validation."""
    kept, d, chunk = run.kept, run.data, run.cfg.batch_size * 4
    kept.eval()
    logits = []
    with torch.no_grad(), autocast(run.device):
        for start in range(0, len(d.val_idx), chunk):
            if run.val_features is not None:
                out = kept.head(run.val_features[start : start + chunk].float())
            else:
                out = kept(to_input(d.images[d.val_idx[start : start + chunk]], run.device))
            logits.append(out.float().reshape(-1).cpu())
    z = torch.cat(logits)
    val_labels = d.labels[d.val_idx]
    y = torch.from_numpy(val_labels).float()
    loss = float(F.binary_cross_entropy_with_logits(z, y, weight=run.weight.cpu()[d.val_idx]))
    return loss, metrics.within_source_auc(val_labels, z.numpy(), d.sources[d.val_idx])


def _save_checkpoint(run: Run, state: LoopState, path: Path) -> None:
    """The run's state after an epoch, written by rank 0 (every rank's generator included)."""
    gen_states = distributed.gather(run.gen.get_state(), run.world)
    if not run.main:
        return
    payload = {
        "model": run.network.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": asdict(run.cfg),
        "gen_states": gen_states,
        "order_gen_state": run.order_gen.get_state(),
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        **state.as_dict(),
    }
    checkpoint.save(path, payload)


def _save_best(
    run: Run,
    state: LoopState,
    out_dir: Path,
    data_root: data.DataSets,
    wall: float,
    log: Callable[[str], None],
) -> model_folder.LoadedModel:
    """The best epoch's network as a model folder, with its guard, calibration and thresholds."""
    run.network.load_state_dict(state.best_state)
    meta = _describe(run, state, wall)
    run.network.to("cpu")
    model_folder.save(out_dir, run.network, meta)
    loaded = postfit.fit_postprocessing(model_folder.load(out_dir), data_root)
    ood = loaded.meta["ood"]
    log(
        f"saved {out_dir} (best epoch {state.best_epoch}, validation AUC "
        f"{loaded.meta['validation']['auc']:.4f}; guard passes {ood['validation_pass_rate']:.1%} "
        "of validation X-rays)"
    )
    return loaded


def _describe(run: Run, state: LoopState, wall: float) -> dict:
    """What model.json says about the network and its training (post-fitting adds the rest)."""
    cfg, d, device = run.cfg, run.data, run.device
    network = {"name": cfg.model, "architecture": cfg.model, "model_args": cfg.model_args}
    fine_tuned = {}
    if cfg.init is not None:
        start = model_folder.read_card(cfg.init)
        network = {k: start.meta[k] for k in ("architecture", "model_args")}
        network["name"] = f"{start.name}-finetuned"
        fine_tuned = {
            "fine_tuned_from": {
                "model": start.name,
                "folder": str(start.folder),
                "weights_sha256": start.meta["weights"]["sha256"],
                "data": start.meta.get("data"),
            }
        }
    return {
        **network,
        "input_size": cfg.image_size,
        "class_names": d.class_names,
        "training": {
            "config": asdict(cfg),
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "history": state.history,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu x{torch.get_num_threads()}",
            "wall_time_s": round(wall, 1),
            "processes": run.world,
            **fine_tuned,
        },
        # The split's settings are in training.config; these are what they gave on this data.
        "data": d.describe(),
    }


def _silent(_: str) -> None:
    pass
