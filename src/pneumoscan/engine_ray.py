"""Archive-scale screening on Ray: `pneumoscan predict ... --engine ray`.

Ray Data runs the plain command's steps as a stream: listing (and skipping files a resumed run
has already written) and decoding as tasks through the project's own reader, scoring in actors
that each load the model folder once and run its ONNX graph (on a GPU where the actor has one),
and the results come back to this process in order, where each batch is appended to the output
as whole rows and flushed. Memory stays flat however many files stream through; a killed run
resumes from what its output holds.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import screening
from pneumoscan.errors import PneumoscanError

BATCH_SIZE = 32  # the plain command's batch: the same graph runs on the same batches
BLOCK_ROWS = 2 * BATCH_SIZE  # files the listing hands on at a time
# Ray Data's largest block: some 60 file names, or two batches of results (see _stream).
BLOCK_BYTES = 8 * 1024
ROWS_PER_PART = 10_000  # parquet: rows per part file, each written whole (a kill loses at most one)


def _arrow_schema() -> Any:
    """The output's columns: `screening.FIELDS`, typed from `Prediction`'s annotations."""
    import pyarrow as pa

    types = {f.name: str(f.type) for f in fields(screening.Prediction)}
    kinds = {"str": pa.string(), "float": pa.float64(), "bool": pa.bool_(), "int": pa.int64()}
    return pa.schema(
        [(name, kinds[types[name].split("|")[0].strip()]) for name in screening.FIELDS]
    )


# ---- the output: whole rows only, and what a resumed run has already written ----------------


class CsvOutput:
    """A CSV with the columns of `predict --csv`; appended to, a batch of whole rows at a time."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.resume = resume and path.exists()
        self.header = ",".join(screening.FIELDS) + "\r\n"  # csv.DictWriter's own line ending
        self.done: set[str] = set()
        if self.resume:
            with path.open(newline="") as handle:
                text = handle.read()
            if text and not text.startswith(self.header):
                raise PneumoscanError(
                    f"--resume: {path} is not a pneumoscan CSV (its header differs)"
                )
            whole = text[: text.rfind("\n") + 1]  # a kill mid-write leaves at most a half row
            rows = csv.DictReader(io.StringIO(whole[len(self.header) :]), screening.FIELDS)
            self.done = {row["file"] for row in rows}

    def start(self) -> None:
        """Open for writing: a fresh file with its header, or the old one less a half row."""
        if self.resume:
            with self.path.open("rb+") as handle:
                data = handle.read()
                handle.truncate(data.rfind(b"\n") + 1)
            self.handle = self.path.open("a", newline="")
            if not data.rfind(b"\n") + 1:
                self.handle.write(self.header)
        else:
            self.handle = self.path.open("w", newline="")
            self.handle.write(self.header)
        self.handle.flush()

    def write(self, rows: list[dict]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=screening.FIELDS, extrasaction="ignore")
        writer.writerows(rows)
        self.handle.write(text.getvalue())
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class ParquetOutput:
    """A folder of Parquet part files (one table to pyarrow, pandas or DuckDB), each written
    whole under a temporary name and then renamed, so a kill never leaves a damaged part."""

    def __init__(self, folder: Path, resume: bool, rows_per_part: int = ROWS_PER_PART):
        import pyarrow.parquet as pq

        if folder.exists() and not folder.is_dir():
            raise PneumoscanError(f"--parquet {folder}: exists and is not a folder")
        parts = sorted(folder.glob("part-*.parquet")) if resume else []
        self.done = {
            f for part in parts for f in pq.read_table(part, columns=["file"])["file"].to_pylist()
        }
        self.folder = folder
        self.resume = resume
        self.next_part = len(parts)
        self.rows_per_part = rows_per_part
        self.pending: list[dict] = []

    def start(self) -> None:
        """Make the folder; drop a kill's unfinished part, and without --resume the old parts."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".part-*.tmp"):
            stale.unlink()
        if not self.resume:
            for part in self.folder.glob("part-*.parquet"):
                part.unlink()

    def write(self, rows: list[dict]) -> None:
        self.pending.extend(rows)
        if len(self.pending) >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        name = f"part-{self.next_part:06d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(self.pending, schema=_arrow_schema()), tmp)
        os.replace(tmp, self.folder / name)
        self.next_part += 1
        self.pending = []

    def close(self) -> None:
        self._flush()


def open_output(csv_file: Path | None, parquet: Path | None, resume: bool, force: bool):
    """The output to stream to, refusing what would lose or mix results."""
    if (csv_file is None) == (parquet is None):
        raise PneumoscanError("--engine ray writes to a file: give --csv FILE or --parquet FOLDER")
    if resume and force:
        raise PneumoscanError("--resume and --force: choose one")
    target = csv_file or parquet
    option = "--csv" if csv_file is not None else "--parquet"
    exists = target.exists() and (target.is_file() or any(target.glob("part-*.parquet")))
    if exists and not (resume or force):
        raise PneumoscanError(
            f"{option} {target}: exists; pass --resume to continue it or --force to overwrite it"
        )
    if parquet is not None:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise PneumoscanError(
                "--parquet needs pyarrow: pip install 'pneumoscan[ray]' (or pyarrow)"
            ) from None
        return ParquetOutput(parquet, resume)
    return CsvOutput(csv_file, resume)


# ---- the Ray side: tasks list and decode, actors score ----------------------------------------


def _list(batch: dict[str, np.ndarray], done: frozenset[str]) -> Iterator[dict[str, np.ndarray]]:
    """The files under the given paths, as `predict` lists them, less those already written;
    handed on BLOCK_ROWS at a time, so a folder of millions never sits in one list."""
    rows: list[tuple[str, str]] = []
    for given, absolute in zip(batch["given"], batch["absolute"], strict=True):
        given, absolute = Path(given), Path(absolute)
        for path in screening.expand_paths([absolute]):
            shown = str(given / path.relative_to(absolute)) if absolute.is_dir() else str(given)
            if shown not in done:
                rows.append((shown, str(path)))
            if len(rows) == BLOCK_ROWS:
                yield _file_rows(rows)
                rows = []
    if rows:
        yield _file_rows(rows)


def _file_rows(rows: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    files, paths = zip(*rows, strict=True)
    return {"file": np.array(files, dtype=object), "path": np.array(paths, dtype=object)}


def _decode(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Read and resize a batch of files with the project's reader; failures keep their reason."""
    images = np.zeros((len(batch["file"]), size, size), np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        decoded = screening.decode(Path(path), size)
        if decoded.image is not None:
            images[i] = decoded.image
        errors.append(decoded.error or "")
    return {"file": batch["file"], "image": images, "error": np.array(errors, dtype=object)}


class _Scorer:
    """A Ray actor: the model folder loaded once, then batch after batch through its graph."""

    def __init__(self, model: str, mode: str, precision: str, threads: int | None):
        import ray

        from pneumoscan import runtime

        gpu = bool(ray.get_gpu_ids())
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else None
        self.model = runtime.load(model, threads, providers, precision)
        self.mode = mode
        self.threshold = self.model.threshold(mode)
        self.schema = _arrow_schema()

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        decoded = [
            screening.Decoded(name, Path(name).stem, error=error or None)
            if error
            else screening.Decoded(name, Path(name).stem, image)
            for name, image, error in zip(
                batch["file"], batch["image"], batch["error"], strict=True
            )
        ]
        rows = [
            r.to_dict()
            for r in screening.score_decoded(self.model, decoded, self.mode, self.threshold)
        ]
        return pa.Table.from_pylist(rows, schema=self.schema)


@dataclass
class Summary:
    written: int = 0
    failed: int = 0
    flagged: int = 0
    skipped: int = 0  # already in the output of the run this one resumes
    seconds: float = 0.0


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray on this machine's cores.

    Returns whether this call started Ray (and so should shut it down).
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise PneumoscanError("--engine ray needs Ray: pip install 'pneumoscan[ray]'") from None
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "include_dashboard": False}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address not in (None, "auto"):
        _check_reachable(address)
    if ray.is_initialized():  # a program (or a test) that runs Ray itself
        return False
    try:
        if address is None:
            # A local Ray of its own on loopback: nothing of it listens beyond this machine, and
            # a cluster `ray start` left on this machine (or its stale address file) is not joined.
            ray.init(
                address="local",
                num_cpus=os.cpu_count() or 1,
                _node_ip_address="127.0.0.1",
                **quiet,
            )
        else:
            ray.init(address=address, **quiet)
    except Exception as exc:  # Ray raises ConnectionError, ValueError, RuntimeError, ...
        where = f"--ray-address {address}" if address else "a local Ray"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PneumoscanError(f"{where}: cannot start or join Ray ({reason})") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address nothing answers at (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PneumoscanError(f"--ray-address {address!r}: write auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise PneumoscanError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc})"
        ) from None


def run(
    paths: Iterable[Path],
    output: CsvOutput | ParquetOutput,
    model: str,
    mode: str,
    address: str | None = None,
    progress: bool | None = None,
    precision: str = "fp32",
) -> Summary:
    """Screen every file under `paths` into `output`, skipping those it already holds."""
    from pneumoscan import model_folder

    card = model_folder.read_card(model)  # a bad --model fails here, before Ray starts
    card.threshold(mode)
    from pneumoscan import runtime

    runtime.load(model, threads=1, precision=precision)  # a missing graph fails here, not in Ray
    roots = [Path(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise PneumoscanError(f"{root}: no such file or folder")
    started = connect(address)
    output.start()
    progress = sys.stderr.isatty() if progress is None else progress
    summary = Summary(skipped=len(output.done))
    # A bundled model by its name: each node finds it in its own install.
    bundled = card.folder == model_folder.bundled_dir() / str(model)
    where = str(model) if bundled else str(card.folder.resolve())
    begin = time.monotonic()
    try:
        for rows in _stream(roots, output.done, where, card.input_size, mode, precision):
            output.write(rows)
            summary.written += len(rows)
            summary.failed += sum(r["error"] is not None for r in rows)
            summary.flagged += sum(bool(r["ood"]) for r in rows)
            summary.seconds = time.monotonic() - begin
            if progress:
                sys.stderr.write(f"\r{_progress_line(summary)}")
                sys.stderr.flush()
    finally:
        output.close()
        if progress:
            sys.stderr.write("\n")
        if started:
            import ray

            ray.shutdown()
    summary.seconds = time.monotonic() - begin
    return summary


def _progress_line(s: Summary) -> str:
    rate = s.written / s.seconds if s.seconds > 0 else 0.0
    return f"{s.written} files done, {rate:.0f}/s, {s.failed} errors"


def _stream(
    roots: list[Path], done: set[str], model: str, size: int, mode: str, precision: str
) -> Iterator[list[dict]]:
    """The Ray Data pipeline; yields the results batch by batch, in the plain command's order."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the rows in the plain command's order
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or cpus  # up to one per core; Ray fuses decoding into the scoring actor
    items = [{"given": str(r), "absolute": str(r.resolve())} for r in roots]
    # Listing walks folders (I/O, no core of its own), so a scoring actor per core never starves
    # it. Its rows leave in small blocks (a few dozen file names each), so that decoding spreads
    # over the actors and results come back, and are written, a few batches at a time. The block
    # size is set here rather than by a repartition, which would ask a whole core of its own: a
    # 1-CPU node whose scoring actor holds half would never free one, and the run would stall.
    context.target_max_block_size = BLOCK_BYTES
    listed = ray.data.from_items(items).map_batches(
        _list, batch_size=None, fn_args=(frozenset(done),), num_cpus=0
    )
    decoded = listed.map_batches(
        _decode, batch_size=BATCH_SIZE, fn_kwargs={"size": size}, num_cpus=0.5
    )
    scored = decoded.map_batches(
        _Scorer,
        batch_size=BATCH_SIZE,
        fn_constructor_kwargs={
            "model": model,
            "mode": mode,
            "precision": precision,
            "threads": None if gpus else 1,
        },
        concurrency=(1, actors),
        num_cpus=0.5 if not gpus else 0,  # half a core reserved: the others never starve
        num_gpus=1 if gpus else 0,
    )
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch.to_pylist()
