"""Screening files: paths in, one result per file out, streamed with bounded memory.

Decoding runs in worker threads while the model scores the previous batch; at most a few
batches are in flight, so memory stays flat whatever the number of files. A file that cannot
be read becomes a result with an `error`; it never stops the batch.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan import domain, reader
from pneumoscan.data import is_image_file
from pneumoscan.errors import ImageReadError, PneumoscanError
from pneumoscan.model_folder import ModelCard

FIELDS = (
    "file",
    "probability",
    "label",
    "threshold",
    "mode",
    "ood",
    "ood_score",
    "error",
    "domain",
    "warning",
    "population",
)


@dataclass
class Prediction:
    """The result for one file; `label` is None when the file is not a chest X-ray or failed.

    `domain` is in_domain, shifted (a chest X-ray unlike the training images: scored, with a
    `warning`) or not_chest_xray (`ood` true, no label); None when the file could not be read.
    `population` is the population the image is most like, for a model whose guard knows
    several (its training sources, and reference populations such as adults).
    """

    file: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    mode: str | None = None
    ood: bool | None = None
    ood_score: float | None = None
    error: str | None = None
    domain: str | None = None
    warning: str | None = None
    population: str | None = None
    heatmap: str | None = None  # the PNG's path, when written to a folder
    heatmap_png: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["heatmap_png"]
        if out["heatmap"] is None:
            del out["heatmap"]
        return out


def triage_order(result: Prediction) -> tuple[int, float]:
    """Sort key of a triage list: scored images by probability, highest first; then those that
    are not chest X-rays, then files that could not be read (neither has a score to rank by)."""
    if result.error is not None:
        return (2, 0.0)
    if result.ood:
        return (1, 0.0)
    return (0, -(result.probability or 0.0))


@dataclass
class Scan:
    """The files a list of paths names, and what folder scans passed over, by suffix."""

    files: list[Path]
    skipped: dict[str, int]

    def note(self) -> str | None:
        """E.g. "skipped 2 files with unsupported suffixes: .gif, .txt"; None when none."""
        if not self.skipped:
            return None
        n = sum(self.skipped.values())
        return f"skipped {n} file{'s' if n > 1 else ''} with unsupported suffixes: " + ", ".join(
            sorted(self.skipped)
        )


def scan_paths(paths: Iterable[str | Path]) -> Scan:
    """Files as given; folders recursively, the files `data.is_image_file` takes.

    A path that does not exist is a usage error, raised before any work starts. Hidden files
    are passed over silently; other files with a suffix the reader does not take are counted.
    """
    files: list[Path] = []
    skipped: dict[str, int] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if is_image_file(p):
                    files.append(p)
                elif p.is_file() and not p.name.startswith("."):
                    suffix = p.suffix.lower()
                    skipped[suffix] = skipped.get(suffix, 0) + 1
        elif path.exists():
            files.append(path)
        else:
            raise PneumoscanError(f"{path}: no such file or folder")
    return Scan(files, skipped)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The files of `scan_paths`."""
    return scan_paths(paths).files


Source = Path | tuple[str, bytes]  # a file, or (name, content) of an upload held in memory


@dataclass
class Decoded:
    name: str
    stem: str
    image: np.ndarray | None = None  # model-ready (S, S)
    original: np.ndarray | None = None  # full resolution, kept only for heatmaps
    error: str | None = None


def decode(source: Source, size: int, keep_original: bool = False) -> Decoded:
    """Read and resize one file; an unreadable one carries its one-line reason instead."""
    name, content = (source[0], source[1]) if isinstance(source, tuple) else (str(source), source)
    stem = Path(name).stem or "image"
    try:
        original = reader.read_image(content, name=name)
        image = reader.resize(original, size)
        return Decoded(name, stem, image, original if keep_original else None)
    except ImageReadError as exc:
        return Decoded(name, stem, error=str(exc))


def parse_shard(spec: str) -> slice:
    """Part I of N (`spec` "I/N", 1 <= I <= N) of a file list: every N-th file from the I-th.

    Workers given the same paths and each its own I cover every file exactly once.
    """
    index, _, count = spec.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise PneumoscanError(f"--shard {spec!r}: write I/N with 1 <= I <= N, e.g. 1/4")
    return slice(int(index) - 1, None, int(count))


