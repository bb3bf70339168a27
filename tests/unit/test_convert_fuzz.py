"""Property-based fuzzing of the parsing and conversion path (issue 9).

Valid small series (native, compressed, Enhanced multi-frame) are mutated - header values replaced
by hostile ones (wrong types, NaN, huge or negative sizes, wrong counts), attributes deleted, bytes
flipped, files truncated - and converted. The converter must return a sane Volume or raise
SeriesError; any other exception is a failure. Thousands of inputs in CI (~30 s);
``HYPOTHESIS_PROFILE=nightly`` runs 20 times more.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO

from dicomnode.config import GeometryConfig
from dicomnode.errors import SeriesError
from dicomnode.series.convert import read_series, read_stacks
from tests.unit.test_convert_synth import make_stack

SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 1
FUZZ = settings(max_examples=1000 * SCALE, deadline=None, derandomize=SCALE == 1,
                suppress_health_check=list(HealthCheck))
POLICY = GeometryConfig(max_voxels=50_000_000, on_gap="resample")

BASES = {
    "explicit": dict(syntax="1.2.840.10008.1.2.1"),
    "implicit_shuffled": dict(syntax="1.2.840.10008.1.2", order=[2, 0, 1]),
    "big_endian": dict(syntax="1.2.840.10008.1.2.2"),
    "deflated": dict(syntax="1.2.840.10008.1.2.1.99"),
    "rle": dict(syntax="1.2.840.10008.1.2.5"),
    "jpegls": dict(syntax="1.2.840.10008.1.2.4.80"),
    "j2k": dict(syntax="1.2.840.10008.1.2.4.90", rows=32, cols=32),
    "enhanced": dict(enhanced=True),
    "enhanced_rle": dict(enhanced=True, syntax="1.2.840.10008.1.2.5"),
}


@functools.cache
def base_files(name: str) -> tuple[bytes, ...]:
    """The bytes of the files of a small valid series (generated once)."""
    kw = dict(n=3, rows=10, cols=8, signed=True) | BASES[name]
    d = Path(tempfile.mkdtemp(prefix="fuzzbase"))
    try:
        stack = make_stack(d, **kw)  # type: ignore[arg-type]
        return tuple(p.read_bytes() for p in stack.paths)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def _lenient() -> Iterator[None]:
    """Let pydicom write invalid values (the point of fuzzing) and keep its warnings quiet."""
    cfg = pydicom.config.settings
    old = cfg.writing_validation_mode, cfg.reading_validation_mode
    cfg.writing_validation_mode = cfg.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        cfg.writing_validation_mode, cfg.reading_validation_mode = old


@contextmanager
def _memory_cap(extra_bytes: int = 1 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra_bytes`` while converting:
    a converter that allocates for what the header claims (instead of refusing) fails the test with
    MemoryError rather than eating the machine."""
    with open("/proc/self/statm") as fh:
        vsz = int(fh.read().split()[0]) * resource.getpagesize()
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vsz + extra_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def _convert(files: list[bytes]) -> None:
    """Write ``files``, convert them; only a sane Volume or SeriesError is acceptable."""
    d = Path(tempfile.mkdtemp(prefix="fuzz"))
    try:
        paths = []
        for i, b in enumerate(files):
            p = d / f"{i}.dcm"
            p.write_bytes(b)
            paths.append(p)
        for fn in (read_stacks, read_series):
            try:
                with _memory_cap():
                    out = fn(paths, POLICY)
            except SeriesError as exc:
                assert exc.reason and exc.reason.replace("_", "").isalpha(), exc.reason
                continue
            for vol in out if isinstance(out, list) else [out]:
                assert vol.array.ndim == 3 and np.all(np.isfinite(vol.affine))
                assert len(vol.source) == vol.source_shape[0]
                assert vol.array.dtype in (np.int16, np.uint16, np.uint8, np.int8, np.float32, np.int32, np.uint32)
    finally:
        shutil.rmtree(d, ignore_errors=True)


numbers = st.one_of(
    st.integers(-3, 40), st.sampled_from([0, 1, 8, 12, 16, 32, 64, 255, 4096, 65535, 2**31 - 1]),
)
ds_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "abc", "1e400", "-0", " 1 ", "1\\2", "nan"]),
    st.integers(-10**9, 10**9).map(str),
)
MUTABLE_US = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel"]
MUTABLE_DS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
              "SliceThickness", "EchoTime"]
MUTABLE_STR = {"PhotometricInterpretation": "CS", "Modality": "CS", "SeriesInstanceUID": "UI", "SOPInstanceUID": "UI",
               "FrameOfReferenceUID": "UI", "NumberOfFrames": "IS", "AcquisitionNumber": "IS", "EchoNumbers": "IS"}
DELETABLE = MUTABLE_US + MUTABLE_DS + list(MUTABLE_STR) + [
    "PixelData", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "SOPClassUID"]

