"""Read the few header elements the node keeps, straight from the received bytes.

The SCP needs ten elements that all sit in groups 0008-0028 at the start of a data set. For the
little-endian transfer syntaxes (implicit, explicit and every encapsulated one) :func:`scan_header`
walks the elements of the first received fragment up to (0028,0008) without building a pydicom
Dataset (about 10x cheaper); it returns None whenever it is not sure (deflate, big endian, data
ending early, anything malformed) and the caller falls back to pydicom. It never raises.

:func:`header_from_chunks` / :func:`parse_header` turn the values into the checked fields the
SCP stores (raising InstanceRejected 0xC000 / 0xA900), and :func:`file_meta_bytes` builds the
Part-10 file meta header written in front of the bytes as received.
"""
from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pydicom
from pydicom.tag import Tag
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from dicomnode.errors import InstanceRejected
from dicomnode.net import dimse
from dicomnode.store.spool import valid_uid

IMPLEMENTATION_VERSION = b"DICOMNODE_01"

IMPLICIT_LE = "1.2.840.10008.1.2"
NOT_SCANNABLE = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})  # deflate, big endian

WANTED = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID", 0x00200013: "InstanceNumber",
    0x00200032: "ImagePositionPatient", 0x00200037: "ImageOrientationPatient",
    0x00200052: "FrameOfReferenceUID", 0x00280008: "NumberOfFrames",
}
LAST_WANTED = 0x00280008
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 8


class _Stop(Exception):
    pass


def _element_header(buf: memoryview, off: int, explicit: bool) -> tuple[int, int, int]:
    """(tag, value length, offset of the value); raises _Stop past the end or on odd data."""
    if off + 8 > len(buf):
        raise _Stop
    group, elem = struct.unpack_from("<HH", buf, off)
    tag = (group << 16) | elem
    if group == 0xFFFE:  # item / delimiters: always 4-byte length, no VR
        return tag, struct.unpack_from("<L", buf, off + 4)[0], off + 8
    if not explicit:
        return tag, struct.unpack_from("<L", buf, off + 4)[0], off + 8
    vr = bytes(buf[off + 4: off + 6])
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Stop
    if vr in _LONG_VRS:
        if off + 12 > len(buf):
            raise _Stop
        return tag, struct.unpack_from("<L", buf, off + 8)[0], off + 12
    return tag, struct.unpack_from("<H", buf, off + 6)[0], off + 8


