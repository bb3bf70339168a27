"""The fast non-model paths (issue 8) give exactly what the plain numpy / scipy code gave.

- ``tiling.block_mean``: exact int32 block sums vs numpy's padded 6-D ``mean(dtype=float32)``;
- ``seg_frames.label_frames``: the row-maximum path (one segment) and the cropped
  ``find_objects`` path vs the original whole-array ``find_objects`` loop, byte for byte.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.infer import tiling
from dicomnode.results import seg_frames


def _mean_reference(array: np.ndarray, k: tuple[int, int, int]) -> np.ndarray:
    pad = [(0, (-n) % f) for n, f in zip(array.shape, k)]
    a = np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array
    n = [s // f for s, f in zip(a.shape, k)]
    return a.reshape(n[0], k[0], n[1], k[1], n[2], k[2]).mean(axis=(1, 3, 5), dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int8, np.int32, np.float32])
def test_block_mean_is_numpys_padded_mean(dtype: type) -> None:
    rng = np.random.default_rng(3)
    for shape in [(7, 9, 11), (13, 31, 33), (5, 4, 3), (1, 1, 1)]:
        if np.dtype(dtype).kind == "f":
            a = rng.normal(0, 500, size=shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        for k in [(1, 1, 2), (2, 3, 4), (3, 3, 3), (1, 5, 5), (4, 5, 2), (7, 9, 8), (1, 1, 1)]:
            got, aff = tiling.block_mean(a, np.eye(4), k)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, _mean_reference(a, k))
            assert np.allclose(np.diag(aff)[:3], k)


def _frames_reference(lab: np.ndarray, byte_aligned: bool) -> dict:
    rows, cols = lab.shape[1], lab.shape[2]
    row_bytes = cols // 8 if cols % 8 == 0 else 0
    out: dict = {}
    for v, box in enumerate(ndimage.find_objects(lab), start=1):
        if box is None:
            continue
        zs, ys, xs = box
        for z in range(zs.start, zs.stop):
            if not np.any(lab[z, ys, xs] == v):
                continue
            if row_bytes:
                band = np.packbits(lab[z, ys, :] == v, bitorder="little").tobytes()
                out[(v, z)] = bytes(ys.start * row_bytes) + band + bytes((rows - ys.stop) * row_bytes)
            elif byte_aligned:
                out[(v, z)] = np.packbits(lab[z] == v, bitorder="little").tobytes()
            else:
                out[(v, z)] = (lab[z] == v).reshape(-1)
    return out


@pytest.mark.parametrize("n_segments", [1, 2, 5, 300])
def test_label_frames_same_frames_as_find_objects(n_segments: int) -> None:
    rng = np.random.default_rng(n_segments)
    for shape in [(6, 16, 16), (5, 9, 7), (4, 8, 12), (3, 10, 24), (1, 1, 8)]:
        for trial in range(6):
            lab = np.zeros(shape, np.uint8 if n_segments < 256 else np.uint16)
            filled = rng.random(shape) < (0.0, 0.02, 0.3)[trial % 3]
            lab[filled] = rng.integers(1, n_segments + 1, size=int(filled.sum()))
            if trial == 5:
                lab[:] = 0
                lab[-1, -1, -1] = n_segments
            aligned = (shape[1] * shape[2]) % 8 == 0
            got, want = seg_frames.label_frames(lab, aligned), _frames_reference(lab, aligned)
            assert sorted(got) == sorted(want)
            for key, frame in want.items():
                if isinstance(frame, bytes):
                    assert got[key] == frame
                else:
                    np.testing.assert_array_equal(got[key], frame)
