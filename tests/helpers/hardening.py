"""Support for the hardening tests: hostile DICOMs, peak-memory measurement, a `lungcam dicom-listen` subprocess.

The deflate bomb is made by streaming zlib over 16 MB slices of zeros: nothing here holds the
inflated bytes. Memory is measured from /proc: a process's peak resident size (VmHWM) is reset by
writing 5 to /proc/<pid>/clear_refs, so "peak above idle" is VmHWM after the work minus VmRSS before it.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


def image_header(rows: int, columns: int, *, bits: int = 16, frames: int = 1) -> Dataset:
    """A DX For Presentation header (no pixel data) with fresh UIDs."""
    ds = Dataset()
    ds.SOPClassUID = DX_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "BOMB^TEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _file_meta(dataset: Dataset, transfer_syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue()


def _explicit_body(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)
def deflate_bomb(rows: int = 22600, columns: int = 22600, *, bits: int = 16, pixel_bytes: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose zero pixel data inflates to rows x columns x bits/8 bytes.

    22600 x 22600 x 16 bit: about 1 MB on disk, 1 GB (1,021,520,000 bytes) inflated. pixel_bytes
    overrides how many zero bytes really follow (fewer: pixel data shorter than the element says).
    """
    dataset = image_header(rows, columns, bits=bits)
    declared = rows * columns * bits // 8
    actual = declared if pixel_bytes is None else pixel_bytes
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(_explicit_body(dataset) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, declared))]
    zeros = bytes(16 * 1024 * 1024)
    left = actual
    while left > 0:
        step = min(left, len(zeros))
        parts.append(compressor.compress(zeros[:step]))
        left -= step
    parts.append(compressor.flush())
    return _file_meta(dataset, DeflatedExplicitVRLittleEndian) + b"".join(parts)


def plain_dicom(dataset: Dataset, pixel_data: bytes | None) -> bytes:
    """An Explicit VR Little Endian Part 10 file of dataset plus (when given) pixel_data as it is, whatever the header says."""
    body = _explicit_body(dataset)
    if pixel_data is not None:
        padded = pixel_data + (b"\0" if len(pixel_data) % 2 else b"")
        body += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(padded)) + padded
    return _file_meta(dataset, ExplicitVRLittleEndian) + body


def lying_headers() -> dict[str, bytes]:
    """Instances the listener must refuse: no pixel data, short pixel data, a 60000 x 60000 header."""
    small = image_header(64, 64)
    huge = image_header(60000, 60000)
    return {
        "no pixel data": plain_dicom(image_header(64, 64), None),
        "short pixel data": plain_dicom(small, bytes(64 * 64)),  # half of 64 x 64 x 2 bytes
        "60000x60000": plain_dicom(huge, bytes(4096)),
    }


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (a worker's decode processes, the API's workers)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return [pid, *(child.pid for child in process.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _status_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


class PeakMemory:
    """Peak resident memory above the idle level, per process of a tree, over a `with` block.

    On entry each process's high-water mark is reset (clear_refs 5) and its current RSS taken as
    its idle level; on exit the growth is VmHWM minus that level. Processes that start inside the
    block (none here) are not counted.
    """

    def __init__(self, root_pid: int | None = None) -> None:
        self.root_pid = root_pid or os.getpid()
        self.idle: dict[int, int] = {}
        self.growth: dict[int, int] = {}

    def __enter__(self) -> PeakMemory:
        for pid in tree_pids(self.root_pid):
            with open(f"/proc/{pid}/clear_refs", "w") as clear:
                clear.write("5")
            self.idle[pid] = _status_bytes(pid, "VmRSS")
        return self

    def __exit__(self, *_exc: object) -> None:
        for pid, idle in self.idle.items():
            try:
                self.growth[pid] = _status_bytes(pid, "VmHWM") - idle
            except (OSError, AssertionError):
                pass

    def max_growth(self) -> int:
        """The largest growth of any process of the tree (bytes)."""
        return max(self.growth.values(), default=0)


MB = 1024 * 1024