def predict(
    model: ModelCard,
    files: Iterable[Source],
    mode: str = "detection",
    batch_size: int = 32,
    workers: int | None = None,
    heatmaps: Path | None = None,
    explain: bool = False,
) -> Iterator[Prediction]:
    """Score files (or in-memory uploads) in order, yielding each result once its batch is done.

    `model` is an ONNX Runtime model (runtime.load) or a torch one (model_folder.load).
    `explain` attaches a heatmap overlay PNG to each scored result; `heatmaps` also writes it
    there. The heatmap comes from the class activation map the model gives with its logits.
    """
    threshold = model.threshold(mode)
    writer = _HeatmapWriter(model, heatmaps) if heatmaps is not None or explain else None
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        in_flight: deque[list[Future[Decoded]]] = deque()
        batch: list[Future[Decoded]] = []
        for path in files:
            batch.append(pool.submit(decode, path, model.input_size, writer is not None))
            if len(batch) == batch_size:
                in_flight.append(batch)
                batch = []
                if len(in_flight) > 2:  # two batches decode while one is scored
                    done = [f.result() for f in in_flight.popleft()]
                    yield from score_decoded(model, done, mode, threshold, writer)
        if batch:
            in_flight.append(batch)
        while in_flight:
            done = [f.result() for f in in_flight.popleft()]
            yield from score_decoded(model, done, mode, threshold, writer)


def score_decoded(
    model: ModelCard,
    decoded: list[Decoded],
    mode: str,
    threshold: float,
    writer: _HeatmapWriter | None = None,
) -> Iterator[Prediction]:
    """Results of one batch of decoded files, in order; also the Ray engine's scoring step."""
    good = [d for d in decoded if d.image is not None]
    results, maps = {}, {}
    if good:
        logits, distances, *cams = model.raw_scores(
            np.stack([d.image for d in good]), maps=writer is not None
        )
        probs = model.calibrate(logits)
        guarded = "ood" in model.meta
        tiers, nearest, scores = model.assess(distances)
        for i, (d, p) in enumerate(zip(good, probs, strict=True)):
            if cams:
                maps[id(d)] = cams[0][i]
            tier = tiers[i]
            ood = tier == domain.NOT_CHEST_XRAY
            results[id(d)] = Prediction(
                file=d.name,
                probability=float(p),
                label=None if ood else model.class_names[int(p >= threshold)],
                threshold=threshold,
                mode=mode,
                ood=ood,
                ood_score=float(scores[i]) if guarded else None,
                domain=tier,
                warning=model.warning(tier, nearest[i]),
                population=nearest[i],
            )
    for d in decoded:
        if d.image is None:
            yield Prediction(file=d.name, threshold=threshold, mode=mode, error=d.error)
            continue
        result = results[id(d)]
        if writer is not None:
            writer.write(d, result, maps[id(d)], model.class_names)
        yield result


class _HeatmapWriter:
    """One overlay PNG per scored image; a file written never replaces one already there."""

    def __init__(self, model: ModelCard, folder: Path | None):
        model.check_heatmaps()
        if folder is not None:
            if folder.exists() and not folder.is_dir():
                raise PneumoscanError(f"--heatmaps {folder}: exists and is not a folder")
            folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def write(
        self, decoded: Decoded, result: Prediction, cam: np.ndarray, class_names: list[str]
    ) -> None:
        from pneumoscan import explain

        evidence = explain.heatmap(cam, result.label in (None, class_names[1]))
        result.heatmap_png = explain.overlay_png(
            decoded.original, evidence, result.probability, result.label, result.threshold
        )
        if self.folder is None:
            return
        target = self.folder / f"{decoded.stem}_heatmap.png"
        n = 1
        while True:
            try:
                with target.open("xb") as handle:  # exclusive create: never clobber a file
                    handle.write(result.heatmap_png)
                break
            except FileExistsError:
                n += 1
                target = self.folder / f"{decoded.stem}_heatmap-{n}.png"
        result.heatmap = str(target)
