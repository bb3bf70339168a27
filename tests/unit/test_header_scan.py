"""The SCP's fast header scanner agrees with pydicom, and says "not sure" instead of guessing."""
from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dicomnode.net.header import _checked, file_meta_bytes, parse_header, scan_header, split_multi

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _dataset(with_sequence: bool, frames: int | None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    ds.PatientName = "CANARY^PATIENT"
    if with_sequence:  # undefined-length sequence (with nested items) before the wanted tags
        inner = Dataset()
        inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        inner.ReferencedSOPInstanceUID = "1.2.3.9"
        inner.ReferencedFrameNumber = [1, 2]
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3.8"
        item.ReferencedImageSequence = Sequence([inner])
        item["ReferencedImageSequence"].is_undefined_length = True
        inner.is_undefined_length_sequence_item = True
        item.is_undefined_length_sequence_item = True
        ds.ReferencedImageSequence = Sequence([item, Dataset()])
        ds["ReferencedImageSequence"].is_undefined_length = True
    ds.InstanceNumber = 17
    ds.ImagePositionPatient = [-100.5, 20, 1.25e2]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.866025, -0.5]
    ds.FrameOfReferenceUID = "1.2.3.4.100"
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00" * 8
    return ds


def _encode(ds: Dataset, ts: str) -> bytes:
    fp = BytesIO()
    from pydicom.filebase import DicomFileLike

    f = DicomFileLike(fp)
    f.is_little_endian, f.is_implicit_VR = True, ts == IMPLICIT
    write_dataset(f, ds)
    return fp.getvalue()


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("with_sequence", [False, True])
@pytest.mark.parametrize("frames", [None, 3])
def test_scan_matches_pydicom(ts: str, with_sequence: bool, frames: int | None) -> None:
    raw = _encode(_dataset(with_sequence, frames), ts)
    vals = scan_header(raw, ts)
    assert vals is not None
    meta = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6.7", ts, "X")
    slow = parse_header(meta + raw, sop_class="1.2.840.10008.5.1.4.1.1.2", sop_instance="1.2.3.4.5.6.7")
    full = {k: vals.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                                     "Modality", "InstanceNumber", "FrameOfReferenceUID", "NumberOfFrames")}
    full["ImagePositionPatient"] = split_multi(vals.get("ImagePositionPatient"))
    full["ImageOrientationPatient"] = split_multi(vals.get("ImageOrientationPatient"))
    fast = _checked(full, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6.7")
    assert fast == slow
    assert fast["position"] == (-100.5, 20.0, 125.0) and fast["frames"] == (frames or 1)


def test_sequences_really_have_undefined_length() -> None:
    raw = _encode(_dataset(True, None), EXPLICIT)
    assert b"\xfe\xff\xdd\xe0" in raw and b"\xfe\xff\x0d\xe0" in raw  # delimiters present


def test_not_sure_cases_return_none() -> None:
    raw = _encode(_dataset(True, None), EXPLICIT)
    assert scan_header(raw[:40], EXPLICIT) is None  # the header does not fit the fragment
    assert scan_header(raw, "1.2.840.10008.1.2.1.99") is None  # deflate: needs inflating
    assert scan_header(b"\x08\x00\x18\x00UI\xff\x7f1.2", EXPLICIT) is None  # length beyond the end


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([EXPLICIT, IMPLICIT]))
def test_scanner_never_raises(data: bytes, ts: str) -> None:
    out = scan_header(data, ts)
    assert out is None or isinstance(out, dict)


def test_scan_matches_pydicom_on_real_scanner_files(shared_data) -> None:  # type: ignore[no-untyped-def]
    """Real GE CT slices (private tags, sequences): the fast path agrees with pydicom."""
    import pydicom

    from dicomnode.net.header import header_from_chunks

    files = sorted((shared_data / "dcmqi_seg" / "ct-3slice").glob("*.dcm"))
    assert files
    for f in files:
        raw = f.read_bytes()
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        body = raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]
        assert scan_header(body, ts) is not None or ts in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
        meta = file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, "X")
        kw = {"sop_class": str(ds.SOPClassUID), "sop_instance": str(ds.SOPInstanceUID)}
        assert header_from_chunks([memoryview(body)], ts, meta, **kw) == parse_header(meta + body, **kw)
