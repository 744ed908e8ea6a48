"""DICOM headers: read once, through a bounded inflater, into the facts selection, admission and decoding need.

`read_dicom` parses only the tags listed here (never names, IDs, dates) and stops before the pixel
data, noting where it lies; `check_pixel_data` refuses, from those facts alone, what declares more
than the limits or less pixel data than its size; `read_pixel_data` later reads the pixel data from
where the header parse stopped, without parsing the header again. `selection_reason` says, from the
header, why a valid image is not a frontal chest radiograph, so the worker can mark the scan `skipped`.

pydicom's own reader inflates a whole Deflated Explicit VR Little Endian data set into memory
before reading a single element, so this one uses pydicom's element parsers (read_preamble, the file
meta reader, read_dataset) over a `_BoundedInflater` instead: a deflate bomb is refused before its
bytes exist.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
import pydicom.uid
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from shared.imaging.limits import ImageDecodeError, check_size

# The pixel data a DICOM may declare (all frames, uncompressed: Rows x Columns x SamplesPerPixel x
# BitsAllocated/8 x NumberOfFrames). A 16-bit grey frame at MAX_IMAGE_PIXELS is 240 MB. Checked
# from the header before the pixel bytes are read or, for Deflated Explicit VR Little Endian,
# before they are inflated: a 1 MB deflate bomb declaring 1 GB costs nothing.
MAX_PIXEL_DATA_BYTES: int = 256 * 1024 * 1024
# Everything before the pixel data that a deflated data set may inflate to (overlays, private
# blobs); skipped elements are inflated in small chunks and dropped, so this bounds CPU, not memory.
MAX_DEFLATED_HEADER_BYTES: int = 64 * 1024 * 1024

DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128  # after the preamble
# Value representations that may follow a tag in an explicit-VR file (PS3.5 table 6.2-1).
DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
GREY_PHOTOMETRICS = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom converts the YBR family to RGB while decoding (pixel_array's default as_rgb=True).
COLOUR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
PALETTE_PHOTOMETRIC = "PALETTE COLOR"
UNDEFINED_LENGTH = 0xFFFFFFFF  # an encapsulated (compressed) Pixel Data element

# Study/series/instance UIDs identify images, not people; they are needed to write results back
# to a PACS. Nothing that names, dates or locates the patient is read.
HEADER_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "PatientOrientation",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "Manufacturer",  # a device maker, not patient data: lungcam's own results are recognised by it
)
# The elements needed to render pixels. Patient and study identifiers never enter a data set read
# here, so no warning, log line or repr made from it can carry them; large private and overlay
# elements are skipped, not parsed.
PIXEL_TAGS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
)
# Float, double float and (integer) Pixel Data: where the header ends.
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_PIXEL_DATA = 0x7FE00010
_LONG_HEADER_VRS = frozenset({"OB", "OW", "OF", "OD", "UN", "OL", "OV"})  # explicit VR: 12-byte element header

FRONTAL_CHEST_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = ("CHEST",)
LATERAL_VIEWS = ("LL", "RL", "LATERAL")


@dataclass(frozen=True)
class DicomHeader:
    """The header facts used for selection and PACS bookkeeping; strings are stripped, "" when absent."""

    modality: str
    body_part_examined: str
    view_position: str
    image_laterality: str
    patient_orientation: tuple[str, ...]  # e.g. ("P", "F"): image directions, not patient data
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    number_of_frames: int  # 1 when the element is absent
    manufacturer: str = ""


@dataclass(frozen=True)
class PixelElement:
    """Where the header parse stopped: the pixel data element's header, not yet read."""

    tag: int  # Pixel Data, or Float / Double Float Pixel Data
    vr: str | None
    length: int  # the value length (UNDEFINED_LENGTH: encapsulated)
    offset: int  # stream offset of the element header (in the inflated stream for a deflated data set)


