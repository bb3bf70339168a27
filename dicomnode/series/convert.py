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
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from dicomnode.config import GeometryConfig
from dicomnode.errors import SeriesError
from dicomnode.series import geometry as geom
from dicomnode.series.frames import (  # re-exported: part of this module's API
    COMPRESSED_SYNTAXES, NATIVE_SYNTAXES, SUPPORTED_TRANSFER_SYNTAXES, Frame, parse_file, read_headers,
)
from dicomnode.volume import LPS_TO_RAS, GeometryReport, SourceFrame, Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "COMPRESSED_SYNTAXES", "NATIVE_SYNTAXES", "SUPPORTED_TRANSFER_SYNTAXES", "load_input", "read_headers", "read_nifti",
    "read_series", "read_series_dir", "read_stacks", "series_files", "write_nifti",
]

# ---------------------------------------------------------------------------------------------
# stacks


def _check_series(frames: list[Frame]) -> None:
    if len({f.modality for f in frames}) > 1:
        raise SeriesError("mixed_modalities", kind="inconsistent")
    if len({f.series for f in frames}) > 1:
        raise SeriesError("mixed_series", kind="inconsistent")
    if len({f.frame_of_reference for f in frames}) > 1:
        raise SeriesError("mixed_frame_of_reference", kind="inconsistent")


def _split(frames: list[Frame], policy: GeometryConfig) -> list[list[Frame]]:
    """Frames grouped into stacks; raises SeriesError("duplicate_positions") when they cannot be."""
    tol = policy.orientation_tolerance
    by_ori: list[tuple[np.ndarray, list[Frame]]] = []
    for f in frames:
        o = np.asarray(f.orientation)
        for ref, members in by_ori:
            if np.max(np.abs(ref - o)) <= max(tol, 1e-6):
                members.append(f)
                break
        else:
            by_ori.append((o, [f]))
    stacks: list[list[Frame]] = []
    for ori, members in by_ori:
        _, _, normal = geom.check_orientation(ori)
        groups: dict[tuple[object, ...], list[Frame]] = {}
        for f in members:
            groups.setdefault(f.keys, []).append(f)
        for group in groups.values():
            stacks.extend(_split_duplicates(group, normal, policy))
    return stacks


def _split_duplicates(group: list[Frame], normal: np.ndarray, policy: GeometryConfig) -> list[list[Frame]]:
    depths = geom.slice_depths(np.array([f.position for f in group]), normal)
    dups = geom.duplicate_groups(depths, policy.spacing_tolerance_mm)
    if not dups:
        return [group]
    # the same instance received twice (same SOP instance UID and frame) is one frame
    seen: dict[SourceFrame, Frame] = {}
    for f in group:
        seen.setdefault(f.source, f)
    if len(seen) < len(group):
        return _split_duplicates(list(seen.values()), normal, policy)
    by_acq: dict[str, list[Frame]] = {}
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


def _describe(stack: list[Frame]) -> str:
    _, _, n = geom.check_orientation(np.asarray(stack[0].orientation))
    return f"{geom.acquisition_plane(n)}:{len(stack)}"


# ---------------------------------------------------------------------------------------------
# pixels


