"""The axis-aligned nearest-neighbour fast path of ``volume.resample`` equals scipy's general path."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.volume import Volume, _nearest_axis_aligned, resample


def _scipy(src: np.ndarray, m: np.ndarray, shape: tuple[int, int, int], cval: float) -> np.ndarray:
    return ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=0,
                                    mode="grid-constant", cval=cval, prefilter=False)


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_matches_scipy_on_random_axis_aligned_grids(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        src = rng.integers(0, 20, tuple(int(v) for v in rng.integers(3, 12, 3))).astype(np.int16)
        lin = np.zeros((3, 3))
        for r, c in enumerate(rng.permutation(3)):  # scales, flips and axis permutations
            lin[r, c] = rng.choice([-1, 1]) * rng.choice([0.25, 0.5, 1 / 3, 0.7, 1.0, 2.0, 3.0])
        m = np.eye(4)
        m[:3, :3] = lin
        m[:3, 3] = rng.uniform(-3, 8, 3)
        shape = tuple(int(v) for v in rng.integers(2, 14, 3))
        fast = _nearest_axis_aligned(src, m, shape, 7.0)  # type: ignore[arg-type]
        assert fast is not None
        np.testing.assert_array_equal(fast, _scipy(src, m, shape, 7.0))  # type: ignore[arg-type]


def test_oblique_mapping_is_left_to_scipy() -> None:
    m = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    m[1:3, 1:3] = [[c, -s], [s, c]]
    assert _nearest_axis_aligned(np.zeros((4, 5, 6), np.int16), m, (4, 5, 6), 0.0) is None
    vol = Volume(np.arange(120, dtype=np.int16).reshape(4, 5, 6), np.eye(4))
    out = resample(vol, m, (4, 5, 6), order=0)  # identity source affine: target affine = index map
    np.testing.assert_array_equal(out.array, _scipy(np.asarray(vol.array), m, (4, 5, 6), 0.0))