@dataclass(frozen=True)
class PixelLayout:
    """What a DICOM header declares about its pixel data, once checked against the limits."""

    rows: int
    columns: int
    frame_bytes: int  # one frame, as the decoder allocates it
    declared_bytes: int  # all frames, uncompressed


@dataclass(frozen=True, eq=False)
class DicomFacts:
    """One parse of a DICOM header: the selection facts, the elements read, and where the pixel data lies.

    Picklable, so a decode process can read the pixel data without parsing the header again.
    """

    header: DicomHeader
    dataset: pydicom.Dataset  # HEADER_TAGS and PIXEL_TAGS as found, with the file meta; no pixel data
    implicit_vr: bool
    little_endian: bool
    deflated: bool
    preamble: bool  # the "DICM" magic is there (a bare data set has neither preamble nor magic)
    body_start: int  # where the data set starts, after the file meta
    file_length: int
    pixel_element: PixelElement | None  # None: the data set has no pixel data

    @property
    def transfer_syntax(self) -> UID:
        """The transfer syntax (guessed, as pydicom does, for a data set without file meta)."""
        return UID(self.dataset.file_meta.TransferSyntaxUID)


def has_dicom_magic(data: bytes) -> bool:
    """Whether the bytes carry "DICM" after a 128-byte preamble."""
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble: a little-endian group 0002 or 0008 tag, then a VR or a sane length."""
    if len(data) < 12 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if data[4:6] in DICOM_VRS:  # explicit VR little endian
        return True
    length = int.from_bytes(data[4:8], "little")  # implicit VR: a 4-byte value length
    return length == UNDEFINED_LENGTH or length <= len(data) - 8


def read_dicom(data: bytes) -> DicomFacts:
    """Parse a DICOM file's header (with or without preamble) once, up to its pixel data.

    Raises ImageDecodeError (kind "corrupt") when the header does not parse. A deflated data set is
    inflated up to its pixel data, through a bounded stream; nothing is checked against the limits here.
    """
    # pydicom's public read_file_meta_info takes only a path; its stream reader is the private one.
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.tag import BaseTag, Tag

    source = BytesIO(data)
    try:
        read_preamble(source, force=True)
        meta = _read_file_meta_info(source)
    except Exception as exc:
        raise ImageDecodeError(f"truncated or corrupt DICOM header ({type(exc).__name__})") from exc
    deflated = meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
    implicit, little = _encoding(meta, source)
    body_start = source.tell()
    stream: Any = _BoundedInflater(data, body_start, MAX_DEFLATED_HEADER_BYTES) if deflated else source
    wanted: list[BaseTag | int] = [Tag(tag) for tag in {*HEADER_TAGS, *PIXEL_TAGS}]
    found: list[tuple[int, str | None, int]] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_DATA_TAGS:
            found.append((int(tag), vr, length))
            return True
        return False

    try:
        dataset = read_dataset(stream, implicit, little, stop_when=at_pixels, specific_tags=wanted)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"truncated or corrupt DICOM header ({type(exc).__name__})") from exc
    dataset.file_meta = meta
    dataset.set_original_encoding(implicit, little, None)
    pixel_element = PixelElement(*found[0], offset=int(stream.tell())) if found else None
    return DicomFacts(
        _header(dataset),
        dataset,
        implicit,
        little,
        deflated,
        has_dicom_magic(data),
        body_start,
        len(data),
        pixel_element,
    )


def _encoding(meta: pydicom.dataset.FileMetaDataset, source: BytesIO) -> tuple[bool, bool]:
    """(implicit VR, little endian) from the transfer syntax, or guessed as pydicom does for a bare data set."""
    syntax = meta.get("TransferSyntaxUID")
    if syntax is not None:
        uid = UID(syntax)
        if uid == pydicom.uid.ImplicitVRLittleEndian:
            return True, True
        if uid == pydicom.uid.ExplicitVRBigEndian:
            return False, False
        return False, True  # explicit little endian, deflated and every encapsulated syntax
    start = source.tell()
    head = source.read(6)
    source.seek(start)
    if len(head) < 6:
        raise ImageDecodeError("truncated or corrupt DICOM (no transfer syntax)")
    implicit = head[4:6] not in DICOM_VRS
    little = implicit or int.from_bytes(head[:2], "little") < 1024
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian
        if implicit
        else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    )
    return implicit, little


def _header(dataset: pydicom.Dataset) -> DicomHeader:
    """The selection facts of a parsed data set."""
    return DicomHeader(
        modality=_text(dataset.get("Modality")),
        body_part_examined=_text(dataset.get("BodyPartExamined")),
        view_position=_text(dataset.get("ViewPosition")),
        image_laterality=_text(dataset.get("ImageLaterality")),
        patient_orientation=tuple(_text(v) for v in _as_list(dataset.get("PatientOrientation"))),
        sop_class_uid=_text(dataset.get("SOPClassUID")),
        sop_instance_uid=_text(dataset.get("SOPInstanceUID")),
        study_instance_uid=_text(dataset.get("StudyInstanceUID")),
        series_instance_uid=_text(dataset.get("SeriesInstanceUID")),
        rows=int_element(dataset, "Rows"),
        columns=int_element(dataset, "Columns"),
        number_of_frames=int_element(dataset, "NumberOfFrames") or 1,
        manufacturer=_text(dataset.get("Manufacturer")),
    )


def check_pixel_data(facts: DicomFacts, max_pixel_bytes: int = MAX_PIXEL_DATA_BYTES) -> PixelLayout:
    """Refuse missing pixel data, an unsupported photometric or syntax, and declared sizes beyond the limits.

    Native pixel data shorter than Rows x Columns x SamplesPerPixel x BitsAllocated/8 x frames, or
    than the file, is refused too. Only the parsed facts are used: nothing is read or inflated.
    """
    dataset, element = facts.dataset, facts.pixel_element
    if element is None:
        if not facts.preamble:
            # Without the "DICM" magic, pydicom (forced) reads almost any bytes as some dataset.
            raise ImageDecodeError("not an image (no DICOM preamble and no pixel data)")
        raise ImageDecodeError("DICOM has no pixel data", kind="unsupported")
    rows, columns = int_element(dataset, "Rows"), int_element(dataset, "Columns")
    check_size(columns, rows)
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip().upper()
    known = GREY_PHOTOMETRICS | COLOUR_PHOTOMETRICS | {PALETTE_PHOTOMETRIC}
    if "PhotometricInterpretation" in dataset and photometric not in known:
        raise ImageDecodeError(
            f"unsupported DICOM photometric interpretation {safe_code(photometric)}", kind="unsupported"
        )
    samples = int_element(dataset, "SamplesPerPixel") or 1
    bits = int_element(dataset, "BitsAllocated") or {0x7FE00008: 32, 0x7FE00009: 64}.get(element.tag, 8)
    frames = max(int_element(dataset, "NumberOfFrames"), 1)
    if bits not in (1, 8, 16, 32, 64) or not 1 <= samples <= 4:
        raise ImageDecodeError(f"unsupported DICOM pixel layout ({bits} bits, {samples} samples)", kind="unsupported")
    frame_bits = rows * columns * samples * bits
    if photometric == "YBR_FULL_422" and element.length != UNDEFINED_LENGTH:
        frame_bits = frame_bits * 2 // 3  # native 4:2:2 stores two chroma samples per two pixels
    declared = (frame_bits * frames + 7) // 8
    if declared > max_pixel_bytes:
        raise ImageDecodeError(
            f"image too large: pixel data of {columns}x{rows} x {samples} samples x {bits} bits x {frames} frames "
            f"({declared / 2**20:.0f} MiB) exceeds {max_pixel_bytes / 2**20:.0f} MiB",
            kind="unsupported",
        )
    if element.length != UNDEFINED_LENGTH:
        # Native pixel data: the element must hold every declared frame (one odd pad byte allowed).
        if element.length < declared:
            raise ImageDecodeError(
                f"corrupt DICOM pixel data: shorter than declared ({element.length} of {declared} bytes)"
            )
        start = _value_start(facts, element)
        if not facts.deflated and start + min(element.length, declared) > facts.file_length:
            raise ImageDecodeError(
                f"corrupt DICOM pixel data: truncated ({facts.file_length - start} of {declared} bytes)"
            )
    _check_syntax(facts.transfer_syntax, bits)
    return PixelLayout(rows, columns, (frame_bits + 7) // 8, declared)


def _check_syntax(syntax: UID, bits: int) -> None:
    """Refuse a compressed syntax no installed decoder reads (before anything is stored or answered)."""
    if not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageDecodeError(
            f"unsupported DICOM transfer syntax: {safe_uid_name(syntax)} (no decoder installed)", kind="unsupported"
        )
    if syntax == pydicom.uid.JPEGExtended12Bit and bits > 8:
        # Only the GPL libjpeg plugin, not a dependency, decodes 12-bit lossy JPEG (docs/decoding.md).
        raise ImageDecodeError(
            f"unsupported DICOM pixel data ({safe_uid_name(syntax)}: no installed decoder handles it)",
            kind="unsupported",
        )


def _value_start(facts: DicomFacts, element: PixelElement) -> int:
    """Stream offset where the pixel data's value starts."""
    long_header = not facts.implicit_vr and element.vr in _LONG_HEADER_VRS
    return element.offset + (12 if long_header else 8)


