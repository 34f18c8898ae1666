"""DICOM out: a screening result as objects a PACS stores in the source image's own study.

`structured_report` is a TID 1500 measurement report (highdicom) with one measurement group:
the finding Pneumonia present or absent at the operating point, the calibrated probability,
the threshold, the algorithm (TID 4019) and the image's domain. `secondary_capture` is the
X-ray with its Grad-CAM heatmap and the result burned in. Both copy the source's patient and
study attributes exactly (character set included) and take deterministic UIDs under one root,
so scoring the same image again replaces its outputs instead of adding copies.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumoscan import __version__, domain
from pneumoscan.errors import PneumoscanError

if TYPE_CHECKING:
    from pydicom import Dataset

    from pneumoscan.model_folder import ModelCard
    from pneumoscan.screening import Prediction

MANUFACTURER = "pneumoscan"
# pydicom's root, under which its users may make UIDs; an integrator passes their own.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
NOT_FOR_DIAGNOSIS = "not for diagnostic use"
SERIES = {  # output type -> (series number, series description)
    "sr": (9901, f"pneumoscan AI report - {NOT_FOR_DIAGNOSIS}"),
    "sc": (9902, f"pneumoscan heatmap - {NOT_FOR_DIAGNOSIS}"),
}
OUTPUTS = tuple(SERIES)
# The image kinds a chest X-ray arrives as; anything else is refused at association.
IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# The SR's words for each domain outcome: a code meaning holds at most 64 characters.
DOMAIN_TEXT = {
    domain.IN_DOMAIN: "like the training images",
    domain.SHIFTED: "unlike the training images: less reliable",
    domain.NOT_CHEST_XRAY: "not a chest X-ray: no finding made",
}
_SCHEME = "99PNEUMOSCAN"  # a private coding scheme (99...) for concepts no standard names


def _private(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=_SCHEME, meaning=meaning)


def domain_of(result: Prediction) -> str:
    """The result's domain outcome (a result made without one: from its guard flag)."""
    if result.domain:
        return result.domain
    return domain.NOT_CHEST_XRAY if result.ood else domain.IN_DOMAIN


def read_source(data: bytes) -> Dataset | None:
    """The header of a DICOM image (no pixels), or None when `data` is not a DICOM image with
    the UIDs an output must reference (SOP class and instance, series, study)."""
    import pydicom

    from pneumoscan.reader import quiet_pydicom

    if data[128:132] != b"DICM":
        return None
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            required = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
            if not all(ds.get(keyword) for keyword in required):
                return None
            return ds
    except Exception:
        return None


def made_here(ds: Dataset) -> bool:
    """Whether pneumoscan made this object: such objects are never scored (no routing loops)."""
    return str(ds.get("Manufacturer", "")) == MANUFACTURER


