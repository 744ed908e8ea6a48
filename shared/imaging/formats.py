"""What an image file is, and what its header says: sniffing, header size readers, and `probe`.

`probe(data)` sniffs the format and parses the header ONCE into an `ImageProbe`: the size of one
frame and, for JPEG and DICOM, what the decoder needs so that it does not read the header again (a
DICOM probe carries the parsed header, its selection facts and where its pixel data lies). The
probe is picklable, for a decode process. `ImageProbe.check` is the shared size guard every reader
applies: it refuses, from the header alone, what declares more than the limits or less pixel data
than its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.imaging.dicom import (
    MAX_PIXEL_DATA_BYTES,
    DicomFacts,
    DicomHeader,
    check_pixel_data,
    has_dicom_magic,
    looks_like_bare_dicom,
    read_dicom,
)
from shared.imaging.dicom import (
    verify_pixel_data as verify_dicom_pixel_data,
)
from shared.imaging.limits import ImageDecodeError, check_size

FORMATS = ("png", "jpeg", "tiff", "dicom")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF

# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG's frame header: its size, where its first scan starts and how many components it has."""

    width: int
    height: int
    scan_start: int  # offset of the first start-of-scan marker
    components: int  # 1: grey


@dataclass(frozen=True)
class ImageProbe:
    """One read of an image's header: enough to admit, select and decode it without reading the header again."""

    format: str  # "png", "jpeg", "tiff" or "dicom"
    width: int  # of one frame (multi-frame DICOM is decoded to its first frame only)
    height: int
    jpeg: JpegHeader | None = None  # JPEG only
    dicom: DicomFacts | None = None  # DICOM only: the parsed header and where the pixel data lies

    @property
    def pixel_count(self) -> int:
        """Pixels of one frame, as declared (the decoder allocates this many)."""
        return self.width * self.height

    @property
    def dicom_header(self) -> DicomHeader | None:
        """The DICOM selection facts, None for every other format."""
        return self.dicom.header if self.dicom is not None else None

    def check(self, *, max_pixel_bytes: int = MAX_PIXEL_DATA_BYTES) -> int:
        """Refuse, from the header facts alone, what would cost more than the limits; the pixels of one frame.

        PNG, JPEG and TIFF: width and height against MAX_IMAGE_SIDE and MAX_IMAGE_PIXELS. DICOM
        (`check_pixel_data`): no pixel data, an unsupported photometric interpretation or syntax, a
        frame beyond those limits, declared pixel data (all frames) beyond max_pixel_bytes, or
        native pixel data shorter than declared. Nothing is parsed or inflated.
        """
        if self.dicom is not None:
            layout = check_pixel_data(self.dicom, max_pixel_bytes)
            return layout.rows * layout.columns
        check_size(self.width, self.height)
        return self.pixel_count


def sniff_format(data: bytes) -> str:
    """Return "png", "jpeg", "tiff" or "dicom" from the leading bytes, or raise ImageDecodeError."""
    if len(data) == 0:
        raise ImageDecodeError("empty input")
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == JPEG_SIGNATURE:
        return "jpeg"
    # "DICM" before TIFF: some DICOM files carry a TIFF header in their preamble (dual-format files).
    if has_dicom_magic(data):
        return "dicom"
    if data[:4] in TIFF_SIGNATURES:
        return "tiff"
    if looks_like_bare_dicom(data):
        return "dicom"
    # An HTML/XML error page from a store is the usual culprit; say so without echoing content.
    if _looks_like_text(data[:512]):
        raise ImageDecodeError("not an image (unrecognised header, looks like text)")
    raise ImageDecodeError("not an image (unrecognised header)")


def probe(data: bytes) -> ImageProbe:
    """Sniff the format and parse the header once; raises ImageDecodeError when either fails (limits: `check`)."""
    data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
    fmt = sniff_format(data)
    try:
        if fmt == "dicom":
            facts = read_dicom(data)
            return ImageProbe(fmt, facts.header.columns, facts.header.rows, dicom=facts)
        if fmt == "jpeg":
            jpeg = jpeg_header(data)
            return ImageProbe(fmt, jpeg.width, jpeg.height, jpeg=jpeg)
        width, height = png_size(data) if fmt == "png" else tiff_size(data)
        return ImageProbe(fmt, width, height)
    except ImageDecodeError:
        raise
    except Exception as exc:
        # Only the exception's type goes into the message: third-party messages may quote header values.
        raise ImageDecodeError(f"truncated or corrupt {fmt} ({type(exc).__name__})") from exc