def _stream_at_pixels(data: bytes, facts: DicomFacts, element: PixelElement) -> Any:
    """A stream positioned at the pixel data element's header: the file itself, or its data set re-inflated."""
    if not facts.deflated:
        stream = BytesIO(data)
        stream.seek(element.offset)
        return stream
    # Inflating is not parsing: the header's elements are skipped as bytes, in small chunks.
    inflater = _BoundedInflater(data, facts.body_start, MAX_DEFLATED_HEADER_BYTES)
    inflater.skip_to(element.offset)
    return inflater


def read_pixel_data(data: bytes, facts: DicomFacts) -> pydicom.Dataset:
    """A new data set: the header's elements plus the pixel data element; nothing after it is read (or inflated)."""
    from pydicom.filereader import read_dataset
    from pydicom.tag import Tag

    layout = check_pixel_data(facts)
    element = facts.pixel_element
    assert element is not None, "check_pixel_data refuses a data set without pixel data"
    stream = _stream_at_pixels(data, facts, element)
    if facts.deflated:
        # Native data only (deflate is not an encapsulated syntax): the element header, the declared
        # value and a pad byte; the stream ends there, so nothing after the pixel data is inflated.
        stream.cap = stream.tell() + 12 + layout.declared_bytes + 2
        stream.end_at_cap = True
    try:
        pixels = read_dataset(
            stream,
            facts.implicit_vr,
            facts.little_endian,
            stop_when=lambda tag, vr, length: tag not in _PIXEL_DATA_TAGS,
            specific_tags=[Tag(element.tag)],
        )
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"truncated or corrupt DICOM pixel data ({type(exc).__name__})") from exc
    if element.length != UNDEFINED_LENGTH:
        value = pixels.get(element.tag)
        if value is None or len(value.value or b"") < layout.declared_bytes:
            raise ImageDecodeError("corrupt DICOM pixel data: truncated")
    dataset = pydicom.Dataset()
    dataset.update(facts.dataset)  # a new data set: the parsed header stays as it was
    dataset.update(pixels)
    dataset.file_meta = facts.dataset.file_meta
    dataset.set_original_encoding(facts.implicit_vr, facts.little_endian, None)
    return dataset


