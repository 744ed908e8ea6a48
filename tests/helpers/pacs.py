"""Test support for the PACS tests: a real Orthanc on free loopback ports, test DICOMs, a cuttable TCP proxy."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
# Stand-ins for patient data: the listener's and sender's logs must never contain them.
PHI_NAME = "PHIMARKER^TESTPATIENT"
PHI_ID = "PHIMRK4242"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def orthanc_available() -> bool:
    return shutil.which("Orthanc") is not None and any(Path(d, "libOrthancDicomWeb.so").exists() for d in PLUGIN_DIRS)


@dataclass
class Orthanc:
    """A running Orthanc: REST at http_url, DICOMweb at dicomweb_url, C-STORE SCP at aet@127.0.0.1:dicom_port."""

    process: subprocess.Popen
    http_port: int
    dicom_port: int
    aet: str
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    def upload(self, data: bytes) -> dict:
        import requests

        response = requests.post(f"{self.http_url}/instances", data=data, timeout=30)
        response.raise_for_status()
        return response.json()

    def study_instances(self, study_uid: str) -> list[dict]:
        """QIDO-RS records of every instance of a study (empty if the study is unknown)."""
        import requests

        response = requests.get(
            f"{self.dicomweb_url}/studies/{study_uid}/instances",
            params={"includefield": "00080016,0020000E,00080070"},
            timeout=30,
        )
        if response.status_code in (204, 404):
            return []
        response.raise_for_status()
        return response.json() if response.content else []

    def count(self) -> int:
        import requests

        return int(requests.get(f"{self.http_url}/statistics", timeout=30).json()["CountInstances"])


@contextmanager
def run_orthanc(folder: Path, *, modalities: dict | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with a temporary configuration and storage under folder; stop it afterwards."""
    import requests

    plugin_dir = next(d for d in PLUGIN_DIRS if Path(d, "libOrthancDicomWeb.so").exists())
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "lungcam-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [plugin_dir],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        # A re-sent result (same SOP Instance UID) replaces the stored one.
        "OverwriteInstances": True,
        "DicomModalities": modalities or {},
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
        "StorageCompression": False,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    log_path = folder / "orthanc.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(["Orthanc", str(config_path)], stdout=log_file, stderr=subprocess.STDOUT, cwd=folder)
    orthanc = Orthanc(process, http_port, dicom_port, "ORTHANC", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"Orthanc exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{orthanc.http_url}/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Orthanc did not answer /system:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield orthanc
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log_file.close()


def make_study_dicoms(
    count: int, *, seed: int, size: int = 96, per_study: int = 2, modality: str = "DX", study_date: str = "20200315"
) -> list[bytes]:
    """count small synthetic chest DICOMs, per_study to a study, with marker patient data."""
    import pydicom
    from pydicom.uid import generate_uid

    from shared.synthetic import make_dicom, synthetic_xray

    rng = np.random.default_rng(seed)
    files = []
    study_uid = series_uid = None
    for index in range(count):
        if index % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        image = synthetic_xray(rng, size, covid=bool(index % 2)).image
        dataset = pydicom.dcmread(BytesIO(make_dicom(image.astype(np.uint16) * 16, bits_stored=12)))
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.PatientName = PHI_NAME
        dataset.PatientID = f"{PHI_ID}{index // per_study}"
        dataset.PatientBirthDate = "19700101"
        dataset.PatientSex = "O"
        dataset.StudyDate = study_date
        dataset.StudyTime = "120000"
        dataset.AccessionNumber = f"ACC{seed}{index // per_study}"
        dataset.StudyID = "1"
        dataset.ReferringPhysicianName = ""
        dataset.Modality = modality
        dataset.InstanceNumber = index % per_study + 1
        dataset.SeriesNumber = 1
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def sop_uid_of(data: bytes) -> str:
    import pydicom

    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def study_uid_of(data: bytes) -> str:
    import pydicom

    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; stop() makes the target unreachable (refused), start() restores it."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                # shutdown wakes the accept() blocked in the other thread (close alone does not, on Linux).
                try:
                    self._server.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._server.close()
                self._server = None
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def subprocess_env(**lungcam: str) -> dict[str, str]:
    """Our environment without LUNGCAM_* (so nothing leaks in), the worktree first on the path, plus lungcam settings."""
    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"LUNGCAM_{k.upper()}": str(v) for k, v in lungcam.items()})
    return env


def wait_port(port: int, timeout: float = 60, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port (fail early if `process` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


class ListenerProcess:
    """A `lungcam dicom-listen` subprocess on the given port and environment, listening once constructed."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        from helpers import LUNGCAM, REPO

        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [LUNGCAM, "dicom-listen", "--port", str(port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        wait_port(port, process=self.process, log=log_path)

    def log(self) -> str:
        """Everything the listener printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it hangs; closes the log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