def _storage_dtype(f: Frame) -> np.dtype:
    return np.dtype(("i" if f.signed else "u") + str(f.bits_allocated // 8))


def _decode(stack: list[Frame], shape: tuple[int, int, int]) -> np.ndarray:
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
                import pydicom

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


def _rescale(raw: np.ndarray, stack: list[Frame]) -> np.ndarray:
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


def _volume_of(stack: list[Frame], policy: GeometryConfig, n_stacks: int, warnings: tuple[str, ...]) -> Volume:
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
    reason = g.needs_resample
    if reason:  # decide before decoding anything
        choice = {"gap": policy.on_gap, "tilt": policy.on_tilt, "nonuniform": policy.on_nonuniform}[reason]
        if choice == "refuse":
            raise SeriesError(reason, kind="geometry", detail=f"{g.gaps} missing slices" if reason == "gap" else "")
        _, k = g.regular_affine()
        if k > 4 * g.n + 16 or k * f0.rows * f0.cols > policy.max_voxels:
            # a few missing slices are filled in; a grid mostly made of filling is refused
            raise SeriesError(reason, kind="geometry", detail=f"a regular grid needs {k} slices for {g.n} acquired")
    raw = _decode(ordered, (len(ordered), f0.rows, f0.cols))
    array = _rescale(raw, ordered)
    del raw
    source_affine = g.source_affine(np.asarray(ordered[0].position))
    affine = source_affine
    if reason:
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


def _frames(paths: Sequence[Path], max_voxels: int) -> list[Frame]:
    if not paths:
        raise SeriesError("empty_series", kind="inconsistent")
    frames: list[Frame] = []
    for p in paths:
        frames.extend(parse_file(Path(p), max_voxels))
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


_NIFTI_TYPES = {"uint8": 2, "int16": 4, "int32": 8, "float32": 16, "float64": 64, "int8": 256, "uint16": 512,
                "uint32": 768, "int64": 1024, "uint64": 1280}


def _quaternion(rot: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z), w >= 0, of the rotation closest to ``rot`` (as nibabel's mat2quat)."""
    qxx, qyx, qzx, qxy, qyy, qzy, qxz, qyz, qzz = rot.flat
    k = np.array([
        [qxx - qyy - qzz, 0, 0, 0],
        [qyx + qxy, qyy - qxx - qzz, 0, 0],
        [qzx + qxz, qzy + qyz, qzz - qxx - qyy, 0],
        [qyz - qzy, qzx - qxz, qxy - qyx, qxx + qyy + qzz],
    ]) / 3.0
    vals, vecs = np.linalg.eigh(k)
    q = vecs[[3, 0, 1, 2], int(np.argmax(vals))]
    return -q if q[0] < 0 else q


def _nifti_header(shape: tuple[int, ...], dtype: np.dtype, affine: np.ndarray) -> bytes:
    """A NIfTI-1 single-file header (348 bytes + 4 empty extension bytes): sform = ``affine``, qform =
    its closest rigid part (qfac for a left-handed one), units mm, no scaling. Same fields as nibabel
    writes (tested against it); written here so `dicomnode convert` does not import nibabel."""
    if dtype.name not in _NIFTI_TYPES:
        raise ValueError(f"no NIfTI data type for {dtype}")
    aff = np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    rot = aff[:3, :3] / zooms
    qfac = 1.0 if np.linalg.det(rot) > 0 else -1.0
    rot[:, 2] *= qfac
    u, _, vt = np.linalg.svd(rot)  # closest orthogonal matrix (the qform cannot hold shears)
    quat = _quaternion(u @ vt)
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    h[38:39] = b"r"
    dim = [len(shape), *shape] + [1] * (7 - len(shape))
    struct.pack_into("<8h", h, 40, *dim)
    struct.pack_into("<hh", h, 70, _NIFTI_TYPES[dtype.name], dtype.itemsize * 8)
    struct.pack_into("<8f", h, 76, qfac, *zooms, *([1.0] * 4))
    struct.pack_into("<3f", h, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    h[123] = 2 | 8  # xyzt_units: mm, s
    struct.pack_into("<hh", h, 252, 1, 1)  # qform_code, sform_code: scanner
    struct.pack_into("<6f", h, 256, *quat[1:], *aff[:3, 3])
    struct.pack_into("<12f", h, 280, *aff[:3, :].flat)
    h[344:348] = b"n+1\x00"
    return bytes(h)


def write_nifti(volume: Volume, path: Path) -> None:
    """Write ``volume`` as NIfTI-1 (.nii or .nii.gz; data i=column, j=row, k=slice; sform = the RAS
    affine, qform its rigid part). Booleans are written as uint8; raises ValueError for a dtype
    NIfTI cannot hold.

    The voxels go out in one pass straight from the array (C order of (slice, row, column) is NIfTI's
    Fortran order of (i, j, k)), about twice as fast as nibabel's chunked writer.
    """
    import gzip

    arr = volume.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    header = _nifti_header(arr.shape[::-1], arr.dtype, volume.nifti_affine())
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "wb", **({"compresslevel": 1} if opener is gzip.open else {})) as fh:  # type: ignore[operator]
        fh.write(header)
        flat = memoryview(arr.reshape(-1)).cast("B")
        step = 16 << 20  # chunks: gzip would otherwise hold the whole compressed volume in memory
        for start in range(0, len(flat), step):
            fh.write(flat[start:start + step])
