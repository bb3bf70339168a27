"""DICOM headers -> frame descriptions (:class:`Frame`), the first half of ``series.convert``.

Each file is parsed once with pydicom, pixel data deferred; the attributes read on the hot path are
parsed straight from their raw bytes (pydicom's element conversion was most of the header cost of a
300-slice series). Enhanced CT/MR multi-frame objects are described per frame from the per-frame and
shared functional groups. Every problem raises :class:`~dicomnode.errors.SeriesError`.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pydicom is imported where a file needs it: ~0.15 s less for `dicomnode convert`
    from pydicom.dataset import Dataset

from dicomnode.errors import SeriesError
from dicomnode.volume import SourceFrame

NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}
COMPRESSED_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
})
#: Every transfer syntax the converter decodes, each one tested with files written by pydicom or dcmtk
#: (the SCP may accept exactly these). HTJ2K is left out: pydicom decodes it, but no encoder here can
#: make test files.
SUPPORTED_TRANSFER_SYNTAXES = frozenset(NATIVE_SYNTAXES) | COMPRESSED_SYNTAXES
_PIXEL_DATA = 0x7FE00010
MAX_MATRIX = 8192  # rows/columns beyond this are refused (a CT/MR frame is at most 1024)
_DEFER = 8192


@dataclass(frozen=True, slots=True)
class Frame:
    """One 2D frame as the header describes it (no pixels yet)."""

    path: Path
    index: int  # 0-based frame within the file
    source: SourceFrame
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    keys: tuple[object, ...]  # echo / temporal / stack id / b-value: different keys, different stacks
    acquisition: str
    thickness: float | None
    syntax: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    offset: int | None  # file offset of the frame's bytes (native syntaxes only)
    modality: str
    frame_of_reference: str
    series: str


# ---------------------------------------------------------------------------------------------
# headers


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """Datasets without pixel data, in the order of ``paths`` (e.g. SEG source images).

    Raises SeriesError("unreadable_file") when a file is not DICOM.
    """
    out = []
    for p in paths:
        try:
            out.append(_pydicom().dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # pydicom raises many types; never leak values
            raise SeriesError("unreadable_file", kind="inconsistent", detail=type(exc).__name__) from exc
    return out


_TAGS: dict[str, tuple[int, str]] = {  # top-level attributes read on the hot path, with their VR
    "SOPClassUID": (0x00080016, "UI"), "SOPInstanceUID": (0x00080018, "UI"), "Modality": (0x00080060, "CS"),
    "SeriesInstanceUID": (0x0020000E, "UI"), "FrameOfReferenceUID": (0x00200052, "UI"),
    "PhotometricInterpretation": (0x00280004, "CS"), "SamplesPerPixel": (0x00280002, "US"),
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "NumberOfFrames": (0x00280008, "IS"),
    "BitsAllocated": (0x00280100, "US"), "BitsStored": (0x00280101, "US"), "PixelRepresentation": (0x00280103, "US"),
    "ImagePositionPatient": (0x00200032, "DS"), "ImageOrientationPatient": (0x00200037, "DS"),
    "PixelSpacing": (0x00280030, "DS"), "SliceThickness": (0x00180050, "DS"), "RescaleSlope": (0x00281053, "DS"),
    "RescaleIntercept": (0x00281052, "DS"), "EchoNumbers": (0x00180086, "IS"), "EchoTime": (0x00180081, "DS"),
    "TemporalPositionIdentifier": (0x00200100, "IS"), "AcquisitionNumber": (0x00200012, "IS"),
    "DiffusionBValue": (0x00189087, "FD"),
}


def _v(ds: Dataset, keyword: str, default: object = None) -> object:
    """A top-level value, parsed straight from the raw bytes when pydicom has not converted it yet.

    pydicom's element conversion is most of the header cost on a 300-slice series; numbers come back
    as strings (one, or a list) and are checked by the caller. Falls back to pydicom otherwise.
    """
    tag, vr = _TAGS[keyword]
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return default
    if isinstance(elem, tuple) and elem.value is not None and elem.VR in (None, vr):  # a raw element
        b = elem.value
        if vr in ("US", "FD"):
            size = 2 if vr == "US" else 8
            if len(b) < size:
                return default
            fmt = ("<" if elem.is_little_endian else ">") + ("H" if vr == "US" else "d")
            return struct.unpack(fmt, b[:size])[0]
        text = b.decode("latin-1").strip(" \x00")
        if not text:
            return default
        if vr in ("DS", "IS"):
            parts = [t.strip() for t in text.split("\\")]
            return parts[0] if len(parts) == 1 else parts
        return text
    value = ds[tag].value
    return default if value is None or (isinstance(value, (str, bytes)) and not value) else value


def _floats(value: object, n: int, reason: str) -> tuple[float, ...]:
    try:
        many = isinstance(value, Sequence) and not isinstance(value, (str, bytes))  # list, MultiValue
        vals = tuple(float(v) for v in (value if many else [value]))  # type: ignore[union-attr]
    except Exception as exc:
        raise SeriesError(reason, kind="geometry", detail="unparseable value") from exc
    if len(vals) != n or not all(np.isfinite(vals)):
        raise SeriesError(reason, kind="geometry", detail=f"need {n} finite numbers")
    return vals


def _first(ds: Dataset | None, seq: str) -> Dataset | None:
    if ds is None or seq not in ds:
        return None
    items = ds[seq].value
    return items[0] if items else None


def _lookup(frame_fg: Dataset | None, shared_fg: Dataset | None, seq: str, kw: str) -> object:
    for fg in (frame_fg, shared_fg):
        item = _first(fg, seq)
        if item is not None and kw in item and item[kw].value not in (None, ""):
            return item[kw].value
    return None


def _opt_float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except Exception:
        return None
    return f if np.isfinite(f) else None


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_WANTED = {tag: vr for tag, vr in _TAGS.values()}
_ENHANCED = {0x52009229, 0x52009230}  # Shared / PerFrame FunctionalGroupsSequence
_SCAN_BYTES = (8192, 65536)  # most headers fit the first read; the second is for long ones


def _pydicom():  # type: ignore[no-untyped-def]
    import pydicom

    return pydicom


class _RawElement(NamedTuple):
    """The fields of pydicom's RawDataElement that the converter reads (same names)."""

    tag: int
    VR: str | None
    length: int
    value: bytes | None
    value_tell: int
    is_implicit_VR: bool
    is_little_endian: bool


