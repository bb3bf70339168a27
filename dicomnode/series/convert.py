"""DICOM instances (or a NIfTI file) -> :class:`~dicomnode.volume.Volume` with checked geometry.

The only module that knows DICOM pixel layouts. Headers are parsed once with the pixel data
deferred; uncompressed pixel data is read straight from the file into a preallocated array;
compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg-libjpeg / -openjpeg / -rle,
pyjpegls). Single-frame series and Enhanced CT/MR multi-frame objects (per-frame functional
groups) are supported. Frames are split into stacks (orientation, echo, temporal position, stack
id, b-value, then acquisition number where positions repeat); every problem is a
:class:`~dicomnode.errors.SeriesError` with a machine-readable ``reason``:

unreadable_file, empty_series, missing_pixel_data, unsupported_transfer_syntax,
unsupported_photometric, unsupported_pixel_format, inconsistent_pixel_format, truncated_pixel_data,
decode_failed, missing_position, missing_orientation, missing_pixel_spacing, invalid_orientation,
invalid_pixel_spacing, invalid_dimensions, inconsistent_dimensions, mixed_modalities, mixed_series,
mixed_frame_of_reference, duplicate_positions, multiple_stacks, gap, tilt, nonuniform, too_large,
invalid_rescale, unsupported_multiframe, inconsistent_frames, not_3d (NIfTI).
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from dicomnode.config import GeometryConfig
from dicomnode.errors import SeriesError
from dicomnode.series import geometry as geom
from dicomnode.volume import LPS_TO_RAS, GeometryReport, SourceFrame, Volume

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
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
})
#: Every transfer syntax the converter decodes (the SCP may accept exactly these).
SUPPORTED_TRANSFER_SYNTAXES = frozenset(NATIVE_SYNTAXES) | COMPRESSED_SYNTAXES
_PIXEL_DATA = 0x7FE00010
MAX_MATRIX = 8192  # rows/columns beyond this are refused (a CT/MR frame is at most 1024)
_DEFER = 8192


@dataclass(frozen=True, slots=True)
class _Frame:
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
            out.append(pydicom.dcmread(p, stop_before_pixels=True))
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
    if isinstance(elem, RawDataElement) and elem.value is not None and elem.VR in (None, vr):
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
        vals = tuple(float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]))
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


def _parse_file(path: Path, max_voxels: int) -> list[_Frame]:
    """Frames described by one file. Raises SeriesError for anything unusable."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER, force=True)
        return _frames_of(ds, path, max_voxels)
    except SeriesError:
        raise
    except Exception as exc:
        raise SeriesError("unreadable_file", kind="inconsistent", detail=type(exc).__name__) from exc


