"""Property tests (Hypothesis): series written with pydicom (and dcmcjpeg) read back exactly.

Oblique orientations, non-square pixels, shuffled slice order, missing slices, duplicate positions,
tilted stacks, single-frame and Enhanced multi-frame, every supported transfer syntax.
Example counts are CI-sized; ``HYPOTHESIS_PROFILE=nightly`` multiplies them by 20.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.config import GeometryConfig
from dicomnode.errors import SeriesError
from dicomnode.series.convert import SUPPORTED_TRANSFER_SYNTAXES, read_series
from dicomnode.series.geometry import to_canonical
from tests.unit.test_convert_synth import (
    ALL_SYNTAXES, DCMCJPEG, EIGHT_BIT_ONLY, LOSSY, PYDICOM_ENCODED, file_values, make_stack, orientation_from, rotation,
)

SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 1


def examples(n: int) -> settings:
    """CI-sized example count (x20 nightly), no deadline (files are written per example)."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


angles = st.tuples(*[st.floats(-np.pi, np.pi, allow_nan=False, allow_infinity=False)] * 3)
spacing = st.floats(0.3, 2.5, allow_nan=False).map(lambda v: round(v, 4))
origin = st.tuples(*[st.floats(-400, 400, allow_nan=False).map(lambda v: round(v, 3))] * 3)