def verify_pixel_data(data: bytes, facts: DicomFacts, max_pixel_bytes: int = MAX_PIXEL_DATA_BYTES) -> None:
    """Inflate a deflated data set's pixel data, keeping none of it, to prove it is as long as declared."""
    layout = check_pixel_data(facts, max_pixel_bytes)
    element = facts.pixel_element
    if not facts.deflated or element is None or element.length == UNDEFINED_LENGTH:
        return
    stream = _stream_at_pixels(data, facts, element)
    start = _value_start(facts, element)
    stream.cap = start + layout.declared_bytes + 2
    stream.end_at_cap = True
    available = stream.skip_to(start + layout.declared_bytes) - start
    if available < layout.declared_bytes:
        raise ImageDecodeError(f"corrupt DICOM pixel data: truncated ({available} of {layout.declared_bytes} bytes)")


def read_dataset(data: bytes, *, pixels: bool = False, force: bool = False) -> pydicom.Dataset:
    """The whole data set as pydicom reads it, patient modules included: for building DICOM objects, never for decoding.

    Not bounded (pydicom inflates a deflated data set whole): call it only on bytes the size guard
    has passed. pixels=False stops before the pixel data; force reads a data set without preamble.
    Raises what pydicom raises (InvalidDicomError for a file without preamble unless forced).
    """
    return pydicom.dcmread(BytesIO(data), stop_before_pixels=not pixels, force=force)


