"""The DICOM objects lungcam sends back for one scan and model: a Comprehensive SR and a Secondary Capture.

Both join the source image's patient and study (highdicom copies the patient and study modules from
the source instance); their UIDs are derived from the source SOP Instance UID, the model name and its
version (worker.pacs.uids), so sending again replaces the same instances instead of adding new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from shared.imaging.dicom import read_dataset
from worker.pacs import uids

if TYPE_CHECKING:
    from highdicom.sr import CodedConcept

MANUFACTURER = "lungcam"
# Series numbers far from a modality's own (1, 2, ...), so the results sort after the images.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
DISCLAIMER = "lungcam research screening aid, not a diagnostic device"


@dataclass(frozen=True)
class ResultObjects:
    """The two instances for one (scan, model, version)."""

    sr: Dataset
    sc: Dataset

    @property
    def sr_uid(self) -> str:
        return str(self.sr.SOPInstanceUID)

    @property
    def sc_uid(self) -> str:
        return str(self.sc.SOPInstanceUID)


# Type 2 attributes of the patient and general study modules: present (possibly empty) in a valid
# instance; some modalities and converters leave them out, and highdicom copies them all.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def read_source(data: bytes) -> Dataset:
    """The source instance's header (no pixel data: only its identifying modules are needed)."""
    source = read_dataset(data, force=True)
    for keyword in _TYPE2_COPIED:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def overlay_pixels(png: bytes) -> np.ndarray:
    """The Grad-CAM overlay PNG as uint8 RGB HxWx3."""
    from PIL import Image

    with Image.open(BytesIO(png)) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _codes() -> dict[str, CodedConcept]:
    from highdicom.sr import CodedConcept

    return {
        "procedure": CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        "finding_type": CodedConcept("840539006", "SCT", "COVID-19"),
        "p_covid": CodedConcept("P-COVID", "99LUNGCAM", "Probability of COVID-19"),
        "unit": CodedConcept("1", "UCUM", "no units"),
        "finding": CodedConcept("121071", "DCM", "Finding"),
        "covid": CodedConcept("840539006", "SCT", "COVID-19"),
        "normal": CodedConcept("17621005", "SCT", "Normal"),
    }


def build_sr(source: Dataset, *, model: str, version: str, label: str, p_covid: float, uid_prefix: str) -> Dataset:
    """A Comprehensive SR (TID 1500 measurement report): P(COVID-19), the finding, the algorithm, the source image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    code = _codes()
    sop_uid, study_uid = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(name=model, version=version, manufacturer=MANUFACTURER)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.derived_uid(uid_prefix, model, version, "device"),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model} {version}"[:64],
        ),
    )
    finding = (
        code["covid"]
        if label == "covid"
        else code["normal"]
        if label == "normal"
        else hd.sr.CodedConcept(label[:16], "99LUNGCAM", label[:64])
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.derived_uid(uid_prefix, sop_uid, model, version, "tracking"), identifier=f"{model} {version}"[:64]
        ),
        finding_type=code["finding_type"],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=code["p_covid"], value=float(p_covid), unit=code["unit"], algorithm_id=algorithm)
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code["finding"], value=finding)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=code["procedure"],
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=uids.sr_series_uid(uid_prefix, study_uid, model, version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance_uid(uid_prefix, sop_uid, model, version),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # an algorithm's preliminary result, not verified by a person
        series_description=f"lungcam {model} {version}"[:64],
    )
    return sr


def build_sc(source: Dataset, overlay_rgb: np.ndarray, *, model: str, version: str, uid_prefix: str) -> Dataset:
    """A Secondary Capture of the Grad-CAM overlay in the source image's patient and study."""
    import highdicom as hd

    sop_uid, study_uid = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series_uid(uid_prefix, study_uid, model, version),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance_uid(uid_prefix, sop_uid, model, version),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"lungcam Grad-CAM {model} {version}"[:64],
    )
    sc.BurnedInAnnotation = "NO"
    sc.ImageComments = DISCLAIMER
    # The source image this overlay was computed from.
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def build_results(
    source: Dataset, overlay_rgb: np.ndarray, *, model: str, version: str, label: str, p_covid: float, uid_prefix: str
) -> ResultObjects:
    """The SR and the Secondary Capture of one scan's result by one model version."""
    import warnings

    # highdicom warns about unusual person names by quoting them: patient data must not reach logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ResultObjects(
            sr=build_sr(source, model=model, version=version, label=label, p_covid=p_covid, uid_prefix=uid_prefix),
            sc=build_sc(source, overlay_rgb, model=model, version=version, uid_prefix=uid_prefix),
        )


def to_bytes(dataset: Dataset) -> bytes:
    """A DICOM Part 10 file of dataset."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