def _skip_undefined(buf: memoryview, off: int, explicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence whose items start at ``off``."""
    if depth > _MAX_DEPTH:
        raise _Stop
    while True:
        tag, length, voff = _element_header(buf, off, explicit)
        if tag == 0xFFFEE0DD:  # sequence delimitation
            return voff
        if tag != 0xFFFEE000:
            raise _Stop
        if length != _UNDEFINED:
            off = voff + length
            continue
        off = voff  # undefined-length item: walk its elements up to the item delimiter
        while True:
            t, ln, vo = _element_header(buf, off, explicit)
            if t == 0xFFFEE00D:
                off = vo
                break
            off = _skip_undefined(buf, vo, explicit, depth + 1) if ln == _UNDEFINED else vo + ln


def scan_header(first: memoryview | bytes, transfer_syntax: str) -> dict[str, str] | None:
    """Raw string values of the wanted elements present in ``first`` (the data set's first
    fragment), or None when the fast path cannot decide. Absent elements are left out."""
    if transfer_syntax in NOT_SCANNABLE:
        return None
    explicit = transfer_syntax != IMPLICIT_LE
    buf = memoryview(first)
    out: dict[str, str] = {}
    off = 0
    try:
        while True:
            tag, length, voff = _element_header(buf, off, explicit)
            if tag > LAST_WANTED:
                return out
            if length == _UNDEFINED:
                off = _skip_undefined(buf, voff, explicit, 0)
                continue
            end = voff + length
            if end > len(buf):
                raise _Stop
            name = WANTED.get(tag)
            if name is not None:
                out[name] = bytes(buf[voff:end]).rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
            off = end
    except (_Stop, struct.error, UnicodeDecodeError, IndexError):
        return None


def split_multi(value: str | None) -> list[str]:
    """A backslash-separated multi-value string as a list ([] for None)."""
    return [] if not value else [v.strip() for v in value.split("\\")]


# ---- checked header fields (used by the SCP) ------------------------------------------------

_HEADER_TAGS = [Tag(t) for t in (
    0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x0020000E, 0x00200013, 0x00200032, 0x00200037,
    0x00200052, 0x00280008,
)]


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", tag[0], tag[1], vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


def _ui(value: str) -> bytes:
    b = value.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and an explicit-VR-little-endian group 0002 for the raw dataset."""
    ae = source_ae.strip().encode("ascii", "replace")
    if len(ae) % 2:
        ae += b" "
    body = b"".join((
        _element((0x0002, 0x0001), b"OB", b"\x00\x01"),
        _element((0x0002, 0x0002), b"UI", _ui(sop_class)),
        _element((0x0002, 0x0003), b"UI", _ui(sop_instance)),
        _element((0x0002, 0x0010), b"UI", _ui(transfer_syntax)),
        _element((0x0002, 0x0012), b"UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID))),
        _element((0x0002, 0x0013), b"SH", IMPLEMENTATION_VERSION),
        *((_element((0x0002, 0x0016), b"AE", ae),) if ae else ()),
    ))
    return b"\x00" * 128 + b"DICM" + _element((0x0002, 0x0000), b"UL", struct.pack("<I", len(body))) + body


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(v == v and abs(v) < 1e7 for v in out) else None


_KEYS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "InstanceNumber",
         "ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "NumberOfFrames")


def parse_header(part10: bytes, *, sop_class: str, sop_instance: str) -> dict[str, Any]:
    """The header fields the node keeps, from a Part-10 byte string (pydicom); pixel data is never read.

    Raises InstanceRejected 0xC000 when unparseable or a UID is invalid, 0xA900 when the dataset
    contradicts the command or lacks a type 1 UID.
    """
    try:
        ds = pydicom.dcmread(BytesIO(part10), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        vals = {k: ds.get(k) for k in _KEYS}
    except Exception as exc:  # pydicom raises many types on hostile input
        raise InstanceRejected(dimse.STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed") from exc
    return _checked(vals, sop_class, sop_instance)


def header_from_chunks(chunks: list[Any], ts: str, meta_bytes: bytes, *, sop_class: str,
                       sop_instance: str) -> dict[str, Any]:
    """Like :func:`parse_header` for a received data set: the fast scanner on its first fragment
    (``net/header.py``), pydicom on the whole Part-10 bytes when the scanner is not sure."""
    raw = scan_header(chunks[0], ts) if chunks else None
    if raw is None:
        return parse_header(b"".join((meta_bytes, *chunks)), sop_class=sop_class, sop_instance=sop_instance)
    vals: dict[str, Any] = {k: raw.get(k) for k in _KEYS}
    for k in ("ImagePositionPatient", "ImageOrientationPatient"):
        vals[k] = split_multi(vals[k])
    return _checked(vals, sop_class, sop_instance)


def _checked(vals: dict[str, Any], sop_class: str, sop_instance: str) -> dict[str, Any]:
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not vals[key]:
            raise InstanceRejected(dimse.STATUS_DATASET_MISMATCH, f"{key} missing")
        if not valid_uid(str(vals[key])):
            raise InstanceRejected(dimse.STATUS_CANNOT_UNDERSTAND, f"{key} invalid")
    if vals["SOPInstanceUID"] and str(vals["SOPInstanceUID"]) != sop_instance:
        raise InstanceRejected(dimse.STATUS_DATASET_MISMATCH, "SOP instance UID differs from the command")
    if vals["SOPClassUID"] and str(vals["SOPClassUID"]) != sop_class:
        raise InstanceRejected(dimse.STATUS_DATASET_MISMATCH, "SOP class UID differs from the command")
    try:
        number = int(vals["InstanceNumber"]) if vals["InstanceNumber"] not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    try:
        frames = max(1, int(vals["NumberOfFrames"])) if vals["NumberOfFrames"] not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 1
    for_uid = str(vals["FrameOfReferenceUID"] or "")
    return {
        "study": str(vals["StudyInstanceUID"]), "series": str(vals["SeriesInstanceUID"]),
        "modality": str(vals["Modality"] or "")[:16], "number": number,
        "position": _floats(vals["ImagePositionPatient"], 3),
        "orientation": _floats(vals["ImageOrientationPatient"], 6),
        "frames": frames, "for_uid": for_uid if valid_uid(for_uid) else "",
    }