def decodable_transfer_syntaxes() -> list[str]:
    """Every DICOM transfer syntax an installed decoder reads, uncompressed ones first (the listener offers exactly these)."""
    found = []
    for uid in pydicom.uid.AllTransferSyntaxes:
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:  # video, JPIP and others pydicom has no decoder for
            continue
        if available:
            found.append(str(uid))
    return sorted(found, key=lambda uid: UID(uid).is_compressed)


def selection_reason(
    header: DicomHeader | None,
    *,
    modalities: Iterable[str] = FRONTAL_CHEST_MODALITIES,
    body_parts: Iterable[str] = CHEST_BODY_PARTS,
    lateral_views: Iterable[str] = LATERAL_VIEWS,
) -> str | None:
    """Why this image is not a frontal chest radiograph, or None when it should be classified.

    Non-DICOM inputs (header None) carry no such facts and are always classified. A missing
    BodyPartExamined or ViewPosition does not skip (many CR/DX writers leave them empty); a
    missing Modality does, as Modality is mandatory. Reasons quote only code strings.
    """
    if header is None:
        return None
    allowed = tuple(m.upper() for m in modalities)
    if header.modality.upper() not in allowed:
        return f"not a radiograph: modality {safe_code(header.modality)} (classified: {', '.join(allowed)})"
    parts = tuple(p.upper() for p in body_parts)
    if header.body_part_examined and header.body_part_examined.upper() not in parts:
        return f"not a chest image: body part {safe_code(header.body_part_examined)} (classified: {', '.join(parts)})"
    if header.view_position.upper() in tuple(v.upper() for v in lateral_views):
        return f"lateral view ({safe_code(header.view_position)}): only frontal (PA/AP) views are classified"
    return None


def safe_code(value: str) -> str:
    """A DICOM code string for a message, or a placeholder when it is not a plain code."""
    if not value:
        return "(missing)"
    return value if len(value) <= 16 and all(c.isalnum() or c in " _" for c in value) else "(non-standard value)"


def safe_uid_name(uid: UID) -> str:
    """The registered name of a transfer syntax, or a placeholder for an unregistered UID."""
    return uid.name if uid.is_valid and uid.name != str(uid) else "unregistered transfer syntax"