def output_uid(root: str, *parts: str) -> str:
    """A UID under `root` fixed by `parts`: the same source and output type give the same UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=root, entropy_srcs=list(parts)))


def _check_root(root: str) -> str:
    prefix = root if root.endswith(".") else root + "."
    if not re.fullmatch(r"((0|[1-9][0-9]*)\.)+", prefix) or len(prefix) > 40:
        raise PneumoscanError(f"--uid-root {root!r}: not a valid UID root (digits and dots, <= 40)")
    return prefix


@dataclass
class Reporter:
    """Builds a source image's DICOM outputs from its screening result."""

    card: ModelCard
    outputs: tuple[str, ...] = ("sr",)
    uid_root: str = DEFAULT_UID_ROOT

    def __post_init__(self) -> None:
        self.uid_root = _check_root(self.uid_root)
        unknown = sorted(set(self.outputs) - set(OUTPUTS))
        if unknown or not self.outputs:
            raise PneumoscanError(
                f"--outputs {','.join(self.outputs)!r}: choose from {', '.join(OUTPUTS)}"
            )

    def _uids(self, source: Dataset, kind: str) -> dict:
        series_number, description = SERIES[kind]
        key = (self.card.name, kind)
        return {
            "series_instance_uid": output_uid(self.uid_root, str(source.StudyInstanceUID), *key),
            "series_number": series_number,
            "sop_instance_uid": output_uid(self.uid_root, str(source.SOPInstanceUID), *key),
            "instance_number": int(source.get("InstanceNumber") or 1),
            "SeriesDescription": description,
        }

    def build(self, source: Dataset, result: Prediction) -> list[tuple[str, Dataset]]:
        """Every requested output for a scored image: the SR always (it says why when no finding
        is made), the SC where there is a heatmap to show."""
        objects = [("sr", self.structured_report(source, result))] if "sr" in self.outputs else []
        if "sc" in self.outputs and result.heatmap_png is not None and result.label is not None:
            objects.append(("sc", self.secondary_capture(source, result.heatmap_png)))
        return objects

    def structured_report(self, source: Dataset, result: Prediction) -> Dataset:
        """The TID 1500 report of `result` for `source`, in `source`'s study."""
        import highdicom as hd
        from highdicom.sr import (
            AlgorithmIdentification,
            CodedConcept,
            DeviceObserverIdentifyingAttributes,
            FindingSite,
            Measurement,
            MeasurementReport,
            MeasurementsAndQualitativeEvaluations,
            ObservationContext,
            ObserverContext,
            QualitativeEvaluation,
            SourceImageForMeasurementGroup,
            TrackingIdentifier,
        )
        from pydicom.sr.codedict import codes

        source = _complete(source)
        uids = self._uids(source, "sr")
        pneumonia = CodedConcept("233604007", "SCT", "Pneumonia")
        unit = CodedConcept("1", "UCUM", "no units")
        algorithm = AlgorithmIdentification(
            name=f"pneumoscan {self.card.name}",
            version=__version__,
            parameters=[f"operating point {result.mode}", f"threshold {result.threshold:.4f}"],
            manufacturer=MANUFACTURER,
        )
        outcome = domain_of(result)
        evaluations = [
            QualitativeEvaluation(
                _private("DOMAIN", "Image domain"),
                _private(outcome.upper()[:16], DOMAIN_TEXT[outcome]),
            ),
            QualitativeEvaluation(
                _private("OPPOINT", "Operating point"),
                _private(result.mode.upper(), f"{result.mode} operating point"),
            ),
        ]
        measurements = [
            Measurement(_private("THRESHOLD", "Decision threshold"), result.threshold, unit),
        ]
        if outcome != domain.NOT_CHEST_XRAY:
            present = result.label == self.card.class_names[1]
            evaluations.insert(
                0,
                QualitativeEvaluation(
                    pneumonia, codes.SCT.Present if present else codes.SCT.Absent
                ),
            )
            measurements.insert(
                0,
                Measurement(
                    _private("PPNEU", "Probability of pneumonia"),
                    float(result.probability),
                    unit,
                    algorithm_id=algorithm,
                ),
            )
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=output_uid(self.uid_root, str(source.SOPInstanceUID), "group"),
                identifier="pneumonia screening",
            ),
            finding_type=pneumonia,
            algorithm_id=algorithm,
            finding_sites=[FindingSite(CodedConcept("39607008", "SCT", "Lung structure"))],
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        )
        device = ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=output_uid(self.uid_root, "device", self.card.name),
                name=f"pneumoscan {self.card.name}",
                manufacturer_name=MANUFACTURER,
                model_name=self.card.name,
            ),
        )
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=device),
            procedure_reported=CodedConcept("399208008", "SCT", "Plain chest X-ray"),
            imaging_measurements=[group],
        )
        with _quiet_highdicom():
            sr = hd.sr.ComprehensiveSR(
                evidence=[source],
                content=report[0],
                series_instance_uid=uids["series_instance_uid"],
                series_number=uids["series_number"],
                sop_instance_uid=uids["sop_instance_uid"],
                instance_number=uids["instance_number"],
                manufacturer=MANUFACTURER,
                is_complete=True,
                is_final=False,
                is_verified=False,
            )
        return _finish(sr, source, uids["SeriesDescription"])

    def secondary_capture(self, source: Dataset, overlay_png: bytes) -> Dataset:
        """The X-ray with its heatmap and result burned in, as a Secondary Capture image."""
        import highdicom as hd
        from PIL import Image

        source = _complete(source)
        uids = self._uids(source, "sc")
        rgb = np.asarray(Image.open(io.BytesIO(overlay_png)).convert("RGB"))
        with _quiet_highdicom():
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=rgb,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=uids["series_instance_uid"],
                series_number=uids["series_number"],
                sop_instance_uid=uids["sop_instance_uid"],
                instance_number=uids["instance_number"],
                manufacturer=MANUFACTURER,
                patient_orientation=_orientation(source),
                transfer_syntax_uid="1.2.840.10008.1.2.1",
            )
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = source.get("Laterality", "")  # type 2C; a chest is not a paired part
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = "Grad-CAM heatmap of the pneumonia score over the source X-ray"
        return _finish(sc, source, uids["SeriesDescription"])


