"""DICOM-SEG writing: segments, codes, frame references, grids, determinism (read back with the
node's own reader, which places frames by position and cross-checks the source references)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dicomnode.config import ResultsConfig
from dicomnode.errors import SeriesError
from dicomnode.infer.models import Prediction
from dicomnode.results.reading import read_seg
from dicomnode.results.seg import LABELMAP_SEG_STORAGE, SEG_STORAGE, build_seg
from tests.dicom_synth import SAGITTAL, ellipsoid, make_series, manifest, reorient, source_volume

CFG = ResultsConfig()


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(shape, (4, 10, 12), (2.5, 5, 6))] = 1
    lab[ellipsoid(shape, (8, 22, 28), (2, 6, 7))] = 2
    return lab


def _expected_by_slice(src_vol, mask: np.ndarray, reading) -> np.ndarray:
    """``mask`` (in ``src_vol.source`` order) reordered into the reader's slice order (by UID)."""
    pos = {f.sop_instance_uid: i for i, f in enumerate(src_vol.source)}
    return mask[[pos[f.sop_instance_uid] for f in reading.grid.source]]


def test_segments_codes_and_frames() -> None:
    src = make_series()
    vol = source_volume(src)
    lab = _labels(vol.shape)
    m = manifest(n_labels=3)  # label 3 is absent from the mask: described, no frames
    seg = build_seg(src, [Prediction(vol.with_array(lab), m)], CFG)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.SeriesNumber == CFG.seg_series_number and seg.SeriesDescription == CFG.seg_series_description
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID and seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert len(seg.SegmentSequence) == 3
    for item, label in zip(seg.SegmentSequence, m.labels):
        assert item.SegmentLabel == label.name
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == label.category.value
        assert item.SegmentAlgorithmName == m.name
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == m.version
        assert len(item.RecommendedDisplayCIELabValue) == 3
    non_empty = sum(int(np.any(lab == v, axis=(1, 2)).sum()) for v in (1, 2))
    assert seg.NumberOfFrames == non_empty  # empty frames (and the empty segment) omitted
    src_uids = {d.SOPInstanceUID for d in src}
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID in src_uids and ref.ReferencedSOPClassUID == src[0].SOPClassUID
    reading = read_seg(seg, src)
    for v in (1, 2, 3):
        assert np.array_equal(reading.mask(v), _expected_by_slice(vol, lab == v, reading))


def test_deterministic_uids_and_new_version_new_uids() -> None:
    src = make_series()
    vol = source_volume(src)
    pred = Prediction(vol.with_array(_labels(vol.shape)), manifest())
    a, b = build_seg(src, [pred], CFG), build_seg(list(reversed(src)), [pred], CFG)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert [s.TrackingUID for s in a.SegmentSequence] == [s.TrackingUID for s in b.SegmentSequence]
    c = build_seg(src, [Prediction(pred.labels, manifest(version="4"))], CFG)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (0,)), ((2, 0, 1), (0, 2)), ((1, 2, 0), (1,))])
def test_reoriented_prediction_maps_back(perm: tuple[int, int, int], flips: tuple[int, ...]) -> None:
    src = make_series()
    vol = source_volume(src)
    lab = _labels(vol.shape)
    moved = reorient(vol, perm, flips, array=lab)
    assert moved.shape != vol.shape or not np.allclose(moved.affine, vol.affine)
    reading = read_seg(build_seg(src, [Prediction(moved, manifest())], CFG), src)
    for v in (1, 2):
        assert np.array_equal(reading.mask(v), _expected_by_slice(vol, lab == v, reading))


