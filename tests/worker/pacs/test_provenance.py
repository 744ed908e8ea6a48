"""Provenance: an image received over DICOM is replaced only over DICOM; results reach the PACS under its own patient and study.

Real SQLite, a real API server, the listener's receiving code, `lungcam ingest`'s code, dicom-send's Sender
and a real Orthanc (C-STORE).
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import redis
import requests
from helpers import redis_url
from helpers.api import b64, running_api
from helpers.pacs import make_study_dicoms, orthanc_available, run_orthanc, sop_uid_of, study_uid_of
from pydicom.uid import generate_uid

from shared.domain import Status
from shared.errors import SubmissionError
from shared.models import Scan
from shared.queueing import make_app
from shared.scans import PredictionRow, mark_scans, upsert_predictions
from shared.settings import Settings
from shared.store import LocalStore, overlay_key, scan_key
from worker.ops.ingest import IngestItem, ingest
from worker.pacs.listener import SUCCESS, Receiver
from worker.pacs.sender import Sender, transport_for

REDIS_URL = os.environ.get("LUNGCAM_TEST_PROVENANCE_REDIS_URL", redis_url(14))
needs_orthanc = pytest.mark.skipif(not orthanc_available(), reason="Orthanc with the DICOMweb plugin is not installed")


def _forgery(original: bytes) -> bytes:
    """The same SOP Instance UID under another patient and study (what a token holder could upload)."""
    dataset = pydicom.dcmread(BytesIO(original))
    dataset.PatientName = "MALLORY^FORGED"
    dataset.PatientID = "FORGED-1"
    dataset.StudyInstanceUID = generate_uid()
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _patient_ids(orthanc) -> set[str]:
    patients = requests.get(f"{orthanc.http_url}/patients", params={"expand": ""}, timeout=30).json()
    return {patient["MainDicomTags"].get("PatientID", "") for patient in patients}


@needs_orthanc
def test_a_dicom_received_scan_is_refused_by_the_api_and_results_go_to_the_original_patient_and_study(tmp_path: Path):
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store_dir = tmp_path / "store"
    original, preregistered = make_study_dicoms(2, seed=91, size=64, per_study=1)
    sop, study = sop_uid_of(original), study_uid_of(original)
    forged = _forgery(original)
    assert sop_uid_of(forged) == sop and study_uid_of(forged) != study
    settings = Settings(database_url=url, store_url=str(store_dir), broker_url=REDIS_URL)
    store = LocalStore(store_dir)
    app = make_app(settings)
    try:
        with running_api(tmp_path / "api", database_url=url, store_url=str(store_dir), broker_url=REDIS_URL) as api:
            # An upload that claims a UID before the modality sends it is replaced by the instance received.
            early = sop_uid_of(preregistered)
            body = {"scan_id": early, "image_base64": b64(_forgery(preregistered))}
            assert api.client.post("/v1/scans", json=body).status_code == 202
            receiver = Receiver(settings, api.sessions, store, app)
            for data in (original, preregistered):
                ids = {"sop_uid": sop_uid_of(data), "study_uid": study_uid_of(data), "series_uid": "1.2.3"}
                assert receiver.receive(data, priority="routine", **ids) == SUCCESS
            assert store.get(scan_key(early)) == preregistered

            # Re-posting a received scan through the API: 409 with and without force, single and batch.
            for force in (True, False):
                response = api.client.post(
                    "/v1/scans", json={"scan_id": sop, "image_base64": b64(forged), "force": force}
                )
                assert response.status_code == 409, response.text
                assert "received over DICOM" in response.json()["detail"] and sop not in response.text
            batch = {
                "scans": [
                    {"scan_id": sop, "image_base64": b64(forged), "force": True},
                    {"scan_id": "innocent-1", "image_base64": b64(forged)},
                ]
            }
            assert api.client.post("/v1/batches", json=batch).status_code == 409
            assert api.client.get("/v1/scans/innocent-1").status_code == 404  # nothing of the batch was recorded
            # ...and through `lungcam ingest --force` (a CSV naming the UID as scan_id).
            (tmp_path / "forged.dcm").write_bytes(forged)
            with pytest.raises(SubmissionError, match="received over DICOM"):
                ingest(
                    [IngestItem(sop, str(tmp_path / "forged.dcm"))],
                    store=store,
                    sessions=api.sessions,
                    app=app,
                    force=True,
                )
            assert store.get(scan_key(sop)) == original
            with api.sessions() as session:
                scan = session.get(Scan, sop)
                assert (scan.study_uid, scan.sop_instance_uid, scan.source_uri) == (study, sop, scan_key(sop))

            # A worker classified it; dicom-send files the results into the PACS.
            png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes()
            store.put(overlay_key("m", "1", sop), png)
            with api.sessions.begin() as session:
                upsert_predictions(
                    session,
                    [
                        PredictionRow(
                            scan_id=sop,
                            model_name="m",
                            model_version="1",
                            label="covid",
                            p_covid=0.8,
                            overlay_key=overlay_key("m", "1", sop),
                        )
                    ],
                )
                mark_scans(session, [sop], Status.DONE, finished=True)
            with run_orthanc(tmp_path / "orthanc") as orthanc:
                sender_settings = Settings(
                    database_url=url,
                    store_url=str(store_dir),
                    dicom_destination=f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                )
                sender = Sender(sender_settings, api.sessions, store, transport_for(sender_settings))
                counts = sender.run_once()
                assert (counts.sent, counts.retry, counts.failed) == (1, 0, 0), counts.errors
                filed = orthanc.study_instances(study)
                assert {record["00080016"]["Value"][0] for record in filed} == {
                    "1.2.840.10008.5.1.4.1.1.88.33",
                    "1.2.840.10008.5.1.4.1.1.7",
                }  # the SR and the Secondary Capture
                assert orthanc.study_instances(study_uid_of(forged)) == []
                original_patient = str(pydicom.dcmread(BytesIO(original), stop_before_pixels=True).PatientID)
                assert _patient_ids(orthanc) == {original_patient}
    finally:
        app.close()
        client.flushdb()