class _RawHeader:
    """The top-level attributes of a plain single-frame file, as raw elements (see :func:`_scan`).

    Offers the few Dataset methods ``_frames_of`` uses, so both paths share every check.
    """

    def __init__(self, elems: dict[int, _RawElement], syntax: str) -> None:
        self._elems = elems
        self.file_meta = {"TransferSyntaxUID": syntax}
        self.is_implicit_VR = syntax == "1.2.840.10008.1.2"

    def get_item(self, tag: int, keep_deferred: bool = True) -> _RawElement | None:
        return self._elems.get(tag)

    def __contains__(self, tag: object) -> bool:
        return tag in self._elems

    def get(self, key: object, default: object = None) -> object:
        return default  # only asked for the functional groups, which a scanned file does not have


def _scan(path: Path) -> _RawHeader | None:
    """Walk the elements of a plain Implicit/Explicit VR Little Endian file up to its pixel data.

    pydicom builds a Dataset with every element; this reads the first 8 KiB (64 KiB if needed) and
    keeps only the attributes :data:`_TAGS` names, about ten times faster. Returns None (use pydicom)
    for anything unusual: no preamble, another transfer syntax, functional groups, an unexpected VR,
    pixel data not within the first 64 KiB. Never raises for malformed input; pydicom then decides.
    """
    with open(path, "rb") as fh:
        b = fh.read(_SCAN_BYTES[0])
        found = _scan_bytes(b)
        if found is None and len(b) == _SCAN_BYTES[0]:
            found = _scan_bytes(b + fh.read(_SCAN_BYTES[1] - _SCAN_BYTES[0]))
    return found


