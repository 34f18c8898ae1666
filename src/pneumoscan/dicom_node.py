"""`pneumoscan listen`: a DICOM node that scores the X-rays it receives and sends reports back.

Three stages, each on its own thread, joined by a queue on disk:
receive (a pynetdicom storage SCP: write the file, acknowledge at once) -> score (the same
reader and model as `predict`, then `dicom_report` builds the SR and SC) -> forward (C-STORE to
the PACS, retried with back-off until it acknowledges). Whatever is on disk survives a crash or
a restart: received images wait in `incoming/`, results in `outgoing/`, and `seen` lists the
instances already scored, so none is scored twice.

Logs never hold patient data: an instance is named by a salted hash of its SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pneumoscan import dicom_report
from pneumoscan.errors import PneumoscanError

log = logging.getLogger("pneumoscan.listen")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
# C-STORE statuses a destination may answer with and still have stored the object.
STORED = {0x0000, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}
BATCH = 16  # images scored together when several are waiting
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> Destination:
        """AET@HOST:PORT, e.g. PACS@10.0.0.5:104."""
        title, at, address = spec.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and title and host and port.isdigit() and 0 < int(port) < 65536):
            raise PneumoscanError(
                f"--forward {spec!r}: write AET@HOST:PORT, e.g. PACS@127.0.0.1:4242"
            )
        return cls(check_ae_title(title, "--forward"), host.strip("[]"), int(port))


def check_ae_title(title: str, option: str) -> str:
    if not (0 < len(title) <= 16 and title.isascii() and title.isprintable() and "\\" not in title):
        raise PneumoscanError(f"{option} {title!r}: an AE title is 1-16 printable ASCII characters")
    return title


class DiskQueue:
    """The node's state on disk: received images, results not yet delivered, instances seen."""

    def __init__(self, root: Path):
        self.root = root
        self.incoming = root / "incoming"
        self.outgoing = root / "outgoing"
        try:
            for folder in (self.incoming, self.outgoing):
                folder.mkdir(parents=True, exist_ok=True)
            salt = root / "salt"
            if not salt.exists():
                _atomic_write(salt, secrets.token_hex(16).encode())
            self.salt = salt.read_bytes()
            self._seen_file = root / "seen"
            self._seen_file.touch()
        except OSError as exc:
            raise PneumoscanError(
                f"--queue {root}: cannot use this folder ({exc.strerror})"
            ) from None
        self._seen = set(self._seen_file.read_text().split())
        self._lock = threading.Lock()

    def key(self, uid: str) -> str:
        """The name an instance goes by in files and logs: a salted hash of its UID."""
        return hashlib.sha256(self.salt + uid.encode()).hexdigest()[:16]

    def seen(self, key: str) -> bool:
        return key in self._seen or (self.incoming / f"{key}.dcm").exists()

    def mark_seen(self, key: str) -> None:
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            with self._seen_file.open("a") as handle:
                handle.write(key + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def receive(self, key: str, data: bytes) -> None:
        _atomic_write(self.incoming / f"{key}.dcm", data)

    def received(self) -> list[str]:
        return [p.stem for p in sorted(self.incoming.glob("*.dcm"), key=_mtime)]

    def put_results(self, key: str, objects: list[tuple[str, bytes]]) -> None:
        """Results first, then the instance is marked seen, then its received file goes."""
        for kind, content in objects:
            _atomic_write(self.outgoing / f"{key}.{kind}.dcm", content)
        self.mark_seen(key)
        (self.incoming / f"{key}.dcm").unlink(missing_ok=True)

    def pending(self) -> list[Path]:
        return sorted(self.outgoing.glob("*.dcm"), key=_mtime)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, sync, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class NodeConfig:
    forward: Destination
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "PNEUMOSCAN"
    outputs: tuple[str, ...] = ("sr",)
    model: str = "ensemble"
    mode: str = "detection"
    queue: Path = field(default_factory=lambda: _default_queue())
    allow: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    uid_root: str = dicom_report.DEFAULT_UID_ROOT
    retry_max_s: float = 60.0
    precision: str = "fp32"


def _default_queue() -> Path:
    from pneumoscan.data import cache_dir

    return cache_dir() / "listen"


class Node:
    """The running node: SCP, scorer and forwarder. `start()`, then `stop()` (or `serve()`)."""

    def __init__(self, config: NodeConfig):
        from pneumoscan import runtime

        self.config = config
        check_ae_title(config.ae_title, "--ae-title")
        for title in config.allow:
            check_ae_title(title, "--allow")
        self.ssl = _server_tls(config.tls_cert, config.tls_key)
        self.disk = DiskQueue(config.queue)
        self.model = runtime.load(config.model, precision=config.precision)
        self.threshold = self.model.threshold(config.mode)
        self.reporter = dicom_report.Reporter(self.model, config.outputs, config.uid_root)
        self.heatmaps = "sc" in config.outputs
        if self.heatmaps:
            try:
                self.model.check_heatmaps()
            except PneumoscanError as exc:
                raise PneumoscanError(f"--outputs sc: {exc}; or use --outputs sr") from None
        self.work: queue.Queue[str | None] = queue.Queue()
        self.wake = threading.Event()  # new results to forward
        self.stopping = threading.Event()
        self.server = None
        self.threads: list[threading.Thread] = []

    # -- receive --------------------------------------------------------------------------

    def _application_entity(self):
        from pydicom.uid import UID
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = 16
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        if self.config.allow:
            ae.require_calling_aet = list(self.config.allow)
        ae.add_supported_context(Verification)
        # pynetdicom takes the first of ours that the sender proposed: compressed ones first, so
        # a modality whose file is compressed sends it as it is instead of decompressing it.
        syntaxes = sorted(ALL_TRANSFER_SYNTAXES, key=lambda ts: not UID(ts).is_compressed)
        for sop_class in dicom_report.IMAGE_STORAGE:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def _on_store(self, event) -> int:
        try:
            uid = str(event.request.AffectedSOPInstanceUID or "")
            data = event.encoded_dataset()
            key = self.disk.key(uid or hashlib.sha256(data).hexdigest())
            if self.disk.seen(key):
                log.info("instance %s: received again; already scored, not scored twice", key)
                return SUCCESS
            self.disk.receive(key, data)
        except Exception as exc:  # a full disk, say: the sender keeps its copy and may retry
            log.error("could not store a received instance (%s)", type(exc).__name__)
            return OUT_OF_RESOURCES
        log.info("instance %s: received from %s", key, _peer(event))
        self.work.put(key)
        return SUCCESS

    def _on_rejected(self, event) -> None:
        log.warning(
            "association from %s refused: calling AE title %r is not in --allow",
            event.assoc.requestor.address,
            event.assoc.requestor.ae_title,
        )

    # -- score ----------------------------------------------------------------------------

    def _score_loop(self) -> None:
        while True:
            keys = [self.work.get()]
            while len(keys) < BATCH:  # whatever else has arrived is scored in the same batch
                try:
                    keys.append(self.work.get_nowait())
                except queue.Empty:
                    break
            stop = None in keys
            try:
                self._score([k for k in keys if k is not None])
            except Exception as exc:  # one bad batch never stops the node
                log.error(
                    "%d instance(s) not scored (%s); they stay queued",
                    len(keys),
                    type(exc).__name__,
                )
            if stop:
                return

    def _score(self, keys: list[str]) -> None:
        import pneumoscan

        batch = []  # (key, source header, bytes) of the images to score
        for key in keys:
            path = self.disk.incoming / f"{key}.dcm"
            if not path.exists():
                continue
            data = path.read_bytes()
            source = dicom_report.read_source(data)
            if source is None:
                log.warning("instance %s: not a DICOM image with its UIDs; no report", key)
                self.disk.put_results(key, [])
            elif dicom_report.made_here(source):
                log.info("instance %s: made by pneumoscan; not scored (no routing loops)", key)
                self.disk.put_results(key, [])
            else:
                batch.append((key, source, data))
        results = pneumoscan.predict(
            [(f"instance {key}", data) for key, _, data in batch],
            model=self.model,
            mode=self.config.mode,
            heatmaps=self.heatmaps,
            workers=1,
        )
        for (key, source, _), result in zip(batch, results, strict=True):
            if result.error is not None:
                log.warning("%s; no report", result.error)
                self.disk.put_results(key, [])
                continue
            objects = self.reporter.build(source, result)
            self.disk.put_results(key, [(kind, dicom_report.encode(ds)) for kind, ds in objects])
            log.info(
                "instance %s: P(pneumonia) %.3f -> %s (%s); %s queued",
                key,
                result.probability,
                result.label or "no label",
                dicom_report.domain_of(result),
                ", ".join(kind for kind, _ in objects),
            )
            self.wake.set()

    # -- forward --------------------------------------------------------------------------

    def _forward_loop(self) -> None:
        delay = 0.5
        while not self.stopping.is_set():
            pending = self.disk.pending()
            if not pending:
                self.wake.wait(5.0)
                self.wake.clear()
                continue
            if self._send(pending):
                delay = 0.5
                continue
            log.warning(
                "%s: %d result(s) wait; retrying in %.0f s",
                self._destination(),
                len(pending),
                delay,
            )
            self.stopping.wait(delay)
            delay = min(delay * 2, self.config.retry_max_s)

    def _destination(self) -> str:
        d = self.config.forward
        return f"{d.ae_title}@{d.host}:{d.port}"

    def _send(self, paths: list[Path]) -> bool:
        """Send pending results over one association; True when every one was stored."""
        import pydicom
        from pynetdicom import AE

        d = self.config.forward
        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class in (SR_STORAGE, SC_STORAGE):
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        try:
            assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        except Exception:
            assoc = None
        if assoc is None or not assoc.is_established:
            return False
        ok = True
        try:
            for path in paths:
                if self.stopping.is_set():
                    return False
                key, kind = path.name.split(".")[:2]
                try:
                    ds = pydicom.dcmread(path)
                except FileNotFoundError:
                    continue
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code in STORED:
                    path.unlink(missing_ok=True)
                    log.info("instance %s: %s delivered to %s", key, kind, self._destination())
                else:
                    ok = False
                    shown = "no answer" if code is None else f"status 0x{code:04X}"
                    log.warning(
                        "instance %s: %s not stored by the destination (%s)", key, kind, shown
                    )
                if not assoc.is_established:
                    return False
        finally:
            if assoc.is_established:
                assoc.release()
        return ok

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        from pynetdicom import evt

        _quiet_libraries()
        ae = self._application_entity()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        try:
            self.server = ae.start_server(
                (self.config.host, self.config.port),
                block=False,
                ssl_context=self.ssl,
                evt_handlers=handlers,
            )
        except OSError as exc:
            raise PneumoscanError(
                f"--port {self.config.port}: cannot listen on {self.config.host} ({exc.strerror})"
            ) from None
        for target in (self._score_loop, self._forward_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        waiting = self.disk.received()
        for key in waiting:  # a restarted node picks up where the last one stopped
            self.work.put(key)
        pending = len(self.disk.pending())
        if waiting or pending:
            log.info(
                "resuming: %d received image(s) to score, %d result(s) to send",
                len(waiting),
                pending,
            )
        self.wake.set()

    def stop(self) -> None:
        """Stop accepting, finish the image being scored, leave the rest queued on disk."""
        if self.server is not None:
            self.server.shutdown()
        self.stopping.set()
        self.wake.set()
        # Drain what is not started yet (it stays in incoming/), then end the scorer.
        try:
            while True:
                self.work.get_nowait()
        except queue.Empty:
            pass
        self.work.put(None)
        for thread in self.threads:
            thread.join(timeout=60)
        log.info(
            "stopped; %d received image(s) and %d result(s) wait in %s",
            len(self.disk.received()),
            len(self.disk.pending()),
            self.disk.root,
        )


def serve(config: NodeConfig, say) -> None:
    """Run a node until SIGTERM or Ctrl-C, logging to stderr; `say` prints its one-line banner."""
    import signal
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    node = Node(config)
    node.start()
    d = config.forward
    say(
        f"listening as {config.ae_title} on {config.host}:{config.port} ({node.model.name} model, "
        f"{config.mode} point); reports go to {d.ae_title}@{d.host}:{d.port}; queue in "
        f"{config.queue}; research tool, not a medical device"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


def _peer(event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def _server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise PneumoscanError("--tls-cert and --tls-key: give both, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise PneumoscanError(f"{exc.filename}: no such file (--tls-cert/--tls-key)") from None
    except ssl.SSLError:
        raise PneumoscanError(
            f"--tls-cert {cert} / --tls-key {key}: not a matching PEM certificate and key"
        ) from None
    return context


def _quiet_libraries() -> None:
    """pynetdicom logs UIDs and dumps datasets; highdicom logs UIDs: keep both out of the log."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
