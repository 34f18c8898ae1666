"""`pneumoscan listen` on a real DICOM network: dcmtk plays the modality and the PACS, Orthanc
routes, dciodvfy validates. Every part is a real program on loopback ports; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, dicom_dataset, free_port, listening, wait_for
from pydicom import uid

from pneumoscan import reader

TOOLS = ("storescu", "echoscu", "storescp", "dsrdump", "dcmcjpeg", "dciodvfy")
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PLANTED = {
    "PatientName": "Müller^Jörg",
    "PatientID": "PID-5550123",
    "PatientBirthDate": "19710203",
    "AccessionNumber": "ACC-7781234",
}
LEAKS = ("Müller", "Jörg", "Muller", "PID-5550123", "19710203", "ACC-7781234")
STUDY = "1.2.826.0.1.3680043.8.498.1.42.7"

_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing and os.environ.get("CI"):
    pytest.fail(f"CI lacks {', '.join(_missing)}: make dicom-tools installs them", pytrace=False)
pytestmark = [
    pytest.mark.slow,  # real processes on the network: about a minute in all
    pytest.mark.skipif(
        bool(_missing), reason=f"not installed: {', '.join(_missing)} (make dicom-tools)"
    ),
]


def _source(pixels: np.ndarray, number: int, **attrs) -> pydicom.Dataset:
    ds = dicom_dataset(pixels, **attrs)
    ds.update(
        {
            "SpecificCharacterSet": "ISO_IR 192",
            "StudyInstanceUID": STUDY,
            "SeriesInstanceUID": STUDY + ".1",
            "StudyID": "S42",
            "StudyDate": "20261130",
            "StudyTime": "101500",
            "ReferringPhysicianName": "",
            "PatientSex": "F",
            "SeriesNumber": 1,
            "InstanceNumber": number,
            "Manufacturer": "ACME",
            **PLANTED,
        }
    )
    return ds


@pytest.fixture(scope="module")
def study(xray_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One study of three real X-rays: a DX, a JPEG-lossless DX (dcmtk) and a CR."""
    folder = tmp_path_factory.mktemp("study")
    pneumonia = reader.read_image(xray_files[3])
    normal = reader.read_image(xray_files[0])
    plain = folder / "dx.dcm"
    plain.write_bytes(dicom_bytes(_source(pneumonia, 1)))
    raw = folder / "raw.dcm"
    raw.write_bytes(dicom_bytes(_source(normal, 2)))
    compressed = folder / "dx-jpeg-lossless.dcm"
    subprocess.run(["dcmcjpeg", str(raw), str(compressed)], check=True)
    raw.unlink()
    cr = _source(reader.read_image(xray_files[4]), 3)
    cr.SOPClassUID = cr.file_meta.MediaStorageSOPClassUID = uid.ComputedRadiographyImageStorage
    cr.Modality = "CR"
    (folder / "cr.dcm").write_bytes(dicom_bytes(cr))
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def expected(study: list[Path]) -> dict[str, dict]:
    """`pneumoscan predict --json` for the same files, keyed by SOP Instance UID."""
    out = subprocess.run(
        [sys.executable, "-m", "pneumoscan", "predict", *map(str, study), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    return {str(pydicom.dcmread(r["file"]).SOPInstanceUID): r for r in rows}


class StoreSCP:
    """dcmtk's storescp as the PACS: every object it receives lands in `folder`."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.log = folder.parent / f"{folder.name}.log"
        self.process = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(exist_ok=True)
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                ["storescp", "-aet", "PACS", "-od", str(self.folder), str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: _echo(self.port, "PACS"), 30, "storescp")
        return self

    def __exit__(self, *_) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def objects(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]


def _echo(port: int, called: str, calling: str = "ECHOSCU") -> bool:
    run = subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)], capture_output=True
    )
    return run.returncode == 0


def _store(port: int, files: list[Path], calling: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-R", "-xs", "-aet", calling, "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
    )


def _items(ds: pydicom.Dataset) -> list[tuple[str, pydicom.Dataset]]:
    """Every SR content item under `ds`, as (concept name, item), depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found.append((item.ConceptNameCodeSequence[0].CodeMeaning, item))
        found += _items(item)
    return found


def _report(sr: pydicom.Dataset) -> dict:
    items = _items(sr)
    out = {"source": None, "evaluations": {}, "numbers": {}}
    for name, item in items:
        if item.ValueType == "CODE":
            out["evaluations"][name] = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            out["numbers"][name] = float(value.NumericValue)
            out["unit"] = value.MeasurementUnitsCodeSequence[0].CodeValue
        elif item.ValueType == "IMAGE":
            out["source"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return out


def _no_leaks(*logs: Path, uids: list[str] = ()) -> None:
    for log in logs:
        text = log.read_text(errors="replace")
        for secret in (*LEAKS, *uids):
            assert secret not in text, f"{secret!r} reached {log.name}"


def _validate(path: Path) -> list[str]:
    """dciodvfy's warnings for a file; fails on any error."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}: {errors}"
    return [line for line in lines if line.startswith("Warning")]


def test_reports_reach_the_pacs_in_the_source_study(
    study: list[Path], expected: dict[str, dict], tmp_path: Path
) -> None:
    log = tmp_path / "node.log"
    with StoreSCP(tmp_path / "pacs") as pacs:
        options = ["--forward", f"PACS@127.0.0.1:{pacs.port}", "--outputs", "sr,sc"]
        with listening([*options, "--queue", str(tmp_path / "queue")], log) as port:
            assert _echo(port, "PNEUMOSCAN")
            sent = _store(port, study)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            scored = sum(r["label"] is not None for r in expected.values())
            wait_for(lambda: len(list(pacs.folder.iterdir())) >= 3 + scored, 120, "reports", log)
        objects = pacs.objects()
    srs = [o for o in objects if o.Modality == "SR"]
    scs = [o for o in objects if o.SOPClassUID == uid.SecondaryCaptureImageStorage]
    assert len(srs) == 3 and len(scs) == scored
    sources = {str(s.SOPInstanceUID): s for s in map(pydicom.dcmread, study)}
    for sr in srs:
        report = _report(sr)
        want = expected[report["source"]]
        assert report["evaluations"]["Pneumonia"] == (
            "Present" if want["label"] == "PNEUMONIA" else "Absent"
        )
        assert report["numbers"]["Probability of pneumonia"] == pytest.approx(
            want["probability"], abs=1e-9
        )
        assert report["numbers"]["Decision threshold"] == pytest.approx(want["threshold"], abs=1e-9)
        assert report["evaluations"]["Operating point"] == "detection operating point"
        assert report["unit"] == "1"
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
        assert "not for diagnostic use" in sr.SeriesDescription
    source = next(iter(sources.values()))  # every image is of one study and one patient
    for made in [*srs, *scs]:
        for keyword in (
            "StudyInstanceUID",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "StudyID",
        ):
            assert made[keyword].value == source[keyword].value, keyword
        assert str(made.PatientName) == PLANTED["PatientName"]
        assert made.SpecificCharacterSet == "ISO_IR 192"
        assert made.SeriesInstanceUID != source.SeriesInstanceUID
        assert made.SOPInstanceUID.startswith("1.2.826.0.1.3680043.8.498.")
    # One new series per output type, shared by the study's images.
    assert (
        len({o.SeriesInstanceUID for o in srs}) == 1
        and len({o.SeriesInstanceUID for o in scs}) == 1
    )
    assert len({o.SOPInstanceUID for o in objects}) == len(objects)
    for sc in scs:
        assert sc.BurnedInAnnotation == "YES" and sc.SamplesPerPixel == 3
    warnings = set()
    for path in sorted(pacs.folder.iterdir()):
        warnings.update(_validate(path))
    # What dciodvfy warns of, listed: the private coding scheme, Laterality left empty (a chest
    # is not a paired part, yet dciodvfy errs when it is absent).
    assert all("99PNEUMOSCAN" in w or "Laterality" in w for w in warnings), warnings
    dumped = subprocess.run(
        ["dsrdump", str(next(p for p in pacs.folder.iterdir() if p.name.startswith("SR")))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Probability of pneumonia" in dumped and '(233604007,SCT,"Pneumonia")' in dumped
    _no_leaks(log, uids=list(sources))


def test_nothing_is_lost_when_the_pacs_is_down_or_the_node_restarts(
    study: list[Path], tmp_path: Path
) -> None:
    log, queue = tmp_path / "node.log", tmp_path / "queue"
    pacs_port = free_port()
    options = [
        "--forward",
        f"PACS@127.0.0.1:{pacs_port}",
        "--queue",
        str(queue),
        "--retry-max",
        "1",
    ]
    with listening(options, log) as port:
        assert _store(port, study[:2]).returncode == 0
        wait_for(lambda: len(list((queue / "outgoing").glob("*.dcm"))) == 2, 120, "2 results", log)
        wait_for(lambda: "retrying" in log.read_text(), 30, "a retry", log)
        # The same instance again: acknowledged, not scored twice.
        assert _store(port, study[:1]).returncode == 0
        wait_for(lambda: "received again" in log.read_text(), 30, "the duplicate", log)
    assert "2 result(s) wait" in log.read_text()  # flushed to disk at SIGTERM
    with StoreSCP(tmp_path / "pacs", pacs_port) as pacs, listening(options, log) as port:
        wait_for(lambda: len(list(pacs.folder.iterdir())) == 2, 60, "delivery", log)
        assert _store(port, study[:1]).returncode == 0  # seen before the restart too
        wait_for(lambda: log.read_text().count("received again") == 2, 30, "the duplicate", log)
    objects = pacs.objects()
    assert sorted(o.Modality for o in objects) == ["SR", "SR"]
    assert len({o.SOPInstanceUID for o in objects}) == 2
    assert list((queue / "outgoing").glob("*.dcm")) == []
    _no_leaks(log)


def test_bad_input_leaves_the_node_alive(study: list[Path], tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    pixels = reader.read_image(study[0])
    ct = _source(pixels, 7)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = uid.CTImageStorage
    no_pixels = _source(pixels, 8)
    del no_pixels.PixelData
    cut = _source(pixels, 9)
    cut.PixelData = cut.PixelData[:1000]
    files = {}
    for name, ds in {"ct": ct, "no-pixels": no_pixels, "cut": cut}.items():
        files[name] = tmp_path / f"{name}.dcm"
        files[name].write_bytes(dicom_bytes(ds))
    with StoreSCP(tmp_path / "pacs") as pacs:
        options = ["--forward", f"PACS@127.0.0.1:{pacs.port}", "--queue", str(tmp_path / "q")]
        with listening(options, log) as port:
            refused = _store(port, [files["ct"]])
            assert (
                refused.returncode != 0
            )  # no presentation context for CT: refused in the association
            for name in ("no-pixels", "cut"):
                assert _store(port, [files[name]]).returncode == 0
            wait_for(lambda: log.read_text().count("; no report") == 2, 60, "two refusals", log)
            # Ten associations at once, then the node still scores.
            runs = [None] * 10

            def send(i: int) -> None:
                copy = _source(pixels, 20 + i)
                path = tmp_path / f"copy-{i}.dcm"
                path.write_bytes(dicom_bytes(copy))
                runs[i] = _store(port, [path], calling=f"MOD{i}")

            threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs if r.returncode]
            wait_for(lambda: len(list(pacs.folder.iterdir())) == 10, 180, "ten reports", log)
            assert _echo(port, "PNEUMOSCAN")
    text = log.read_text()
    assert "DICOM file has no pixel data" in text and "broken or truncated DICOM" in text
    _no_leaks(log)


def test_own_secondary_capture_sent_back_is_not_scored(study: list[Path], tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    with StoreSCP(tmp_path / "pacs") as pacs:
        options = ["--forward", f"PACS@127.0.0.1:{pacs.port}", "--outputs", "sc,sr"]
        with listening([*options, "--queue", str(tmp_path / "q")], log) as port:
            assert _store(port, study[:1]).returncode == 0
            wait_for(lambda: len(list(pacs.folder.iterdir())) == 2, 120, "SR and SC", log)
            sc = next(p for p in pacs.folder.iterdir() if p.name.startswith("SC"))
            assert _store(port, [sc]).returncode == 0
            wait_for(lambda: "made by pneumoscan" in log.read_text(), 30, "the loop guard", log)
    assert len(list(pacs.folder.iterdir())) == 2


def test_allow_list_refuses_other_calling_ae_titles(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    options = [
        "--forward",
        "PACS@127.0.0.1:9",
        "--allow",
        "MODALITY,CT1",
        "--queue",
        str(tmp_path / "q"),
    ]
    with listening(options, log) as port:
        assert _echo(port, "PNEUMOSCAN", calling="MODALITY")
        assert not _echo(port, "PNEUMOSCAN", calling="INTRUDER")
        wait_for(lambda: "refused" in log.read_text(), 10, "the refusal in the log", log)
    assert "'INTRUDER' is not in --allow" in log.read_text()


def test_tls_only_answers_tls(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    import ssl

    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False
    options = ["--forward", "PACS@127.0.0.1:9", "--tls-cert", str(cert), "--tls-key", str(key)]
    with listening([*options, "--queue", str(tmp_path / "q")], tmp_path / "node.log") as port:
        ae = AE(ae_title="CLIENT")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN", tls_args=(client, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert not _echo(port, "PNEUMOSCAN")  # plain DICOM is not answered


@pytest.mark.skipif(
    not (Path(ORTHANC).exists() and DICOMWEB.exists()),
    reason="Orthanc or its DICOMweb plugin missing",
)
def test_orthanc_routes_to_the_node_and_stores_sr_and_sc(study: list[Path], tmp_path: Path) -> None:
    """storescu -> Orthanc -> (Lua auto-routing) -> pneumoscan -> Orthanc; QIDO-RS shows it all."""
    dicom_port, http_port, node_port = free_port(), free_port(), free_port()
    lua = tmp_path / "route.lua"
    lua.write_text(
        "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
        "  if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] ~= 'PNEUMOSCAN' then\n"
        "    SendToModality(instanceId, 'pneumoscan')\n"
        "  end\n"
        "end\n"
    )
    config = {
        "Name": "pneumoscan-test",
        "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"pneumoscan": ["PNEUMOSCAN", "127.0.0.1", node_port]},
        "LuaScripts": [str(lua)],
        "Plugins": [str(DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    orthanc_log = tmp_path / "orthanc.log"
    with orthanc_log.open("w") as out:
        orthanc = subprocess.Popen(
            [ORTHANC, str(tmp_path / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{http_port}"
    node_log = tmp_path / "node.log"
    try:
        wait_for(lambda: _echo(dicom_port, "ORTHANC"), 60, "Orthanc", orthanc_log)
        options = ["--forward", f"ORTHANC@127.0.0.1:{dicom_port}", "--outputs", "sr,sc"]
        with listening([*options, "--queue", str(tmp_path / "q")], node_log, port=node_port):
            sent = subprocess.run(
                ["storescu", "-R", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port), str(study[0])],
                capture_output=True,
                text=True,
            )
            assert sent.returncode == 0, sent.stderr

            def modalities() -> list[str]:
                series = httpx.get(f"{base}/dicom-web/studies/{STUDY}/series", timeout=10)
                if series.status_code != 200:
                    return []
                return sorted(s["00080060"]["Value"][0] for s in series.json())

            sent_modality = pydicom.dcmread(study[0]).Modality
            want = sorted([sent_modality, "OT", "SR"])  # the X-ray, the SC, the SR
            wait_for(lambda: modalities() == want, 180, f"{want} in Orthanc", node_log)
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
    _no_leaks(node_log)