# Patient and study attributes an SR or SC must carry, empty when unknown (type 2); real files
# often lack some, and highdicom reads them from the source.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _complete(source: Dataset) -> Dataset:
    """A copy of the source header with every type 2 attribute present (empty where missing)."""
    import copy

    filled = copy.deepcopy(source)
    for keyword in _TYPE2:
        if keyword not in filled:
            setattr(filled, keyword, "")
    return filled


def _orientation(source: Dataset) -> tuple[str, str]:
    found = source.get("PatientOrientation")
    if found and len(found) == 2 and all(found):
        return str(found[0]), str(found[1])
    return ("L", "F")  # a frontal chest film as viewed: patient's left on the right, feet down


def _finish(ds: Dataset, source: Dataset, description: str) -> Dataset:
    """Copy what highdicom leaves out (character set, study and patient extras); label the series."""
    for keyword in (
        "SpecificCharacterSet",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        if keyword in source:
            ds[keyword] = source[keyword]
        elif keyword == "SpecificCharacterSet" and keyword in ds:
            del ds[keyword]
    ds.SeriesDescription = description
    return ds


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs UIDs at INFO while it builds; keep it to warnings, which quote none."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_folder(reporter: Reporter, results: list[Prediction], folder: Path) -> tuple[int, int]:
    """Write the outputs of every scored DICOM input into `folder` (the folder-in/folder-out way
    of MONAI Deploy apps): STEM.sr.dcm, STEM.sc.dcm. Returns (objects written, inputs skipped:
    not DICOM, unreadable, or made by pneumoscan)."""
    check_folder(folder)
    written = skipped = 0
    for result in results:
        source = None
        if result.error is None:
            try:
                source = read_source(Path(result.file).read_bytes())
            except OSError:
                source = None
        if source is None or made_here(source):
            skipped += 1
            continue
        for kind, ds in reporter.build(source, result):
            write_exclusive(folder, f"{Path(result.file).stem}.{kind}", encode(ds))
            written += 1
    return written, skipped


def check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise PneumoscanError(f"--dicom-out {folder}: exists and is not a folder")


def encode(ds: Dataset) -> bytes:
    """The object as a DICOM file (preamble, file meta), ready to store or send."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_exclusive(folder: Path, stem: str, content: bytes) -> Path:
    """Write `content` as FOLDER/STEM.dcm, or STEM-2.dcm, ...: never over a file already there."""
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / f"{stem}.dcm", 1
    while True:
        try:
            with target.open("xb") as handle:
                handle.write(content)
            return target
        except FileExistsError:
            n += 1
            target = folder / f"{stem}-{n}.dcm"
