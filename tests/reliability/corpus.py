"""A corpus of malformed and hostile DICOM instances, and a raw sender for it.

``build_corpus(folder) -> list[BadCase]`` writes Part-10 files whose *dataset bytes* are sent to the
node exactly as written (pynetdicom's chunked sending streams the bytes after the file meta
without decoding them, so truncated, garbage and wrongly encoded datasets reach the node as they
are). Every case says what the node must do with it:

- ``reject``     a C-STORE failure status (0xA700/0xA900/0xC000/0x0122...) or, for SOP classes the
                 node does not accept, a presentation context the node refuses;
- ``quarantine`` accepted (the bytes are a well-formed DICOM stream), and the series then ends
                 ``quarantined`` with a machine-readable reason;
- ``either``     one of the two (both are correct for this input; the suite checks it got one).

Every case carries canary patient data (``CANARY``) so the privacy test can send the corpus too.
``send_raw(port, files)`` sends files on one association and returns one :class:`SendResult` each.

Run standalone to write the corpus: ``python -m tests.reliability.corpus OUTDIR``.
"""
from __future__ import annotations

import struct
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydicom.dataset import Dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"

#: Canary patient: every value is recognisable, so a leak anywhere is found by a plain search.
UID_ROOT = "1.2.826.0.1.3680043.10.77317731"  # every canary UID starts with this


@dataclass(frozen=True, slots=True)
class Canary:
    """The planted patient data (search for every field in logs, pages, metrics, job records)."""

    name: str = "Zzcanary^Pryvacy^Q"
    patient_id: str = "CNRY-PID-90417"
    birth_date: str = "19030405"
    accession: str = "CNRYACC5521"
    institution: str = "Canary Infirmary Zq"
    description: str = "CNRY-DESC-ABDOMEN"
    uid_root: str = UID_ROOT

    def needles(self) -> tuple[str, ...]:
        """Strings that must never appear outside DICOM files (the UID root catches every UID)."""
        family = self.name.split("^")[0]
        return (self.name, family, family.upper(), self.patient_id, self.birth_date, self.accession,
                self.institution, self.description, self.uid_root, "77317731")


CANARY = Canary()
_counter = iter(range(1, 10**9))


def canary_uid(kind: int) -> str:
    """A fresh, valid UID under the canary root (``kind`` keeps study/series/instance apart)."""
    return f"{UID_ROOT}.{kind}.{next(_counter)}"


