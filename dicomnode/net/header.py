"""Read the few header elements the node keeps, straight from the received bytes.

The SCP needs ten elements that all sit in groups 0008-0028 at the start of a data set. For the
little-endian transfer syntaxes (implicit, explicit and every encapsulated one) :func:`scan_header`
walks the elements of the first received fragment up to (0028,0008) without building a pydicom
Dataset (about 10x cheaper); it returns None whenever it is not sure (deflate, big endian, data
ending early, anything malformed) and the caller falls back to pydicom. It never raises.
"""
from __future__ import annotations

import struct

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