def _frames_of(ds: Dataset, path: Path, max_voxels: int) -> list[_Frame]:
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
        frames.append(_Frame(
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


# ---------------------------------------------------------------------------------------------
# stacks


def _check_series(frames: list[_Frame]) -> None:
    if len({f.modality for f in frames}) > 1:
        raise SeriesError("mixed_modalities", kind="inconsistent")
    if len({f.series for f in frames}) > 1:
        raise SeriesError("mixed_series", kind="inconsistent")
    if len({f.frame_of_reference for f in frames}) > 1:
        raise SeriesError("mixed_frame_of_reference", kind="inconsistent")


def _split(frames: list[_Frame], policy: GeometryConfig) -> list[list[_Frame]]:
    """Frames grouped into stacks; raises SeriesError("duplicate_positions") when they cannot be."""
    tol = policy.orientation_tolerance
    by_ori: list[tuple[np.ndarray, list[_Frame]]] = []
    for f in frames:
        o = np.asarray(f.orientation)
        for ref, members in by_ori:
            if np.max(np.abs(ref - o)) <= max(tol, 1e-6):
                members.append(f)
                break
        else:
            by_ori.append((o, [f]))
    stacks: list[list[_Frame]] = []
    for ori, members in by_ori:
        _, _, normal = geom.check_orientation(ori)
        groups: dict[tuple[object, ...], list[_Frame]] = {}
        for f in members:
            groups.setdefault(f.keys, []).append(f)
        for group in groups.values():
            stacks.extend(_split_duplicates(group, normal, policy))
    return stacks


def _split_duplicates(group: list[_Frame], normal: np.ndarray, policy: GeometryConfig) -> list[list[_Frame]]:
    depths = geom.slice_depths(np.array([f.position for f in group]), normal)
    dups = geom.duplicate_groups(depths, policy.spacing_tolerance_mm)
    if not dups:
        return [group]
    # the same instance received twice (same SOP instance UID and frame) is one frame
    seen: dict[SourceFrame, _Frame] = {}
    for f in group:
        seen.setdefault(f.source, f)
    if len(seen) < len(group):
        return _split_duplicates(list(seen.values()), normal, policy)
    by_acq: dict[str, list[_Frame]] = {}
    for f in group:
        by_acq.setdefault(f.acquisition, []).append(f)
    if len(by_acq) > 1:
        out = []
        for sub in by_acq.values():
            d = geom.slice_depths(np.array([f.position for f in sub]), normal)
            if geom.duplicate_groups(d, policy.spacing_tolerance_mm):
                raise SeriesError("duplicate_positions", kind="geometry", detail="within one acquisition")
            out.append(sub)
        return out
    raise SeriesError("duplicate_positions", kind="geometry",
                      detail=f"{sum(len(g) for g in dups)} frames share {len(dups)} positions")


def _describe(stack: list[_Frame]) -> str:
    _, _, n = geom.check_orientation(np.asarray(stack[0].orientation))
    return f"{geom.acquisition_plane(n)}:{len(stack)}"


# ---------------------------------------------------------------------------------------------
# pixels


def _storage_dtype(f: _Frame) -> np.dtype:
    return np.dtype(("i" if f.signed else "u") + str(f.bits_allocated // 8))


def _decode(stack: list[_Frame], shape: tuple[int, int, int]) -> np.ndarray:
    """Stored pixel values of the (sorted) frames in one preallocated array."""
    fmt = {(f.bits_allocated, f.bits_stored, f.signed) for f in stack}
    if len(fmt) > 1:
        raise SeriesError("inconsistent_pixel_format", kind="inconsistent")
    bits, stored, signed = fmt.pop()
    dtype = _storage_dtype(stack[0])
    out = np.empty(shape, dtype=dtype)
    datasets: dict[Path, Dataset] = {}
    frame_bytes = shape[1] * shape[2] * dtype.itemsize
    shift = bits - stored

    def fix(frame: np.ndarray, big_endian: bool) -> None:
        # native frames, while they are in cache: byte order, then bits above BitsStored
        if big_endian:
            frame.byteswap(inplace=True)
        if shift and signed:
            np.left_shift(frame, shift, out=frame)
            np.right_shift(frame, shift, out=frame)
        elif shift:
            np.bitwise_and(frame, (1 << stored) - 1, out=frame)

    try:
        for k, f in enumerate(stack):
            if f.offset is not None and f.offset >= 0:
                with open(f.path, "rb") as fh:
                    fh.seek(f.offset)
                    if fh.readinto(memoryview(out[k]).cast("B")) != frame_bytes:
                        raise SeriesError("truncated_pixel_data", kind="inconsistent")
                fix(out[k], NATIVE_SYNTAXES[f.syntax] == ">")
                continue
            ds = datasets.get(f.path)
            if ds is None:
                datasets.clear()  # keep one decoded file in memory at a time
                ds = datasets[f.path] = pydicom.dcmread(f.path, force=True)
            if f.offset is not None:  # native, small: the value is in the dataset
                buf = np.frombuffer(ds.PixelData, dtype=dtype.newbyteorder(NATIVE_SYNTAXES[f.syntax]),
                                    count=shape[1] * shape[2], offset=f.index * frame_bytes)
                out[k] = buf.reshape(shape[1:])
                fix(out[k], False)
                continue
            from pydicom.pixels import pixel_array

            arr = pixel_array(ds, index=f.index if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None)
            if arr.shape != shape[1:]:
                raise SeriesError("decode_failed", kind="inconsistent", detail="decoded frame has the wrong shape")
            out[k] = arr
    except SeriesError:
        raise
    except Exception as exc:
        raise SeriesError("decode_failed", kind="inconsistent", detail=type(exc).__name__) from exc
    except BaseException as exc:  # Rust decoders (pylibjpeg-rle) panic with pyo3's PanicException
        if type(exc).__name__ != "PanicException":
            raise
        raise SeriesError("decode_failed", kind="inconsistent", detail="decoder panic") from exc
    return out


def _rescale(raw: np.ndarray, stack: list[_Frame]) -> np.ndarray:
    """Apply RescaleSlope/Intercept: int16 where the values allow (in place), else float32."""
    slopes = np.array([f.slope for f in stack])
    icpts = np.array([f.intercept for f in stack])
    if np.all(slopes == 1.0) and np.all(icpts == np.round(icpts)):
        if np.all(icpts == 0) and raw.dtype.itemsize <= 2:
            return raw
        f0 = stack[0]  # stored values are within BitsStored (masked above); scan only when that is not enough
        lo, hi = (-(1 << (f0.bits_stored - 1)), (1 << (f0.bits_stored - 1)) - 1) if f0.signed else (0, (1 << f0.bits_stored) - 1)
        native = all(f.offset is not None for f in stack)  # codecs may not honour BitsStored
        if not native or lo + icpts.min() < -32768 or hi + icpts.max() > 32767:
            lo, hi = int(raw.min()), int(raw.max())
        if lo + icpts.min() >= -32768 and hi + icpts.max() <= 32767:
            if raw.dtype.itemsize == 2:
                out = raw.view(np.int16)  # modular add in place: the result fits, so the view is exact
            else:
                out = raw.astype(np.int16)
            uniq = np.unique(icpts)
            with np.errstate(over="ignore"):
                if len(uniq) == 1:
                    out += np.int16(int(uniq[0]))
                else:
                    for k, b in enumerate(icpts):
                        out[k] += np.int16(int(b))
            return out
    out32 = np.empty(raw.shape, dtype=np.float32)
    for k in range(raw.shape[0]):
        np.multiply(raw[k], np.float32(slopes[k]), out=out32[k], casting="unsafe")
        out32[k] += np.float32(icpts[k])
    return out32


# ---------------------------------------------------------------------------------------------
# public API


def _volume_of(stack: list[_Frame], policy: GeometryConfig, n_stacks: int, warnings: tuple[str, ...]) -> Volume:
    f0 = stack[0]
    if len({(f.rows, f.cols) for f in stack}) > 1:
        raise SeriesError("inconsistent_dimensions", kind="inconsistent", detail="rows/columns differ")
    spacings = np.array([f.pixel_spacing for f in stack])
    if np.max(np.abs(spacings - spacings[0])) > 1e-3:
        raise SeriesError("inconsistent_dimensions", kind="inconsistent", detail="pixel spacing differs")
    if len(stack) * f0.rows * f0.cols > policy.max_voxels:
        raise SeriesError("too_large", kind="unsupported")
    g = geom.analyse_stack(
        np.array([f.position for f in stack]), np.asarray(f0.orientation), f0.pixel_spacing,
        spacing_tolerance_mm=policy.spacing_tolerance_mm, tilt_tolerance_deg=policy.tilt_tolerance_deg,
        thickness=f0.thickness,
    )
    ordered = [stack[i] for i in g.order]
    actions: list[str] = []
    if any(int(a) != i for i, a in enumerate(g.order)):
        actions.append("sorted:by_position")
    raw = _decode(ordered, (len(ordered), f0.rows, f0.cols))
    array = _rescale(raw, ordered)
    del raw
    source_affine = g.source_affine(np.asarray(ordered[0].position))
    affine = source_affine
    reason = g.needs_resample
    if reason:
        choice = {"gap": policy.on_gap, "tilt": policy.on_tilt, "nonuniform": policy.on_nonuniform}[reason]
        if choice == "refuse":
            raise SeriesError(reason, kind="geometry", detail=f"{g.gaps} missing slices" if reason == "gap" else "")
        array, affine = geom.resample_stack(array, g, cval=float(array.min()))
        actions.append(f"resampled:{reason}")
    else:
        affine, _ = g.regular_affine()
    warn = list(warnings)
    if g.n == 1:
        warn.append("single_slice")
    obl = geom.obliquity_deg(g.row, g.col)
    report = GeometryReport(
        spacing=(g.spacing, *g.pixel_spacing), slice_spacing_uniform=g.uniform,
        slice_spacing_min=g.spacing_min, slice_spacing_max=g.spacing_max, gaps=g.gaps, tilt_deg=round(g.tilt_deg, 4),
        non_square_pixels=abs(g.pixel_spacing[0] - g.pixel_spacing[1]) > 1e-6, oblique=obl > 0.5,
        acquisition_plane=geom.acquisition_plane(g.normal),
        n_slices=g.n, n_stacks=n_stacks, actions=tuple(actions), warnings=tuple(warn),
    )
    sources = tuple(dataclasses.replace(f.source, position=f.position) for f in ordered)
    return Volume(
        array=array, affine=affine, modality=f0.modality or "OT", frame_of_reference_uid=f0.frame_of_reference,
        source=sources, geometry=report, source_affine=source_affine, source_shape=(g.n, f0.rows, f0.cols),
    )


def _frames(paths: Sequence[Path], max_voxels: int) -> list[_Frame]:
    if not paths:
        raise SeriesError("empty_series", kind="inconsistent")
    frames: list[_Frame] = []
    for p in paths:
        frames.extend(_parse_file(Path(p), max_voxels))
    _check_series(frames)
    return frames


def read_stacks(paths: Sequence[Path], policy: GeometryConfig | None = None) -> list[Volume]:
    """Every stack in the files (largest first), each a Volume; raises SeriesError on any problem."""
    policy = policy or GeometryConfig()
    stacks = sorted(_split(_frames(paths, policy.max_voxels), policy), key=len, reverse=True)
    return [_volume_of(s, policy, len(stacks), ()) for s in stacks]


def read_series(paths: Sequence[Path], policy: GeometryConfig | None = None) -> Volume:
    """One stack from the files of one series.

    Several stacks are refused (SeriesError("multiple_stacks")) unless ``policy.multiple_stacks`` is
    "largest", in which case the largest is returned and the report's warnings name the others.
    """
    policy = policy or GeometryConfig()
    stacks = sorted(_split(_frames(paths, policy.max_voxels), policy), key=len, reverse=True)
    if len(stacks) > 1:
        desc = ",".join(_describe(s) for s in stacks)
        if policy.multiple_stacks != "largest":
            raise SeriesError("multiple_stacks", kind="inconsistent", detail=f"{len(stacks)} stacks: {desc}")
        return _volume_of(stacks[0], policy, len(stacks), (f"other_stacks_not_used:{desc}",))
    return _volume_of(stacks[0], policy, 1, ())


def series_files(directory: Path) -> list[Path]:
    """The files of a series folder (recursive, sorted; hidden files and DICOMDIR left out)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SeriesError("empty_series", kind="inconsistent", detail="not a directory")
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )


def read_series_dir(directory: Path, policy: GeometryConfig | None = None) -> Volume:
    """:func:`read_series` on every file in ``directory`` (see :func:`series_files`)."""
    return read_series(series_files(directory), policy)


# ---------------------------------------------------------------------------------------------
# NIfTI


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: Path, modality: str = "CT") -> Volume:
    """A NIfTI file as a Volume (``source=()``); raises SeriesError("unreadable_file" / "not_3d")."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        ras = img.affine
    except Exception as exc:
        raise SeriesError("unreadable_file", kind="inconsistent", detail=type(exc).__name__) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SeriesError("not_3d", kind="unsupported", detail=f"{data.ndim} dimensions")
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    affine = LPS_TO_RAS @ ras @ perm
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    direction = affine[:3, :3] / np.array(spacing)
    row, col = direction[:, 2], direction[:, 1]
    obl = geom.obliquity_deg(row, col)
    report = GeometryReport(
        spacing=spacing, slice_spacing_min=spacing[0], slice_spacing_max=spacing[0],  # type: ignore[arg-type]
        non_square_pixels=abs(spacing[1] - spacing[2]) > 1e-6, oblique=obl > 0.5,
        acquisition_plane=geom.acquisition_plane(direction[:, 0]), n_slices=array.shape[0],
        actions=("read:nifti",),
    )
    return Volume(array=array, affine=affine, modality=modality, source=(), geometry=report)


def load_input(path: Path, policy: GeometryConfig | None = None, modality: str = "CT") -> Volume:
    """A DICOM series folder or a .nii/.nii.gz file as a Volume (``modality`` only for NIfTI)."""
    path = Path(path)
    if path.is_file() and _is_nifti(path):
        return read_nifti(path, modality)
    if path.is_dir():
        return read_series_dir(path, policy)
    raise SeriesError("unreadable_file", kind="inconsistent", detail="neither a folder nor a NIfTI file")


def write_nifti(volume: Volume, path: Path) -> None:
    """Write ``volume`` as NIfTI-1 (.nii or .nii.gz; data i=column, j=row, k=slice; sform and qform =
    the RAS affine). Booleans are written as uint8.

    nibabel builds the header; the voxels go out in one write (C order of (slice, row, column) is
    NIfTI's Fortran order of (i, j, k)), which is about twice as fast as nibabel's chunked writer.
    """
    import gzip

    import nibabel as nib

    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    aff = volume.nifti_affine()
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(arr.dtype)
    hdr.set_data_shape(arr.shape[::-1])
    hdr.set_sform(aff, code=1)
    hdr.set_qform(aff, code=1)
    hdr.set_xyzt_units("mm")
    hdr.set_slope_inter(1.0, 0.0)
    hdr["vox_offset"] = 352
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "wb", **({"compresslevel": 1} if opener is gzip.open else {})) as fh:  # type: ignore[operator]
        fh.write(hdr.binaryblock)
        fh.write(b"\x00" * 4)  # no extensions
        fh.write(memoryview(arr.reshape(-1)).cast("B"))