def int_element(dataset: pydicom.Dataset, keyword: str) -> int:
    """An integer element, 0 when absent or malformed."""
    try:
        return int(dataset.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _text(value: object) -> str:
    """A DICOM value as a stripped string ("" when absent)."""
    return "" if value is None else str(value).strip()


def _as_list(value: object) -> list[object]:
    """A multi-valued element as a list (pydicom gives a scalar for VM 1 and None when absent)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload,no-any-return]
    except TypeError:
        return [value]


class _BoundedInflater:
    """A read-only, forward-mostly file object over the raw-deflate stream data[start:], inflated on demand.

    Never holds more than what the current read asks for plus a small window behind it (pydicom
    seeks back over an element header), and raises ImageDecodeError instead of inflating past `cap`.
    """

    _WINDOW = 64 * 1024  # bytes kept behind the position for pydicom's short seeks back
    _CHUNK = 1024 * 1024  # output inflated per step

    def __init__(self, data: bytes, start: int, cap: int) -> None:
        """Inflate data[start:] lazily, at most cap bytes."""
        self._source: memoryview = memoryview(data)[start:]
        self._fed = 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._buffer_start = 0  # stream offset of _buffer[0]
        self._position = 0
        self._eof = False
        self.cap = cap
        self.end_at_cap = False  # True: the cap ends the stream; False: passing it is an error

    def tell(self) -> int:
        """The current stream offset."""
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move within the inflated stream (forward freely; back only inside the window)."""
        target = offset if whence == 0 else self._position + offset if whence == 1 else None
        if target is None:
            raise ImageDecodeError("corrupt DICOM (seek from the end of a deflated stream)")
        if target < self._buffer_start:
            raise ImageDecodeError("corrupt DICOM (seek back in a deflated stream)")
        self._position = target
        return target

    def read(self, size: int | None = -1) -> bytes:
        """Up to size bytes (fewer at the end of the stream)."""
        end = self.cap if size is None or size < 0 else self._position + size
        self._fill(end)
        offset = self._position - self._buffer_start
        chunk = bytes(self._buffer[offset : offset + max(end - self._position, 0)])
        self._position += len(chunk)
        self._trim()
        return chunk

    def skip_to(self, end: int) -> int:
        """Inflate and drop everything up to stream offset end; the offset reached (short at the end of the stream)."""
        while self._buffer_start + len(self._buffer) < end and not self._eof:
            self._position = self._buffer_start + len(self._buffer)
            self._trim()
            self._inflate(min(end - (self._buffer_start + len(self._buffer)), self._CHUNK))
        self._position = min(end, self._buffer_start + len(self._buffer))
        return self._position

    def _fill(self, end: int) -> None:
        """Inflate until the buffer reaches stream offset end (or the stream ends), dropping what lies behind."""
        while self._buffer_start + len(self._buffer) < end and not self._eof:
            if self._buffer_start + len(self._buffer) < self._position - self._WINDOW:
                self._trim()
            self._inflate(min(end - (self._buffer_start + len(self._buffer)), self._CHUNK))

    def _inflate(self, want: int) -> None:
        """Inflate up to want more bytes into the buffer, refusing to pass the cap."""
        if self._buffer_start + len(self._buffer) + 1 > self.cap:
            if self.end_at_cap:
                self._eof = True
                return
            raise ImageDecodeError(
                f"image too large: deflated data set inflates beyond {self.cap / 2**20:.0f} MiB", kind="unsupported"
            )
        want = min(want, self.cap - (self._buffer_start + len(self._buffer)))
        tail = self._inflater.unconsumed_tail
        source: bytes | memoryview
        if tail:
            source = tail
        elif self._fed < len(self._source):
            source = self._source[self._fed : self._fed + 65536]
            self._fed += len(source)
        else:
            self._buffer += self._inflater.flush()
            self._eof = True
            return
        try:
            self._buffer += self._inflater.decompress(source, want)
        except zlib.error as exc:
            raise ImageDecodeError("corrupt DICOM (bad deflate stream)") from exc
        if self._inflater.eof:
            self._eof = True

    def _trim(self) -> None:
        """Drop buffered bytes more than the window behind the position."""
        drop = min(self._position - self._WINDOW, self._buffer_start + len(self._buffer)) - self._buffer_start
        if drop > 0:
            del self._buffer[:drop]
            self._buffer_start += drop
