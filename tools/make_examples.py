"""Copy the example X-rays that ship in the package (src/pneumoscan/examples/) from the Kermany
test split, and write one of them as a DICOM file, so that a first run needs no data set.

    python tools/make_examples.py DATA_DIR

Six test images, three patients of each class, as the data set holds them (224 px JPEG, CC BY 4.0), and
`person100_bacteria_475.dcm`: that X-ray as a DX image (8-bit MONOCHROME2, explicit VR little
endian) with a made-up patient and fixed UIDs, so `predict --dicom-out` can be tried too.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pneumoscan import reader, shift

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "examples"
# The first image of the first three patients of each class, in the split's name order (none
# picked for how it scores).
FILES = {
    "NORMAL": ["IM-0001-0001.jpeg", "IM-0003-0001.jpeg", "IM-0005-0001.jpeg"],
    "PNEUMONIA": [
        "person100_bacteria_475.jpeg",
        "person101_bacteria_483.jpeg",
        "person102_bacteria_487.jpeg",
    ],
}
DICOM_OF = "person100_bacteria_475.jpeg"
ROOT = "1.2.826.0.1.3680043.8.498.77301."  # pydicom's UID root, this file's own branch


def main(data_root: Path) -> None:
    EXAMPLES.mkdir(exist_ok=True)
    for label, names in FILES.items():
        for name in names:
            shutil.copyfile(data_root / "test" / label / name, EXAMPLES / name)
    ds = shift.dx_dataset(reader.read_image(EXAMPLES / DICOM_OF), "MONOCHROME2", 8)
    uids = {"StudyInstanceUID": "1", "SeriesInstanceUID": "1.1", "SOPInstanceUID": "1.1.1"}
    for keyword, suffix in uids.items():
        setattr(ds, keyword, ROOT + suffix)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientSex = "EXAMPLE^CHILD", "EXAMPLE-1", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20180222", "120000", "EXAMPLE"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "AP"
    ds.ImageComments = "Kermany et al. (2018), test/PNEUMONIA/person100_bacteria_475, CC BY 4.0"
    ds.save_as(EXAMPLES / DICOM_OF.replace(".jpeg", ".dcm"), enforce_file_format=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
