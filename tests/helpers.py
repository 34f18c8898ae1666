"""Test helpers shared by several test files: DICOM files built from real pixels."""

import io

import numpy as np
from pydicom import uid
from pydicom.config import disable_value_validation
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

SECRETS = ("DOE^JOHN", "SECRET-ID-123")


def dicom_dataset(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 0, **attrs
) -> FileDataset:
    """A DX image holding `pixels`, with patient data that a leak would show."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds = FileDataset("chest.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = SECRETS
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "St Example Hospital"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with disable_value_validation():  # some cases are broken on purpose
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
