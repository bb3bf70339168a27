"""Fast BINARY SEG frames: the per-frame functional groups encoded directly, bits packed with numpy.

highdicom builds one pydicom Dataset per frame (~3.5 ms each here: a 19-segment SEG of a 300-slice
CT has ~1700 frames, ~6 s). For single-frame source series the per-frame content is small and
regular, so :func:`fill_frames` takes a SEG highdicom built with one frame per segment (a
"template": every shared attribute, segment, reference and dimension is highdicom's) and replaces
its frames with the real ones:

- Per-frame Functional Groups Sequence, encoded once as Explicit VR Little Endian bytes: per
  source slice the Derivation Image (source instance reference) and Plane Position items are
  encoded with pydicom once; Frame Content (Dimension Index Values) and Segment Identification
  are packed with ``struct`` per frame. The element is kept raw (pydicom writes it as is).
- Pixel Data: per segment, the frames of the slices where it is present, packed with
  ``np.packbits(bitorder="little")`` (frames contiguous, no padding between frames).

Frames are ordered by segment number, then by slice position along the stack normal; the
position dimension index is the rank of the position among the positions of all frames.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.valuerep import format_number_as_ds

PER_FRAME_TAG = Tag(0x5200, 0x9230)
_ITEM = struct.Struct("<HHI")
_FRAME_CONTENT = struct.Struct("<HH2sHIHHIHH2sHII")  # SQ header + item header + UL[2] element


def _encode(elem_owner: Dataset, keyword: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem_owner[keyword])
    return fp.getvalue()


def _el(group: int, element: int, vr: bytes, value: bytes, pad: bytes = b" ") -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ds_text(value: object) -> str:
    """A DS value as text: the original string when valid, else formatted to 16 characters."""
    text = str(value)
    return text if len(text) <= 16 else format_number_as_ds(float(value))  # type: ignore[arg-type]


def _sq(group: int, element: int, *items: bytes) -> bytes:
    body = b"".join(_ITEM.pack(0xFFFE, 0xE000, len(i)) + i for i in items)
    return struct.pack("<HH2sHI", group, element, b"SQ", 0, len(body)) + body


def _slice_chunks(template_item: Dataset, images: Sequence[Dataset]) -> list[tuple[bytes, bytes]]:
    """(Derivation Image Sequence, Plane Position Sequence) bytes per source image.

    The constant parts (purpose of reference, derivation code, spatial locations preserved) are
    taken from highdicom's first frame and encoded once; the references and positions per image.
    """
    deriv_t = template_item.DerivationImageSequence[0]
    src_t = deriv_t.SourceImageSequence[0]
    tail = b""
    if "SpatialLocationsPreserved" in src_t:
        tail += _el(0x0028, 0x135A, b"CS", str(src_t.SpatialLocationsPreserved).encode())
    tail += _encode(src_t, "PurposeOfReferenceCodeSequence")
    derivation_code = _encode(deriv_t, "DerivationCodeSequence")
    out = []
    for ds in images:
        src_item = (_el(0x0008, 0x1150, b"UI", str(ds.SOPClassUID).encode(), b"\0")
                    + _el(0x0008, 0x1155, b"UI", str(ds.SOPInstanceUID).encode(), b"\0") + tail)
        deriv = _sq(0x0008, 0x9124, _sq(0x0008, 0x2112, src_item) + derivation_code)
        ipp = "\\".join(_ds_text(v) for v in ds["ImagePositionPatient"].value).encode()
        plane = _sq(0x0020, 0x9113, _el(0x0020, 0x0032, b"DS", ipp))
        out.append((deriv, plane))
    return out


def _reference_items(images: Sequence[Dataset]) -> list[bytes]:
    return [_el(0x0008, 0x1150, b"UI", str(ds.SOPClassUID).encode(), b"\0")
            + _el(0x0008, 0x1155, b"UI", str(ds.SOPInstanceUID).encode(), b"\0") for ds in images]


def _raw_sequence(owner: Dataset, tag: int, items: Sequence[bytes]) -> None:
    value = b"".join(_ITEM.pack(0xFFFE, 0xE000, len(i)) + i for i in items)
    t = Tag(tag)
    owner[t] = RawDataElement(t, "SQ", len(value), value, 0, False, True)
    owner.set_original_encoding(False, True, owner._character_set)


def complete_references(seg: Dataset, images: Sequence[Dataset], regular: bool) -> None:
    """Reference every source image in a SEG highdicom built from only two of them.

    Sets Referenced Series > Referenced Instance Sequence and the top-level Source Image Sequence
    to all ``images`` (in order, encoded directly); drops Spacing Between Slices when the full
    stack is not ``regular`` (highdicom saw two slices, which are always regular).
    """
    items = _reference_items(images)
    _raw_sequence(seg.ReferencedSeriesSequence[0], 0x0008114A, items)
    if "SourceImageSequence" in seg:
        _raw_sequence(seg, 0x00082112, items)
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if measures and not regular and "SpacingBetweenSlices" in measures[0]:
        del measures[0].SpacingBetweenSlices


def _segment_chunk(number: int) -> bytes:
    elem = struct.pack("<HH2sHH", 0x0062, 0x000B, b"US", 2, number)
    item = _ITEM.pack(0xFFFE, 0xE000, len(elem)) + elem
    return struct.pack("<HH2sHI", 0x0062, 0x000A, b"SQ", 0, len(item)) + item


def _frame_content(segment: int, position: int) -> bytes:
    return _FRAME_CONTENT.pack(0x0020, 0x9111, b"SQ", 0, 24, 0xFFFE, 0xE000, 16,
                               0x0020, 0x9157, b"UL", 8, segment, position)


def _frame(lab: np.ndarray, z: int, ys: slice, v: int, row_bytes: int, byte_aligned: bool) -> bytes | np.ndarray:
    """The packed frame of segment ``v`` on slice ``z``, whose voxels all lie in the rows ``ys``."""
    if row_bytes:
        band = np.packbits(lab[z, ys, :] == v, bitorder="little").tobytes()
        return bytes(ys.start * row_bytes) + band + bytes((lab.shape[1] - ys.stop) * row_bytes)
    if byte_aligned:
        return np.packbits(lab[z] == v, bitorder="little").tobytes()
    return (lab[z] == v).reshape(-1)


def label_frames(lab: np.ndarray, byte_aligned: bool) -> dict[tuple[int, int], bytes | np.ndarray]:
    """(segment number, slice) -> packed frame (a flat bool frame when frames are not byte aligned).

    One pass takes the maximum of every row. A map holding only segment 1 (one model with one
    label, e.g. body) then needs nothing else: each slice's frame is packed from the rows where
    the maximum is not zero. Otherwise every segment is visited only inside its bounding box
    (``scipy.ndimage.find_objects`` on the box of all segments); when a row is a whole number of
    bytes only the rows of the box are compared and packed, the rest of the frame is zero bytes.
    """
    from scipy import ndimage

    cols = lab.shape[2]
    row_bytes = cols // 8 if cols % 8 == 0 else 0
    out: dict[tuple[int, int], bytes | np.ndarray] = {}
    if lab.size == 0:
        return out
    row_max = lab.max(axis=2)  # (slice, row)
    slices = np.flatnonzero(row_max.any(axis=1))
    if slices.size == 0:
        return out
    if int(row_max.max()) == 1:
        for z in slices:
            rows = np.flatnonzero(row_max[z])
            out[(1, int(z))] = _frame(lab, int(z), slice(int(rows[0]), int(rows[-1]) + 1), 1, row_bytes, byte_aligned)
        return out
    used_rows = np.flatnonzero(row_max.any(axis=0))
    used_cols = np.flatnonzero(lab.max(axis=1).any(axis=0))
    origin = (int(slices[0]), int(used_rows[0]), int(used_cols[0]))
    inner = lab[origin[0]:int(slices[-1]) + 1, origin[1]:int(used_rows[-1]) + 1, origin[2]:int(used_cols[-1]) + 1]
    for v, box in enumerate(ndimage.find_objects(inner), start=1):
        if box is None:
            continue
        zs, ys, xs = (slice(b.start + o, b.stop + o) for b, o in zip(box, origin))
        for z in range(zs.start, zs.stop):
            if not np.any(lab[z, ys, xs] == v):
                continue
            out[(v, z)] = _frame(lab, z, ys, v, row_bytes, byte_aligned)
    return out


def fill_frames(
    seg: Dataset, images: Sequence[Dataset], masks: Sequence[np.ndarray], slice_order: np.ndarray,
) -> Dataset:
    """Replace the frames of the template ``seg`` by every non-empty (segment, slice) frame.

    ``images[i]`` is the source instance of slice ``i`` of the label maps ``masks`` (one label
    map per group of disjoint segments); ``slice_order`` sorts slice indices along the stack
    normal. Returns ``seg`` (modified).
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "DerivationImageSequence" in shared or "PlanePositionSequence" in shared:
        raise ValueError("template SEG has shared positions/references: it needs frames on two slices")
    per_frame_segment = "SegmentIdentificationSequence" not in shared  # shared when there is one segment
    rows, cols = int(seg.Rows), int(seg.Columns)
    byte_aligned = (rows * cols) % 8 == 0
    frames: dict[tuple[int, int], bytes | np.ndarray] = {}  # (segment, rank along the normal) -> frame
    rank_of_slice = np.empty(len(images), dtype=np.int64)
    rank_of_slice[slice_order] = np.arange(len(images))
    slice_of_rank = np.asarray(slice_order)
    for lab in masks:
        for (seg_no, s), frame in label_frames(lab, byte_aligned).items():
            frames[(seg_no, int(rank_of_slice[s]))] = frame
    keys = sorted(frames)
    position_index = {r: i + 1 for i, r in enumerate(sorted({r for _, r in keys}))}
    chunks = _slice_chunks(seg.PerFrameFunctionalGroupsSequence[0], images)
    seg_chunks = {n: _segment_chunk(n) if per_frame_segment else b"" for n in {k for k, _ in keys}}
    items = []
    for seg_no, rank in keys:
        deriv, plane = chunks[int(slice_of_rank[rank])]
        content = deriv + _frame_content(seg_no, position_index[rank]) + plane + seg_chunks[seg_no]
        items.append(_ITEM.pack(0xFFFE, 0xE000, len(content)) + content)
    if byte_aligned:
        pixel_data = b"".join(frames[k] for k in keys)  # type: ignore[misc]
    else:
        bits = [frames[k] for k in keys]
        pixel_data = np.packbits(np.concatenate(bits), bitorder="little").tobytes() if bits else b""  # type: ignore[arg-type]
    value = b"".join(items)
    seg[PER_FRAME_TAG] = RawDataElement(PER_FRAME_TAG, "SQ", len(value), value, 0, False, True)
    if len(pixel_data) % 2:
        pixel_data += b"\x00"
    seg.NumberOfFrames = len(items)
    seg.PixelData = pixel_data
    seg["PixelData"].VR = "OB"
    seg.set_original_encoding(False, True, seg._character_set)  # keep the raw sequence raw when written
    return seg
