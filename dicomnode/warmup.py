"""Warm-up of the result writers, so the first real series after a start does not pay for it.

highdicom reads its IOD/module definitions (JSON) and Python imports its modules lazily: on this
machine that is ~1-1.5 s on the first SEG of a process. :func:`warm_up` builds a SEG and an SR
for a tiny synthetic 2-slice CT held in memory (no files, no patient data, nothing sent).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from dicomnode.config import ResultsConfig

log = logging.getLogger(__name__)


def _datasets() -> list:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(2):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CT", "", "", "", ""
        ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Rows, ds.Columns = 1, k + 1, 4, 4
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k)], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def warm_up(results: ResultsConfig) -> float:
    """Build one SEG + SR in memory; returns the seconds it took. Never raises (logs instead)."""
    t0 = time.perf_counter()
    try:
        from dicomnode.infer.models import Code, LabelInfo, ModelManifest, Prediction
        from dicomnode.results.seg import build_seg
        from dicomnode.results.sr import ReportFindings, build_sr, measure_predictions
        from dicomnode.volume import SourceFrame, Volume, affine_from_dicom

        headers = _datasets()
        affine = affine_from_dicom(np.zeros(3), np.array([1.0, 0, 0, 0, 1.0, 0]), (1.0, 1.0), np.array([0, 0, 1.0]))
        frames = tuple(SourceFrame(str(d.SOPClassUID), str(d.SOPInstanceUID), 1, (0.0, 0.0, float(k)))
                       for k, d in enumerate(headers))
        image = Volume(np.zeros((2, 4, 4), np.int16), affine, source=frames)
        labels = np.zeros((2, 4, 4), np.int16)
        labels[:, 1:3, 1:3] = 1
        manifest = ModelManifest(
            name="warmup", version="0", modalities=("CT",), spacing_mm=(1.0, 1.0, 1.0), windows=((0.0, 1.0),),
            normalisation="window", patch=(2, 4, 4), input_name="INPUT", output_name="OUTPUT",
            labels=(LabelInfo(1, "warmup", Code("91723000", "SCT", "Anatomical Structure"),
                              Code("38266002", "SCT", "Entire body as a whole"), (255, 0, 0)),))
        pred = Prediction(image.with_array(labels), manifest)
        seg = build_seg(headers, [pred], results)
        build_sr(headers, seg, ReportFindings(segments=measure_predictions([pred], image)), results)
    except Exception:  # noqa: BLE001 - a warm-up must never stop the node
        log.warning("result writers warm-up failed", exc_info=True)
    return time.perf_counter() - t0