mutation = st.one_of(
    st.tuples(st.just("us"), st.sampled_from(MUTABLE_US), numbers),
    st.tuples(st.just("ds"), st.sampled_from(MUTABLE_DS), st.lists(ds_values, max_size=7)),
    st.tuples(st.just("str"), st.sampled_from(sorted(MUTABLE_STR)),
              st.one_of(st.sampled_from(["MONOCHROME1", "RGB", "YBR_FULL", "CT", "MR", "", "1.2.3", "-1", "0",
                                         "1000000000", "99999999999"]), st.text(max_size=12))),
    st.tuples(st.just("del"), st.sampled_from(DELETABLE), st.none()),
    st.tuples(st.just("syntax"), st.sampled_from([
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50", "1.2.3.4", ""]), st.none()),
    st.tuples(st.just("pixels"), st.sampled_from(["half", "empty", "double", "odd"]), st.none()),
    st.tuples(st.just("frames"), st.sampled_from(["drop_item", "drop_position", "drop_orientation"]), st.none()),
)

TAGS = {kw: pydicom.datadict.tag_for_keyword(kw) for kw in MUTABLE_US + MUTABLE_DS + list(MUTABLE_STR)}


def _mutate(data: bytes, muts: list[tuple[str, str, object]]) -> bytes:
    try:
        ds = pydicom.dcmread(DicomBytesIO(data), force=True)
    except Exception:
        return data
    little = not getattr(ds, "is_big_endian_file", False) and ds.file_meta.get("TransferSyntaxUID") != "1.2.840.10008.1.2.2"
    implicit = ds.file_meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2"

    def raw(tag: int, vr: str, value: bytes) -> None:
        # raw bytes are written as they are: invalid values survive into the file
        value = value + b" " * (len(value) % 2)
        ds._dict[pydicom.tag.Tag(tag)] = RawDataElement(
            pydicom.tag.Tag(tag), vr, len(value), value, 0, implicit, little)

    for kind, key, value in muts:
        if kind == "us":
            raw(TAGS[key], "US", (int(value) % 65536).to_bytes(2, "little" if little else "big"))  # type: ignore[call-overload]
        elif kind == "ds":
            raw(TAGS[key], "DS", "\\".join(value).encode("latin-1", "replace"))  # type: ignore[arg-type]
        elif kind == "str":
            raw(TAGS[key], MUTABLE_STR[key], str(value).encode("utf-8"))
        elif kind == "del" and key in ds:
            delattr(ds, key)
        elif kind == "syntax":
            ds.file_meta.TransferSyntaxUID = key
        elif kind == "pixels" and "PixelData" in ds:
            px = ds.PixelData
            ds.PixelData = {"half": px[: len(px) // 2], "empty": b"", "double": px + px, "odd": px[:-1]}[key]
        elif kind == "frames" and "PerFrameFunctionalGroupsSequence" in ds:
            seq = ds.PerFrameFunctionalGroupsSequence
            if key == "drop_item" and len(seq):
                del seq[0]
            elif key == "drop_position" and len(seq) and "PlanePositionSequence" in seq[-1]:
                del seq[-1].PlanePositionSequence
            elif key == "drop_orientation" and "SharedFunctionalGroupsSequence" in ds:
                shared = ds.SharedFunctionalGroupsSequence[0]
                if "PlaneOrientationSequence" in shared:
                    del shared.PlaneOrientationSequence
    out = DicomBytesIO()
    try:
        ds.save_as(out, enforce_file_format=False)
    except Exception:
        return data[: len(data) // 3]  # could not even be written: fuzz with a truncated file instead
    return out.getvalue()


@FUZZ
@given(base=st.sampled_from(sorted(BASES)), which=st.integers(0, 2),
       muts=st.lists(mutation, min_size=1, max_size=4), everywhere=st.booleans())
def test_header_mutations_only_ever_raise_series_error(base, which, muts, everywhere) -> None:
    with _lenient():
        files = list(base_files(base))
        for i in range(len(files)):
            if everywhere or i == which % len(files):
                files[i] = _mutate(files[i], muts)
        _convert(files)


@FUZZ
@given(base=st.sampled_from(sorted(BASES)), which=st.integers(0, 2),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=12),
       cut=st.one_of(st.none(), st.floats(0, 1)), region=st.sampled_from(["header", "anywhere"]))
def test_byte_mutations_only_ever_raise_series_error(base, which, flips, cut, region) -> None:
    with _lenient():
        files = list(base_files(base))
        i = which % len(files)
        b = bytearray(files[i])
        span = min(len(b), 1600) if region == "header" else len(b)
        for where, value in flips:
            b[min(int(where * span), len(b) - 1)] = value
        if cut is not None:
            b = b[: int(cut * len(b))]
        files[i] = bytes(b)
        _convert(files)