def test_cropped_prediction_maps_back() -> None:
    src = make_series()
    vol = source_volume(src)
    lab = _labels(vol.shape)
    lo, hi = (2, 4, 5), (11, 30, 38)
    crop = vol.crop(lo, hi)
    crop = crop.with_array(lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    reading = read_seg(build_seg(src, [Prediction(crop, manifest())], CFG), src)
    expected = np.zeros_like(lab)
    expected[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    for v in (1, 2):
        assert np.array_equal(reading.mask(v), _expected_by_slice(vol, expected == v, reading))


def test_resampled_prediction_maps_back() -> None:
    src = make_series(shape=(12, 32, 40))
    vol = source_volume(src)
    coarse_shape = (6, 16, 20)
    coarse_aff = vol.affine.copy()
    coarse_aff[:3, :3] = vol.affine[:3, :3] * 2
    coarse_aff[:3, 3] = vol.index_to_lps([0.5, 0.5, 0.5])[0]  # coarse voxel j covers source 2j, 2j+1
    coarse_lab = _labels(coarse_shape)
    coarse = dataclasses.replace(vol, array=coarse_lab, affine=coarse_aff)
    reading = read_seg(build_seg(src, [Prediction(coarse, manifest())], CFG), src)
    expected = coarse_lab.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    for v in (1, 2):
        assert np.array_equal(reading.mask(v), _expected_by_slice(vol, expected == v, reading))


def test_overlapping_predictions_and_labelmap_option() -> None:
    src = make_series()
    vol = source_volume(src)
    lab = _labels(vol.shape)
    body = (ellipsoid(vol.shape, (6, 16, 20), (5, 14, 18))).astype(np.uint8)  # overlaps both organs
    preds = [Prediction(vol.with_array(body), manifest("body", "1", 1)), Prediction(vol.with_array(lab), manifest())]
    seg = build_seg(src, preds, CFG)
    assert len(seg.SegmentSequence) == 3
    assert {s.SegmentAlgorithmName for s in seg.SegmentSequence} == {"body", "organs"}
    reading = read_seg(seg, src)
    assert np.array_equal(reading.mask(1), _expected_by_slice(vol, body == 1, reading))
    assert np.array_equal(reading.mask(3), _expected_by_slice(vol, lab == 2, reading))
    lm = build_seg(src, [preds[1]], dataclasses.replace(CFG, seg_type="LABELMAP"))
    assert lm.SOPClassUID == LABELMAP_SEG_STORAGE
    lm_reading = read_seg(lm, src)
    assert np.array_equal(lm_reading.mask(2), _expected_by_slice(vol, lab == 2, lm_reading))


def test_sagittal_mr() -> None:
    src = make_series(shape=(10, 36, 30), spacing=(3.0, 1.1, 0.9), iop=SAGITTAL, modality="MR")
    vol = source_volume(src)
    lab = _labels(vol.shape)
    seg = build_seg(src, [Prediction(vol.with_array(lab), manifest())], CFG)
    reading = read_seg(seg, src)
    assert np.array_equal(reading.mask(2), _expected_by_slice(vol, lab == 2, reading))


def test_wrong_source_headers_are_refused() -> None:
    src = make_series()
    vol = source_volume(src)
    other = make_series(spacing=(2.0, 0.8, 0.7))
    # same UIDs but other geometry: the headers do not describe the grid the mask is on
    for d, o in zip(other, src):
        d.SOPInstanceUID = o.SOPInstanceUID
    with pytest.raises(SeriesError, match="geometry"):
        build_seg(other, [Prediction(vol.with_array(_labels(vol.shape)), manifest())], CFG)
    with pytest.raises(SeriesError, match="missing"):
        build_seg(src[:-1], [Prediction(vol.with_array(_labels(vol.shape)), manifest())], CFG)
    bad = _labels(vol.shape)
    bad[0, 0, 0] = 7  # a value the manifest does not name
    with pytest.raises(SeriesError, match="out_of_range"):
        build_seg(src, [Prediction(vol.with_array(bad), manifest())], CFG)


def test_fast_frames_match_highdicom_per_frame_construction() -> None:
    """The node's directly encoded frames say what highdicom's own per-frame construction says."""
    import highdicom as hd

    src = make_series(shape=(12, 31, 37))  # rows * columns not a multiple of 8: bits run across frames
    vol = source_volume(src)
    lab = _labels(vol.shape)
    m = manifest(n_labels=2)
    fast = build_seg(src, [Prediction(vol.with_array(lab), m)], CFG)
    ref = hd.seg.Segmentation(
        src, lab, "BINARY", [hd.seg.SegmentDescription.from_dataset(s) for s in fast.SegmentSequence],
        fast.SeriesInstanceUID, fast.SeriesNumber, fast.SOPInstanceUID, 1, "x", "x", "1", "1")
    for keyword in ("SegmentSequence", "SharedFunctionalGroupsSequence", "DimensionIndexSequence",
                    "ReferencedSeriesSequence", "SourceImageSequence", "NumberOfFrames", "SegmentsOverlap",
                    "ImageType", "SegmentationType", "BitsAllocated", "PixelRepresentation"):
        a, b = fast[keyword].value, ref[keyword].value
        if keyword == "DimensionIndexSequence":  # organisation UIDs are random in highdicom
            a = [(i.DimensionIndexPointer, i.FunctionalGroupPointer) for i in a]
            b = [(i.DimensionIndexPointer, i.FunctionalGroupPointer) for i in b]
        assert a == b, keyword

    def frames(ds):  # (segment, source UID, position) -> packed mask bytes
        reading = read_seg(ds, src)
        out = {}
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            pos = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
            out[(int(reading.frame_segments[i]), uid, pos)] = reading.frames[i].tobytes()
        return out

    assert frames(fast) == frames(ref)
    dims = [tuple(i.FrameContentSequence[0].DimensionIndexValues) for i in fast.PerFrameFunctionalGroupsSequence]
    assert len(set(dims)) == len(dims)  # every frame has its own dimension index


def test_stack_with_a_gap() -> None:
    """Slices with a gap: frames reference their own slice positions; no Spacing Between Slices
    (as in highdicom's own construction); the reader places frames by real position."""
    import highdicom as hd

    from dicomnode.volume import SourceFrame

    src = make_series(shape=(8, 20, 24))
    for d in src[5:]:
        p = [float(v) for v in d.ImagePositionPatient]
        d.ImagePositionPatient = [p[0], p[1], p[2] + 2.5]
    vol = source_volume(src)
    vol = dataclasses.replace(vol, source=tuple(
        SourceFrame(f.sop_class_uid, f.sop_instance_uid, 1, tuple(float(v) for v in d.ImagePositionPatient))
        for f, d in zip(vol.source, src)))
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:7, 5:12, 6:14] = 1
    lab[3:8, 10:16, 10:20] = 2
    seg = build_seg(src, [Prediction(vol.with_array(lab), manifest())], CFG)
    ref = hd.seg.Segmentation(src, lab, "BINARY", [hd.seg.SegmentDescription.from_dataset(s) for s in seg.SegmentSequence],
                              seg.SeriesInstanceUID, 1, seg.SOPInstanceUID, 1, "x", "x", "1", "1")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert "SpacingBetweenSlices" not in measures
    assert measures == ref.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    reading = read_seg(seg, src)
    for v in (1, 2):
        assert np.array_equal(reading.mask(v), _expected_by_slice(vol, lab == v, reading))


def test_enhanced_multiframe_source() -> None:
    """An enhanced (legacy converted) CT source: every SEG frame references the source frame it
    lies on, with that frame's mask; frames out of order or another grid are refused."""
    import highdicom as hd

    from dicomnode.volume import SourceFrame, Volume, affine_from_dicom

    src = make_series(shape=(8, 20, 24))
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(src, hd.UID(), 5, hd.UID(), 1)
    pos = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                    for f in mf.PerFrameFunctionalGroupsSequence])
    aff = affine_from_dicom(pos[0], np.asarray(src[0].ImageOrientationPatient, float), (0.8, 0.7), pos[1] - pos[0])
    frames = tuple(SourceFrame(str(mf.SOPClassUID), str(mf.SOPInstanceUID), k) for k in range(1, 9))
    lab = _labels((8, 20, 24))
    vol = Volume(array=lab, affine=aff, source=frames)  # the converter's view: slice i = frame i + 1
    seg = build_seg([mf], [Prediction(vol, manifest())], CFG)
    pixels = seg.pixel_array.reshape(-1, 20, 24)
    assert len(pixels) == sum(int(np.any(lab == v, axis=(1, 2)).sum()) for v in (1, 2))
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = int(ref.ReferencedFrameNumber)
        assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        assert np.allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], pos[k - 1])
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert np.array_equal(frame.astype(bool), lab[k - 1] == segment)
    with pytest.raises(SeriesError, match="multiframe_order"):
        build_seg([mf], [Prediction(dataclasses.replace(vol, source=frames[::-1]), manifest())], CFG)
    shifted = aff.copy()
    shifted[2, 3] += 1.0
    with pytest.raises(SeriesError, match="geometry"):
        build_seg([mf], [Prediction(Volume(array=lab, affine=shifted, source=frames), manifest())], CFG)


def test_config_checks_results_section() -> None:
    from dicomnode.config import parse_config
    from dicomnode.errors import ConfigError

    with pytest.raises(ConfigError, match="seg_content_label"):
        parse_config({"results": {"seg_content_label": "lower case"}})
    cfg = parse_config({"results": {"seg_series_number": 42, "seg_series_description": "AI organs"}}).results
    src = make_series()
    vol = source_volume(src)
    seg = build_seg(src, [Prediction(vol.with_array(_labels(vol.shape)), manifest())], cfg)
    assert seg.SeriesNumber == 42 and seg.SeriesDescription == "AI organs" and seg.ContentLabel == "DICOMNODE"