def check_image_header(
    data: bytes,
    *,
    verify_pixel_data: bool = False,
    max_pixel_bytes: int = MAX_PIXEL_DATA_BYTES,
    probed: ImageProbe | None = None,
) -> int:
    """The shared size guard on bytes: `probe(data).check(...)` (probed: that probe, already made); one frame's pixels.

    Nothing after the header is inflated unless verify_pixel_data, which also inflates a deflated
    data set's pixel data in small chunks, keeping none of it, to prove it is as long as declared.
    It takes a DICOMweb part's bytes as they are (with or without the 128-byte preamble).
    """
    probed = probed or probe(data)
    pixels = probed.check(max_pixel_bytes=max_pixel_bytes)
    if verify_pixel_data and probed.dicom is not None:
        verify_dicom_pixel_data(bytes(data), probed.dicom, max_pixel_bytes)
    return pixels


def pixel_count(data: bytes) -> int:
    """Pixels the decoder will allocate (rows x columns of one frame), read from the header only, without judging."""
    return probe(data).pixel_count


def dicom_header(data: bytes) -> DicomHeader | None:
    """Header facts of a DICOM file (with or without preamble); None for anything that is not DICOM.

    Raises ImageDecodeError (kind "corrupt") when the file looks like DICOM but its header does not parse.
    """
    data = bytes(data)
    try:
        if sniff_format(data) != "dicom":
            return None
    except ImageDecodeError:
        return None
    return read_dicom(data).header


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG spec requires to come first."""
    # signature (8) + chunk length (4) + b"IHDR" (4) + width (4) + height (4)
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageDecodeError("truncated or corrupt png (no IHDR header)")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def tiff_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first IFD (ImageWidth 256, ImageLength 257), classic or BigTIFF."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43
    # Classic: 4-byte IFD offset, 2-byte entry count, 12-byte entries with a 4-byte value field.
    # BigTIFF: 8-byte offset (at 8), 8-byte count, 20-byte entries with an 8-byte value field.
    offset_at, offset_size, count_size, entry_size, value_size = (8, 8, 8, 20, 8) if big else (4, 4, 2, 12, 4)
    ifd = int.from_bytes(data[offset_at : offset_at + offset_size], order)
    count = int.from_bytes(data[ifd : ifd + count_size], order)
    if ifd < 8 or ifd + count_size > len(data) or count == 0:
        raise ImageDecodeError("truncated or corrupt tiff (no image directory)")
    size: dict[int, int] = {}
    for index in range(min(count, 4096)):
        entry = ifd + count_size + index * entry_size
        if entry + entry_size > len(data):
            raise ImageDecodeError("truncated or corrupt tiff (short image directory)")
        tag = int.from_bytes(data[entry : entry + 2], order)
        if tag in (256, 257):
            field_type = int.from_bytes(data[entry + 2 : entry + 4], order)
            value = data[entry + entry_size - value_size : entry + entry_size]
            width_bytes = {3: 2, 4: 4, 16: 8}.get(field_type)  # SHORT, LONG, LONG8
            if width_bytes is None:
                raise ImageDecodeError("truncated or corrupt tiff (bad size field)")
            size[tag] = int.from_bytes(value[:width_bytes], order)
        if len(size) == 2:
            return size[256], size[257]
    raise ImageDecodeError("truncated or corrupt tiff (no image size)")


def jpeg_header(data: bytes) -> JpegHeader:
    """Size, offset of the first start-of-scan marker and component count, by walking the markers."""
    pos = 2
    size: tuple[int, int, int] | None = None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageDecodeError("truncated or corrupt jpeg (bad marker)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == _JPEG_EOI:
            break
        segment_length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if segment_length < 2:
            raise ImageDecodeError("truncated or corrupt jpeg (bad segment length)")
        if marker in _JPEG_SOF_MARKERS and pos + 10 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            size = (width, height, data[pos + 9])
        if marker == _JPEG_SOS:
            if size is None:
                break
            return JpegHeader(size[0], size[1], pos, size[2])
        pos += 2 + segment_length
    raise ImageDecodeError("truncated or corrupt jpeg (no frame header)")


def _looks_like_text(head: bytes) -> bool:
    """Whether the bytes are plausibly UTF-8 text (HTML, XML, JSON, a path...)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at the end of the sample.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return bool(text) and all(char.isprintable() or char in "\r\n\t" for char in text)