class _Dir:
    """A fresh temporary folder per example."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="convprop"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@examples(60)
@given(angles=angles, ps=st.tuples(spacing, spacing), sp=st.floats(0.5, 6).map(lambda v: round(v, 3)),
       n=st.integers(2, 7), origin=origin, data=st.data(),
       syntax=st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                               "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"]),
       enhanced=st.booleans(), signed=st.booleans())
def test_oblique_shuffled_stack_reads_back_exactly(angles, ps, sp, n, origin, data, syntax, enhanced, signed) -> None:
    order = data.draw(st.permutations(range(n)))
    with _Dir() as d:
        stack = make_stack(d, n=n, rows=12, cols=10, pixel_spacing=ps, slice_spacing=sp, origin=origin,
                           orientation=orientation_from(rotation(angles)), order=order, syntax=syntax,
                           enhanced=enhanced, signed=signed, intercept=-1024 if signed else 0, seed=n)
        vol = read_series(stack.paths)
    assert np.array_equal(vol.array, stack.expected)
    assert np.allclose(vol.affine, stack.expected_affine(), atol=1e-3)
    assert vol.geometry.non_square_pixels == (abs(ps[0] - ps[1]) > 1e-6)
    assert ("sorted:by_position" in vol.geometry.actions) == (list(order) != sorted(order))
    # positions of the source frames run along the stack in array order
    pos = np.array([f.position for f in vol.source])
    assert np.allclose(pos, stack.positions, atol=1e-4)
    # canonical reorientation keeps every voxel at its patient position and inverts exactly
    can, r = to_canonical(vol)
    assert np.array_equal(r.invert(can).array, vol.array)


@examples(30)
@given(n=st.integers(8, 12), data=st.data(), angles=angles)
def test_missing_slices_are_counted_and_refused_or_resampled(n, data, angles) -> None:
    k = data.draw(st.integers(1, 2))
    missing = data.draw(st.lists(st.integers(1, n - 2), min_size=k, max_size=k, unique=True))
    depths = [2.0 * i for i in range(n) if i not in missing]
    with _Dir() as d:
        stack = make_stack(d, n=len(depths), rows=8, cols=8, depths=depths,
                           orientation=orientation_from(rotation(angles)), order=None)
        with pytest.raises(SeriesError) as exc:
            read_series(stack.paths)
        assert exc.value.reason == "gap"
        vol = read_series(stack.paths, GeometryConfig(on_gap="resample"))
    assert vol.geometry.gaps == k and vol.shape[0] == n
    kept = [i for i in range(n) if i not in missing]
    assert np.allclose(vol.array[kept], stack.expected, atol=1e-3)


@examples(30)
@given(n=st.integers(3, 6), data=st.data(), same_instance=st.booleans())
def test_duplicate_positions_refused_unless_the_same_instance(n, data, same_instance) -> None:
    dup = data.draw(st.integers(0, n - 1))
    with _Dir() as d:
        stack = make_stack(d, n=n, rows=8, cols=8)
        ds = pydicom.dcmread(stack.paths[dup])
        if not same_instance:
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) + 1).astype(np.uint16).tobytes()
        ds.save_as(d / "dup.dcm")
        paths = [*stack.paths, d / "dup.dcm"]
        if same_instance:
            assert np.array_equal(read_series(paths).array, stack.expected)
        else:
            with pytest.raises(SeriesError) as exc:
                read_series(paths)
            assert exc.value.reason == "duplicate_positions"


@examples(30)
@given(angles=angles, shear=st.tuples(st.floats(-0.8, 0.8), st.floats(-0.8, 0.8)).filter(lambda s: np.hypot(*s) > 0.1),
       sp=st.floats(1.0, 3.0), n=st.integers(3, 7))
def test_tilted_stack_resampled_onto_an_orthogonal_grid(angles, shear, sp, n) -> None:
    ori = np.asarray(orientation_from(rotation(angles)))
    rows, cols, ps = 24, 20, (1.0, 1.0)
    coef = np.array([3.0, -2.0, 5.0])  # value = coef . LPS position (a linear field)
    o = np.array([10.0, -5.0, 40.0])
    row, col = ori[:3], ori[3:]
    normal = np.cross(row, col)
    vals = np.empty((n, rows, cols))
    for k in range(n):
        p0 = o + k * sp * normal + k * (shear[0] * row + shear[1] * col)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = p0 + r[..., None] * col * ps[0] + c[..., None] * row * ps[1]
        vals[k] = np.rint(lps @ coef + 2000)
    with _Dir() as d:
        stack = make_stack(d, n=n, rows=rows, cols=cols, pixel_spacing=ps, slice_spacing=sp, origin=o, orientation=ori,
                           shear=shear, values=vals.astype(np.int64), intercept=0)
        with pytest.raises(SeriesError) as exc:
            read_series(stack.paths, GeometryConfig(on_tilt="refuse"))
        assert exc.value.reason == "tilt"
        vol = read_series(stack.paths)
    assert "resampled:tilt" in vol.geometry.actions
    assert np.allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-6)
    idx = np.argwhere(np.ones(vol.shape, bool))
    truth = vol.index_to_lps(idx) @ coef + 2000
    # voxels whose source samples are inside every slice: in-plane margin of the total shear
    margin = int(np.ceil(np.hypot(*shear) * n)) + 1
    inner = (idx[:, 1] >= margin) & (idx[:, 1] < rows - margin) & (idx[:, 2] >= margin) & (idx[:, 2] < cols - margin)
    got = vol.array.reshape(-1)
    assert np.max(np.abs(got[inner] - truth[inner])) < 1.01


@examples(50)
@given(syntax=st.sampled_from(ALL_SYNTAXES), enhanced=st.booleans(), signed=st.booleans(),
       bits=st.sampled_from([12, 16]), n=st.integers(1, 3), data=st.data())
def test_every_supported_transfer_syntax(syntax, enhanced, signed, bits, n, data) -> None:
    assert syntax in SUPPORTED_TRANSFER_SYNTAXES
    if syntax in DCMCJPEG:
        enhanced = False  # dcmcjpeg is used for single-frame files only
    order = data.draw(st.permutations(range(n)))
    allocated = 16
    if syntax in EIGHT_BIT_ONLY:
        allocated, bits = 8, 8
    with _Dir() as d:
        stack = make_stack(d, n=n, rows=32, cols=32, syntax=syntax, enhanced=enhanced, signed=signed,
                           bits_stored=bits, bits_allocated=allocated, order=order,
                           intercept=-1024 if signed else 0, seed=bits + n)
        vol = read_series(stack.paths)
        if syntax in LOSSY:  # reference: pydicom's decode of the very same files, in slice order
            ref = [pydicom.dcmread(p) for p in stack.paths]
            if enhanced:
                frames = [file_values(ref[0], i) for i in range(n)]
                expected = np.stack([frames[list(order).index(k)] for k in range(n)])
            else:
                expected = np.stack([file_values(ref[list(order).index(k)]) for k in range(n)])
            assert np.allclose(vol.array, expected, atol=1e-3)
        else:
            assert np.array_equal(vol.array, stack.expected)
    assert syntax in PYDICOM_ENCODED or syntax in DCMCJPEG or syntax.startswith("1.2.840.10008.1.2")


def test_every_supported_syntax_is_exercised_above() -> None:
    assert set(SUPPORTED_TRANSFER_SYNTAXES) == set(ALL_SYNTAXES)


@examples(40)
@given(syntax=st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]), undefined=st.booleans(),
       nested=st.booleans(), private=st.booleans(), signed=st.booleans())
def test_fast_header_scan_agrees_with_pydicom(syntax, undefined, nested, private, signed) -> None:
    """The raw element walk (plain files) describes every frame exactly as the pydicom path does."""
    from dicomnode.series import frames as F

    with _Dir() as d:
        stack = make_stack(d, n=2, rows=8, cols=8, syntax=syntax, signed=signed)
        for p in stack.paths:
            ds = pydicom.dcmread(p)
            ref = pydicom.Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
            if nested:
                inner = pydicom.Dataset()
                inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
                ref.PurposeOfReferenceCodeSequence = pydicom.Sequence([inner])
                ref.PurposeOfReferenceCodeSequence.is_undefined_length = undefined
                inner.is_undefined_length_sequence_item = undefined
            ref.is_undefined_length_sequence_item = undefined
            ds.ReferencedImageSequence = pydicom.Sequence([ref, ref])
            ds.ReferencedImageSequence.is_undefined_length = undefined
            if private:
                ds.add_new(0x00091010, "LO", "private")
                ds.add_new(0x00291010, "OB", b"\x00\x01" * 300)
            ds.save_as(p)
            scanned = F._scan(p)
            assert scanned is not None
            slow = F._frames_of(pydicom.dcmread(p, defer_size=8192, force=True), p, 10**9)
            fast = F._frames_of(scanned, p, 10**9)  # type: ignore[arg-type]
            assert [dataclasses.replace(f, offset=None) for f in fast] == [
                dataclasses.replace(f, offset=None) for f in slow]
            off = fast[0].offset  # the scan finds the pixel bytes in the file
            assert off is not None and p.read_bytes()[off:off + 128] == ds.PixelData
        assert np.array_equal(read_series(stack.paths).array, stack.expected)


def test_fast_header_scan_reads_further_for_long_headers(tmp_path) -> None:
    from dicomnode.series import frames as F

    stack = make_stack(tmp_path, n=2, rows=8, cols=8)
    ds = pydicom.dcmread(stack.paths[0])
    ds.add_new(0x00291010, "OB", b"\x01" * 20000)  # a long private element before the pixel data
    ds.save_as(stack.paths[0])
    assert F._scan(stack.paths[0]) is not None
    assert np.array_equal(read_series(stack.paths).array, stack.expected)