@dataclass(frozen=True, slots=True)
class BadCase:
    """One malformed input: files to send on one association and what the node must make of it."""

    name: str
    files: tuple[Path, ...]
    expect: Literal["reject", "quarantine", "either"]
    what: str
    series_uid: str = ""  # the (valid) series UID when the instances may be stored


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the sender saw for one file: a DIMSE status, or why no status came back."""

    file: Path
    status: int | None  # None: no status (see ``problem``)
    problem: str = ""  # "no-context" (SOP class refused at association), "no-response", "not-associated"

    @property
    def acknowledged(self) -> bool:
        """Success or warning status: the node took the instance."""
        return self.status is not None and (self.status == 0 or self.status in (0x0107, 0x0116)
                                            or 0xB000 <= self.status <= 0xBFFF)

    @property
    def refused(self) -> bool:
        """A failure status, or a presentation context the node refused for this SOP class."""
        return (self.status is not None and not self.acknowledged) or self.problem == "no-context"


# ---- building blocks -----------------------------------------------------------------------------

def ct_dataset(study: str, series: str, sop: str, k: int = 0, *, rows: int = 32, cols: int = 32,
               sop_class: str = CT, for_uid: str = "", spacing: float = 2.0) -> Dataset:
    """A complete, valid CT slice with the canary patient (slice ``k`` of an axial stack)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = for_uid or f"{UID_ROOT}.9.{abs(hash(series)) % 10**8}"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = CANARY.name, CANARY.patient_id, CANARY.birth_date, "O"
    ds.AccessionNumber, ds.InstitutionName = CANARY.accession, CANARY.institution
    ds.StudyDescription = ds.SeriesDescription = CANARY.description
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.StudyID, ds.ReferringPhysicianName = "1", ""
    ds.Manufacturer = "corpus"
    ds.Modality = "CT" if sop_class == CT else "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.ImagePositionPatient = [-20.0, -20.0, 10.0 + k * spacing]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.25, 1.25]
    ds.SliceThickness = spacing
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    yy, xx = np.mgrid[0:rows, 0:cols]
    ds.PixelData = ((((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (rows / 3) ** 2) * 1064 + k).astype(np.int16).tobytes()
    return ds


def encode(ds: Dataset, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """The dataset (no file meta) encoded in ``transfer_syntax`` (little endian; deflate applied)."""
    from pydicom.filewriter import write_dataset
    from pydicom.filebase import DicomBytesIO

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if transfer_syntax == DEFLATED:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        raw = c.compress(raw) + c.flush()
    return raw


def element(group: int, elem: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian element, exactly as given (no validation: that is the point)."""
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    if vr in ("OB", "OW", "OF", "SQ", "UT", "UN"):
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def part10(path: Path, dataset_bytes: bytes, *, sop_class: str, sop_uid: str,
           transfer_syntax: str = EXPLICIT_LE) -> Path:
    """Write a Part-10 file: a hand-made file meta (any UID string, unvalidated) + the raw bytes."""
    from dicomnode.net.scp import file_meta_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(file_meta_bytes(sop_class, sop_uid, transfer_syntax, "CORPUS") + dataset_bytes)
    return path


def _ids() -> tuple[str, str, str]:
    return canary_uid(1), canary_uid(2), canary_uid(3)


def _one(folder: Path, name: str, raw: bytes, *, sop_class: str = CT, sop_uid: str | None = None,
         ts: str = EXPLICIT_LE) -> Path:
    return part10(folder / name / "0.dcm", raw, sop_class=sop_class, sop_uid=sop_uid or canary_uid(3),
                  transfer_syntax=ts)


def _series(folder: Path, name: str, datasets: Sequence[Dataset]) -> tuple[Path, ...]:
    return tuple(part10(folder / name / f"{i}.dcm", encode(ds), sop_class=str(ds.SOPClassUID),
                        sop_uid=str(ds.SOPInstanceUID)) for i, ds in enumerate(datasets))


def _stack(n: int = 4, **kw: object) -> tuple[str, list[Dataset]]:
    study, series = canary_uid(1), canary_uid(2)
    return series, [ct_dataset(study, series, canary_uid(3), k, **kw) for k in range(n)]  # type: ignore[arg-type]


# ---- the corpus ------------------------------------------------------------------------------------

def build_corpus(folder: str | Path) -> list[BadCase]:
    """Write every case under ``folder`` and return them (deterministic content apart from UIDs)."""
    folder = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the very values this corpus plants
        return _build(folder)


def _build(folder: Path) -> list[BadCase]:
    cases: list[BadCase] = []

    def add(name: str, files: Sequence[Path], expect: str, what: str, series_uid: str = "") -> None:
        cases.append(BadCase(name, tuple(files), expect, what, series_uid))  # type: ignore[arg-type]

    # -- bytes that are not a dataset ------------------------------------------------------------
    study, series, sop = _ids()
    full = encode(ct_dataset(study, series, sop))
    add("truncated_header", [_one(folder, "truncated_header", full[:90], sop_uid=sop)], "reject",
        "dataset cut inside the patient module")
    add("garbage", [_one(folder, "garbage", np.random.default_rng(1).bytes(3000))], "reject", "random bytes")
    add("empty_dataset", [_one(folder, "empty_dataset", b"")], "reject", "zero-length dataset")
    study, series, sop = _ids()
    add("bad_deflate", [_one(folder, "bad_deflate", b"\x78\x9c" + np.random.default_rng(2).bytes(500),
                             sop_uid=sop, ts=DEFLATED)], "reject", "deflated syntax, corrupt stream")
    study, series, sop = _ids()
    huge_len = element(0x0008, 0x0016, "UI", CT.encode()) + element(0x0008, 0x0018, "UI", sop.encode()) + \
        struct.pack("<HH2sHI", 0x0008, 0x1030, b"UT", 0, 0xFFFFFFF0) + b"x" * 64
    add("huge_element_length", [_one(folder, "huge_element_length", huge_len, sop_uid=sop)], "reject",
        "an element declaring 4 GiB of value in a 200-byte dataset")

    # -- wrong VRs -----------------------------------------------------------------------------------
    study, series, sop = _ids()
    ds = ct_dataset(study, series, sop)
    del ds.SeriesInstanceUID
    raw = encode(ds)
    raw = element(0x0020, 0x000E, "FD", struct.pack("<d", 1.5e-300)) + raw  # out of order, wrong VR
    add("series_uid_as_float", [_one(folder, "series_uid_as_float", raw, sop_uid=sop)], "reject",
        "Series Instance UID encoded as FD (binary float)")
    series, stack = _stack(3)
    raws = []
    for d in stack:
        del d.Rows
        body = encode(d)
        # Rows as a decimal string ("DS") with a fractional value, inserted in tag order
        at = body.find(struct.pack("<HH", 0x0028, 0x0011))
        raws.append(body[:at] + element(0x0028, 0x0010, "DS", b"31.7e9") + body[at:])
    files = [part10(folder / "rows_as_ds" / f"{i}.dcm", r, sop_class=CT, sop_uid=str(d.SOPInstanceUID))
             for i, (r, d) in enumerate(zip(raws, stack))]
    add("rows_as_ds", files, "either", "Rows encoded as DS '31.7e9'", series)
    series, stack = _stack(3)
    raws = []
    for d in stack:
        del d.ImagePositionPatient
        body = encode(d)
        at = body.find(struct.pack("<HH", 0x0020, 0x0037))
        raws.append(body[:at] + element(0x0020, 0x0032, "OB", b"\xff" * 24) + body[at:])
    files = [part10(folder / "position_as_ob" / f"{i}.dcm", r, sop_class=CT, sop_uid=str(d.SOPInstanceUID))
             for i, (r, d) in enumerate(zip(raws, stack))]
    add("position_as_ob", files, "either", "Image Position (Patient) as OB binary", series)

    # -- pixel data ------------------------------------------------------------------------------------
    series, stack = _stack(3)
    for d in stack:
        del d.PixelData
    add("missing_pixel_data", _series(folder, "missing_pixel_data", stack), "quarantine", "no (7FE0,0010)", series)
    series, stack = _stack(3)
    files = []
    for i, d in enumerate(stack):
        body = encode(d)
        files.append(part10(folder / "truncated_pixels" / f"{i}.dcm", body[:-1000], sop_class=CT,
                            sop_uid=str(d.SOPInstanceUID)))
    add("truncated_pixels", files, "either", "pixel data shorter than its declared length", series)
    series, stack = _stack(2)
    for d in stack:
        d.Rows = d.Columns = 65535
    add("huge_dimensions", _series(folder, "huge_dimensions", stack), "quarantine",
        "65535 x 65535 declared, 2 KiB of pixels", series)
    series, stack = _stack(1)
    stack[0].NumberOfFrames = 2147483647
    add("huge_frame_count", _series(folder, "huge_frame_count", stack), "quarantine",
        "NumberOfFrames 2^31-1 on a single-frame class", series)
    series, stack = _stack(2)
    files = []
    for i, d in enumerate(stack):
        d.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x00" * 16 + \
            b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # encapsulated: empty BOT, one garbage fragment
        d["PixelData"].VR = "OB"
        d["PixelData"].is_undefined_length = True
        files.append(part10(folder / "bad_jpeg" / f"{i}.dcm", encode(d), sop_class=CT, sop_uid=str(d.SOPInstanceUID),
                            transfer_syntax=JPEG_LOSSLESS))
    add("bad_jpeg", files, "quarantine", "JPEG Lossless declared, fragment is not a JPEG stream", series)

    # -- inconsistent geometry ---------------------------------------------------------------------------
    series, stack = _stack(5)
    stack[2].ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    add("mixed_orientation", _series(folder, "mixed_orientation", stack), "quarantine",
        "one slice sagittal in an axial stack", series)
    series, stack = _stack(4)
    stack[3].ImagePositionPatient = stack[1].ImagePositionPatient
    add("duplicate_positions", _series(folder, "duplicate_positions", stack), "quarantine",
        "two slices at one position", series)
    series, stack = _stack(4)
    stack[1].Rows = stack[1].Columns = 16
    stack[1].PixelData = stack[1].PixelData[: 16 * 16 * 2]
    add("mixed_dimensions", _series(folder, "mixed_dimensions", stack), "quarantine",
        "one slice 16x16 in a 32x32 stack", series)
    series, stack = _stack(3)
    for d in stack:
        d.PixelSpacing = [0.0, 0.0]
    add("zero_spacing", _series(folder, "zero_spacing", stack), "quarantine", "PixelSpacing 0\\0", series)
    series, stack = _stack(3)
    for d in stack:
        d.ImagePositionPatient = ["nan", "inf", "1e400"]
    add("non_finite_position", _series(folder, "non_finite_position", stack), "quarantine",
        "NaN/inf positions", series)
    series, stack = _stack(3)
    for d in stack:
        del d.ImageOrientationPatient
    add("missing_orientation", _series(folder, "missing_orientation", stack), "quarantine",
        "no Image Orientation (Patient)", series)

    # -- hostile UIDs --------------------------------------------------------------------------------------
    study, series, _ = _ids()
    for name, sop_uid, where in (
        ("traversal_sop_uid", "../../etc/passwd", "command + dataset SOP Instance UID"),
        ("traversal_sop_uid_dotted", "1.2.3/../4", "command + dataset SOP Instance UID"),
        ("long_sop_uid", UID_ROOT + "." + "2" * 40, "71-character SOP Instance UID (canary root)"),
    ):
        add(name, [_one(folder, name, encode(ct_dataset(study, series, sop_uid)), sop_uid=sop_uid)], "reject", where)
    for name, bad, field in (
        ("traversal_series_uid", "1.2.3/../../../../tmp/dicomnode-pwned", "SeriesInstanceUID"),
        ("traversal_study_uid", "../../../../etc", "StudyInstanceUID"),
        ("long_series_uid", UID_ROOT + "." + "9" * 60, "SeriesInstanceUID"),
        ("nul_in_series_uid", "1.2.3\x00/../x", "SeriesInstanceUID"),
    ):
        study, series, sop = _ids()
        ds = ct_dataset(study, series, sop)
        setattr(ds, field, bad)
        add(name, [_one(folder, name, encode(ds), sop_uid=sop)], "reject", f"{field} = {bad[:24]!r}...")
    study, series, sop = _ids()
    ds = ct_dataset(study, series, sop)
    del ds.StudyInstanceUID
    add("missing_study_uid", [_one(folder, "missing_study_uid", encode(ds), sop_uid=sop)], "reject",
        "no Study Instance UID")
    study, series, sop = _ids()
    add("sop_uid_mismatch", [_one(folder, "sop_uid_mismatch", encode(ct_dataset(study, series, sop)),
                                  sop_uid=canary_uid(3))], "reject", "dataset SOP UID differs from the command")

    # -- SOP classes that are not CT/MR images ---------------------------------------------------------
    for name, cls in (("rtstruct_class", RT_STRUCT), ("segmentation_class", SEGMENTATION)):
        study, series, sop = _ids()
        ds = ct_dataset(study, series, sop, sop_class=cls)
        add(name, [_one(folder, name, encode(ds), sop_class=cls, sop_uid=sop)], "reject",
            f"storage class {cls} (not an image class the node takes)")
    study, series, sop = _ids()
    ds = ct_dataset(study, series, sop, sop_class=RT_STRUCT)
    add("class_mismatch", [_one(folder, "class_mismatch", encode(ds), sop_class=CT, sop_uid=sop)], "reject",
        "CT command carrying an RT Structure Set dataset")
    series, stack = _stack(2, sop_class=SECONDARY_CAPTURE)
    add("secondary_capture_only", _series(folder, "secondary_capture_only", stack), "quarantine",
        "a series of secondary captures (accepted class, not a volume)", series)
    return cases


# ---- sending ----------------------------------------------------------------------------------------

def send_raw(port: int, files: Sequence[Path], *, calling: str = "CORPUS", called: str = "DICOMNODE",
             timeout: float = 30.0) -> list[SendResult]:
    """Send ``files`` on one association, bytes as stored (pynetdicom chunked sending).

    Contexts are proposed for each file's SOP class and transfer syntax. Files whose class the node
    refuses get ``problem="no-context"``; a file sent when the association has gone gets
    ``"not-associated"``; a request without an answer (abort, timeout) ``"no-response"``.
    """
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config, dimse_primitives, evt

    from dicomnode.net.dimse import VERIFICATION, set_nodelay

    _config.STORE_SEND_CHUNKED_DATASET = True
    # a hostile peer does not validate its own UIDs: let over-long ones through the client
    dimse_primitives.set_uid = _unvalidated(dimse_primitives.set_uid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metas = [read_file_meta_info(f) for f in files]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION)  # so the association stands even when every class is refused
    for pair in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    results: list[SendResult] = []
    try:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts} \
            if assoc.is_established else set()
        for f, m in zip(files, metas):
            if not assoc.is_established:
                results.append(SendResult(f, None, "not-associated"))
                continue
            if (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) not in accepted:
                results.append(SendResult(f, None, "no-context"))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                st = assoc.send_c_store(f)
            results.append(SendResult(f, int(st.Status), "") if "Status" in st else SendResult(f, None, "no-response"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _unvalidated(set_uid: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(set_uid, "unvalidated", False):
        return set_uid

    def wrapper(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                validate: bool = True) -> Any:
        return set_uid(value, name, allow_empty, allow_none, False)

    wrapper.unvalidated = True  # type: ignore[attr-defined]
    return wrapper


if __name__ == "__main__":  # python -m tests.reliability.corpus OUTDIR
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    for case in build_corpus(out):
        print(f"{case.expect:10} {case.name:28} {len(case.files):2} file(s)  {case.what}")