def _scan_bytes(b: bytes) -> _RawHeader | None:
    try:
        if b[128:132] != b"DICM":
            return None
        pos, syntax = 132, ""
        while pos + 8 <= len(b) and b[pos:pos + 2] == b"\x02\x00":  # file meta: explicit VR LE
            elem = struct.unpack_from("<H", b, pos + 2)[0]
            vr = b[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                length, start = struct.unpack_from("<I", b, pos + 8)[0], pos + 12
            else:
                length, start = struct.unpack_from("<H", b, pos + 6)[0], pos + 8
            if elem == 0x0010:
                syntax = b[start:start + length].decode("ascii").strip(" \x00")
            pos = start + length
        if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            return None
        implicit = syntax == "1.2.840.10008.1.2"
        elems: dict[int, _RawElement] = {}
        end = _walk(b, pos, implicit, elems, top=True)
        if end is None or _PIXEL_DATA not in elems:
            return None
        return _RawHeader(elems, syntax)
    except (struct.error, UnicodeDecodeError, IndexError, RecursionError):
        return None


def _walk(b: bytes, pos: int, implicit: bool, out: dict[int, _RawElement], top: bool) -> int | None:
    """Element walk from ``pos``; top level: until Pixel Data, nested: until an item delimiter.

    Keeps wanted top-level elements in ``out``; returns the position reached, None to give up.
    """
    n = len(b)
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", b, pos)
        tag = group << 16 | elem
        if tag == 0xFFFEE00D:  # item delimiter: end of a nested dataset
            return None if top else pos + 8
        if implicit:
            vr, length, start = None, struct.unpack_from("<I", b, pos + 4)[0], pos + 8
        else:
            vr = b[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                length, start = struct.unpack_from("<I", b, pos + 8)[0], pos + 12
            else:
                length, start = struct.unpack_from("<H", b, pos + 6)[0], pos + 8
        if top and (tag in _ENHANCED or tag < 0x00080000):
            return None
        if top and tag == _PIXEL_DATA:
            if length == 0xFFFFFFFF:
                return None
            out[tag] = _RawElement(tag, vr and vr.decode("ascii"), length, None, start, implicit, True)
            return start
        if length == 0xFFFFFFFF:  # sequence (or UN) of undefined length: skip its items
            pos = _skip_items(b, start, implicit)
            if pos is None:
                return None
            continue
        if start + length > n:
            return None
        if top and tag in _WANTED:
            vr_s = vr.decode("ascii") if vr else None
            if vr_s is not None and vr_s != _WANTED[tag]:
                return None
            out[tag] = _RawElement(tag, vr_s, length, b[start:start + length], start, implicit, True)
        pos = start + length
    return None


def _skip_items(b: bytes, pos: int, implicit: bool) -> int | None:
    """Position after the sequence delimiter of an undefined-length sequence starting at ``pos``."""
    while pos + 8 <= len(b):
        group, elem, length = struct.unpack_from("<HHI", b, pos)
        tag = group << 16 | elem
        if tag == 0xFFFEE0DD:
            return pos + 8
        if tag != 0xFFFEE000:
            return None
        if length == 0xFFFFFFFF:
            end = _walk(b, pos + 8, implicit, {}, top=False)
            if end is None:
                return None
            pos = end
        else:
            pos += 8 + length
    return None


def parse_file(path: Path, max_voxels: int) -> list[Frame]:
    """Frames described by one file. Raises SeriesError for anything unusable.

    Plain single-frame files take the fast :func:`_scan` path; everything else goes through pydicom.
    """
    try:
        ds = _scan(path) or _pydicom().dcmread(path, defer_size=_DEFER, force=True)
        return _frames_of(ds, path, max_voxels)  # type: ignore[arg-type]
    except SeriesError:
        raise
    except Exception as exc:
        raise SeriesError("unreadable_file", kind="inconsistent", detail=type(exc).__name__) from exc


def _frames_of(ds: Dataset, path: Path, max_voxels: int) -> list[Frame]:
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        syntax = "1.2.840.10008.1.2.1" if not ds.is_implicit_VR else "1.2.840.10008.1.2"
    if _v(ds, "SOPInstanceUID") is None:
        raise SeriesError("unreadable_file", detail="no SOPInstanceUID")
    if _PIXEL_DATA not in ds:
        raise SeriesError("missing_pixel_data", kind="unsupported")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise SeriesError("unsupported_transfer_syntax", kind="unsupported", detail=syntax[:64])
    photometric = str(_v(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    if int(_v(ds, "SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError("unsupported_photometric", kind="unsupported", detail="only grayscale images")
    rows, cols = int(_v(ds, "Rows", 0) or 0), int(_v(ds, "Columns", 0) or 0)  # type: ignore[arg-type]
    n_frames = int(_v(ds, "NumberOfFrames", 1) or 1)  # type: ignore[arg-type]
    if rows <= 0 or cols <= 0 or n_frames <= 0 or rows > MAX_MATRIX or cols > MAX_MATRIX:
        raise SeriesError("invalid_dimensions", kind="inconsistent")
    if rows * cols * n_frames > max_voxels:
        raise SeriesError("too_large", kind="unsupported")
    bits = int(_v(ds, "BitsAllocated", 0) or 0)  # type: ignore[arg-type]
    stored = int(_v(ds, "BitsStored", bits) or bits)  # type: ignore[arg-type]
    if bits not in (8, 16, 32) or not 1 <= stored <= bits:
        raise SeriesError("unsupported_pixel_format", kind="unsupported", detail=f"BitsAllocated {bits}")
    signed = int(_v(ds, "PixelRepresentation", 0) or 0) == 1  # type: ignore[arg-type]
    offset = None
    if syntax in NATIVE_SYNTAXES:
        raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
        need = rows * cols * (bits // 8) * n_frames
        offset = getattr(raw, "value_tell", None)
        if raw.value is not None or offset is None:
            offset = -1  # value already in memory (small frame): read from the dataset
            available = len(raw.value or b"")
        else:  # deferred: the bytes must really be in the file
            available = min(int(raw.length), path.stat().st_size - offset)
        if available < need:
            raise SeriesError("truncated_pixel_data", kind="inconsistent")
    sop_class = str(_v(ds, "SOPClassUID", ""))
    sop_uid = str(_v(ds, "SOPInstanceUID"))
    modality = str(_v(ds, "Modality", "")).strip()
    for_uid = str(_v(ds, "FrameOfReferenceUID", ""))
    series = str(_v(ds, "SeriesInstanceUID", ""))
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    enhanced = per_frame is not None or shared is not None
    if per_frame is not None and len(per_frame) != n_frames:
        raise SeriesError("inconsistent_frames", kind="inconsistent", detail="per-frame groups do not match NumberOfFrames")
    frames = []
    for i in range(n_frames):
        if enhanced:
            fg = per_frame[i] if per_frame is not None and i < len(per_frame) else None
            pos = _lookup(fg, shared, "PlanePositionSequence", "ImagePositionPatient")
            ori = _lookup(fg, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _lookup(fg, shared, "PixelMeasuresSequence", "PixelSpacing")
            thick = _lookup(fg, shared, "PixelMeasuresSequence", "SliceThickness")
            slope = _lookup(fg, shared, "PixelValueTransformationSequence", "RescaleSlope")
            icpt = _lookup(fg, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            keys = (
                _lookup(fg, shared, "FrameContentSequence", "StackID"),
                _lookup(fg, shared, "FrameContentSequence", "TemporalPositionIndex"),
                _opt_float(_lookup(fg, shared, "MREchoSequence", "EffectiveEchoTime")),
                _opt_float(_lookup(fg, shared, "MRDiffusionSequence", "DiffusionBValue")),
            )
            acq = _lookup(fg, shared, "FrameContentSequence", "FrameAcquisitionNumber")
            if pos is None:
                pos = _v(ds, "ImagePositionPatient") if n_frames == 1 else None
            if ori is None:
                ori = _v(ds, "ImageOrientationPatient")
            if ps is None:
                ps = _v(ds, "PixelSpacing")
        else:
            if n_frames > 1:
                raise SeriesError("unsupported_multiframe", kind="unsupported",
                                  detail="multi-frame without functional groups")
            pos, ori, ps = _v(ds, "ImagePositionPatient"), _v(ds, "ImageOrientationPatient"), _v(ds, "PixelSpacing")
            thick, slope, icpt = _v(ds, "SliceThickness"), _v(ds, "RescaleSlope"), _v(ds, "RescaleIntercept")
            keys = (
                str(_v(ds, "EchoNumbers", "")), str(_v(ds, "TemporalPositionIdentifier", "")),
                _opt_float(_v(ds, "EchoTime")), _opt_float(_v(ds, "DiffusionBValue")),
            )
            acq = _v(ds, "AcquisitionNumber")
        if pos is None or (hasattr(pos, "__len__") and len(pos) == 0):
            raise SeriesError("missing_position", kind="geometry")
        if ori is None or (hasattr(ori, "__len__") and len(ori) == 0):
            raise SeriesError("missing_orientation", kind="geometry")
        if ps is None or (hasattr(ps, "__len__") and len(ps) == 0):
            raise SeriesError("missing_pixel_spacing", kind="geometry")
        spacing = _floats(ps, 2, "invalid_pixel_spacing")
        if min(spacing) <= 0:
            raise SeriesError("invalid_pixel_spacing", kind="geometry")
        slope_f = _opt_float(slope) if slope not in (None, "") else 1.0
        icpt_f = _opt_float(icpt) if icpt not in (None, "") else 0.0
        if slope_f is None or icpt_f is None or slope_f == 0:
            raise SeriesError("invalid_rescale", kind="inconsistent")
        frames.append(Frame(
            path=path, index=i, source=SourceFrame(sop_class, sop_uid, i + 1),
            position=_floats(pos, 3, "missing_position"),  # type: ignore[arg-type]
            orientation=_floats(ori, 6, "invalid_orientation"), pixel_spacing=spacing,  # type: ignore[arg-type]
            rows=rows, cols=cols, slope=slope_f, intercept=icpt_f, keys=keys,
            acquisition=str(acq if acq is not None else ""), thickness=_opt_float(thick), syntax=syntax,
            bits_allocated=bits, bits_stored=stored, signed=signed,
            offset=None if offset is None else (offset if offset < 0 else offset + i * rows * cols * bits // 8),
            modality=modality, frame_of_reference=for_uid, series=series,
        ))
    return frames
