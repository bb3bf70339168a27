"""Tiling: canonical grid, normalisation, window placement, Gaussian stitching (in-process onnxruntime)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from dicomnode.infer import tiling
from dicomnode.infer.models import load_manifest
from dicomnode.volume import Volume, resample
from tests.triton_fixture import POINTWISE_CENTRES, pointwise_manifest, pointwise_onnx, pointwise_reference


@pytest.fixture(scope="module")
def pointwise(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("pw")
    (d / "labels.json").write_text(json.dumps(pointwise_manifest()))
    sess = ort.InferenceSession(pointwise_onnx(), providers=["CPUExecutionProvider"])
    return load_manifest(d / "labels.json"), (lambda x: sess.run(None, {"INPUT": x})[0])


def _ras_nifti_like(shape: tuple[int, int, int], spacing: float = 3.0) -> np.ndarray:
    """Affine of a NIfTI (RAS, i=column) read into (slice, row, column): slices go up, rows anterior."""
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, spacing]  # slice -> superior
    aff[:3, 1] = [0, -spacing, 0]  # row -> anterior
    aff[:3, 2] = [-spacing, 0, 0]  # column -> right
    aff[:3, 3] = [100.0, 50.0, -200.0]
    return aff


def test_canonical_grid_of_axial_volume_is_a_flip_of_the_same_voxels(pointwise) -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(7, 9, 11)).astype(np.float32)
    vol = Volume(arr, _ras_nifti_like(arr.shape))
    aff, shape = tiling.canonical_grid(vol, (3.0, 3.0, 3.0))
    assert shape == arr.shape
    np.testing.assert_allclose(aff[:3, :3], tiling.CANONICAL_DIRECTION * 3.0)
    on = tiling.to_model_grid(vol, pointwise[0])
    np.testing.assert_allclose(on.affine, aff)
    # every canonical axis runs opposite to the RAS-read one: feet, posterior, left
    np.testing.assert_allclose(on.array, arr[::-1, ::-1, ::-1], atol=1e-5)
    # the same patient point maps to the same value
    p = vol.index_to_lps(np.array([[2, 3, 4]]))
    idx = np.rint(on.lps_to_index(p)[0]).astype(int)
    assert on.array[tuple(idx)] == pytest.approx(arr[2, 3, 4], abs=1e-5)


def test_canonical_grid_covers_an_oblique_volume() -> None:
    arr = np.zeros((10, 20, 20), np.float32)
    aff = np.eye(4)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    axial = np.array([[0, 0, 1.0], [0, 1.0, 0], [-2.5, 0, 0]]).T  # slice -2.5 z, row +y, column +x
    aff[:3, :3] = rot @ axial
    vol = Volume(arr, aff)
    g_aff, shape = tiling.canonical_grid(vol, (3.0, 3.0, 3.0))
    # every corner of the volume lies inside the canonical grid
    corners = np.array([[a, b, d] for a in (0, 9) for b in (0, 19) for d in (0, 19)], float)
    idx = Volume(np.zeros(shape, np.float32), g_aff).lps_to_index(vol.index_to_lps(corners))
    assert np.all(idx >= -0.5 - 1e-6) and np.all(idx <= np.array(shape) - 0.5 + 1e-6)


def test_normalise_windows_and_zscore(pointwise) -> None:
    m, _ = pointwise
    a = np.array([[[-2000.0, -1024.0, 238.0, 1500.0, 3000.0]]])
    x = tiling.normalise(a, m, "CT")
    assert x.shape == (1, 1, 1, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0], [0, 0, 0.5, 1, 1], atol=1e-6)
    mr = tiling.normalise(np.arange(10.0).reshape(1, 2, 5), m.__class__(
        **{**{f: getattr(m, f) for f in m.__slots__}, "normalisation": "zscore"}), "MR")
    assert abs(float(mr.mean())) < 1e-6 and abs(float(mr.std()) - 1) < 1e-5


def test_window_starts_cover_the_axis_with_overlap() -> None:
    for size, patch, overlap in [(100, 32, 0.5), (33, 32, 0.5), (32, 32, 0.5), (200, 48, 0.25)]:
        starts = tiling.window_starts(size, patch, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            assert 0 <= s <= size - patch
            covered[s:s + patch] = True
        assert covered.all()
        steps = np.diff(starts)
        assert np.all(steps <= patch * (1 - overlap) + 1)


def test_gaussian_weight_peaks_in_the_centre_and_stays_positive() -> None:
    w = tiling.gaussian_weight((16, 20, 24))
    assert w.shape == (16, 20, 24) and w.min() > 0
    assert w.max() == pytest.approx(1.0)
    assert w[8, 10, 12] > w[0, 0, 0] * 10


def test_plan_is_whole_volume_when_it_fits_and_windows_otherwise(pointwise) -> None:
    m, _ = pointwise  # patch (32, 40, 48), pad_multiple 8
    small = tiling.plan_tiles((20, 30, 41), m)
    assert small.whole and small.padded == (24, 32, 48)
    big = tiling.plan_tiles((70, 90, 122), m)
    assert not big.whole and big.patch == (32, 40, 48) and len(big.starts) > 8


def test_sliding_window_equals_whole_volume_for_a_voxelwise_model(pointwise) -> None:
    m, predict = pointwise
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(1, 70, 90, 122)).astype(np.float32)
    labels, probs = tiling.predict_volume(x, m, predict, batch=3)
    assert labels.shape == (70, 90, 122) and probs is not None and probs.shape == (3, 70, 90, 122)
    ref = pointwise_reference(x[0])
    d = np.sort(np.stack([-(x[0] - c) ** 2 for c in POINTWISE_CENTRES]), axis=0)
    clear = (d[-1] - d[-2]) > 1e-5  # exact ties may go either way after weighting
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(labels[clear], ref[clear])
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # whole-volume path (patch larger than the volume) gives the same labels
    whole_m = m.__class__(**{**{f: getattr(m, f) for f in m.__slots__}, "patch": (128, 128, 128)})
    labels_whole, _ = tiling.predict_volume(x, whole_m, predict)
    np.testing.assert_array_equal(labels_whole[clear], labels[clear])


def test_predict_volume_rejects_a_wrong_output_shape(pointwise) -> None:
    m, predict = pointwise
    with pytest.raises(ValueError, match="model output"):
        tiling.predict_volume(np.zeros((1, 8, 8, 8), np.float32), m, lambda x: predict(x)[:, :2])


def test_labels_map_back_to_the_same_anatomy_on_an_oblique_grid(pointwise) -> None:
    """A bright ball in an oblique, anisotropic volume is labelled where it is, after the round trip."""
    m, predict = pointwise
    shape = (40, 64, 64)
    aff = np.eye(4)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    aff[:3, 0] = [0, s * 2.0, -c * 2.0]
    aff[:3, 1] = [0, c * 1.2, s * 1.2]
    aff[:3, 2] = [1.3, 0, 0]
    idx = np.indices(shape).reshape(3, -1).T
    pts = idx @ aff[:3, :3].T
    centre = pts.mean(axis=0) + [5.0, -3.0, 4.0]
    inside = (np.linalg.norm(pts - centre, axis=1) < 25.0).reshape(shape)
    arr = np.where(inside, 1200.0, -1000.0).astype(np.float32)
    vol = Volume(arr, aff)
    grid = tiling.to_model_grid(vol, m)
    labels, _ = tiling.predict_volume(tiling.normalise(grid.array, m, "CT"), m, predict)
    back = resample(grid.with_array(labels), vol.affine, vol.shape, order=0).array
    bone = back == 2
    dice = 2 * np.sum(bone & inside) / (bone.sum() + inside.sum())
    assert dice > 0.9, dice


def test_exact_regrid_equals_interpolating_resample_on_permuted_flipped_shifted_grids() -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 50, size=(6, 7, 8)).astype(np.float32)
    src = Volume(arr, _ras_nifti_like(arr.shape, 2.0))
    for trial in range(6):
        perm = rng.permutation(3)
        signs = rng.choice([-1.0, 1.0], size=3)
        dst = np.eye(4)
        dst[:3, :3] = src.affine[:3, :3][:, perm] * signs
        dst[:3, 3] = src.index_to_lps(rng.integers(-2, 9, size=(1, 3)))[0]
        shape = tuple(int(v) for v in rng.integers(3, 10, size=3))
        fast = tiling.exact_regrid(arr, src.affine, dst, shape, -1.0)
        assert fast is not None
        slow = resample(src, dst, shape, order=0, cval=-1.0).array
        np.testing.assert_array_equal(fast, slow)
    half = src.affine.copy()
    half[:3, 3] += src.affine[:3, 0] * 0.5  # half-voxel shift: needs interpolation
    assert tiling.exact_regrid(arr, src.affine, half, arr.shape, 0.0) is None


def test_downsampling_is_antialiased_so_noise_averages_out(pointwise) -> None:
    m, _ = pointwise  # 3 mm model
    rng = np.random.default_rng(7)
    noise = rng.normal(0.0, 20.0, size=(60, 128, 128)).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, -1.0]
    aff[:3, 1] = [0, 0.75, 0]
    aff[:3, 2] = [0.75, 0, 0]
    vol = Volume(noise, aff)
    assert tiling.antialias_factors(vol, (3.0, 3.0, 3.0)) == (3, 4, 4)
    coarse = tiling.to_model_grid(vol, m)
    assert coarse.shape == (20, 32, 32)
    inner = coarse.array[2:-2, 2:-2, 2:-2]
    assert inner.std() < 6.0  # plain point sampling would keep the 20 HU noise
    # block averaging keeps positions: a bright slab stays where it is
    slab = np.zeros((60, 128, 128), np.float32)
    slab[30:42] = 1000.0  # z from -30 to -41 mm
    g = tiling.to_model_grid(Volume(slab, aff), m)
    zs = g.index_to_lps(np.array([[i, 0, 0] for i in range(g.shape[0])]))[:, 2]
    profile = g.array[:, 16, 16]
    centre = float(np.sum(zs * profile) / np.sum(profile))
    assert abs(centre - (-35.5)) < 0.75, centre
    assert abs(float(inner.mean())) < 2.0
    same = Volume(noise[:20, :32, :32], np.diag([3.0, 3.0, 3.0, 1.0]) @ np.eye(4))
    assert tiling.antialias_factors(same, (3.0, 3.0, 3.0)) == (1, 1, 1)


def test_keep_largest_components_drops_only_the_smaller_pieces_of_the_named_labels() -> None:
    lab = np.zeros((10, 12, 12), np.uint8)
    lab[1:6, 1:6, 1:6] = 1          # the organ
    lab[8, 10, 10] = 1              # a speck of the same label elsewhere
    lab[7:9, 1:3, 1:3] = 2          # another label, two pieces, not named
    lab[1, 10, 10] = 2
    out = tiling.keep_largest_components(lab, (1,))
    assert out[8, 10, 10] == 0 and (out == 1).sum() == 125
    assert np.array_equal(out == 2, lab == 2)
    assert lab[8, 10, 10] == 1      # the input is not modified
    diagonal = np.zeros((4, 4, 4), np.uint8); diagonal[0, 0, 0] = diagonal[1, 1, 1] = 1
    assert np.array_equal(tiling.keep_largest_components(diagonal, (1,)), diagonal)  # 26-connected
    assert tiling.keep_largest_components(lab, ()) is lab


@pytest.mark.parametrize("step", ["largest_component", "fill_holes"])
def test_manifest_rejects_post_processing_of_an_unknown_label(tmp_path, step: str) -> None:  # type: ignore[no-untyped-def]
    from dicomnode.errors import ModelContractError
    d = json.loads(json.dumps(pointwise_manifest()))
    d[step] = [7]
    (tmp_path / "labels.json").write_text(json.dumps(d))
    with pytest.raises(ModelContractError, match=step):
        load_manifest(tmp_path / "labels.json")
    d[step] = [1]
    (tmp_path / "labels.json").write_text(json.dumps(d))
    assert getattr(load_manifest(tmp_path / "labels.json"), step) == (1,)


def test_fill_holes_per_slice_fills_enclosed_background_only_within_a_slice() -> None:
    lab = np.zeros((3, 9, 9), np.uint8)
    lab[:, 1:8, 1:8] = 1
    lab[1, 3:6, 3:6] = 0            # a hole enclosed in slice 1 (lung, bowel gas)
    lab[0, 4, 0:5] = 0              # a channel to the slice's edge in slice 0: not a hole
    lab[2, 4, 4] = 2                # another label inside: left as it is
    lab[2, 3, 3] = 0
    out = tiling.fill_holes_per_slice(lab, (1,))
    assert (out[1, 3:6, 3:6] == 1).all()
    assert (out[0, 4, 0:5] == 0).all()
    assert out[2, 4, 4] == 2 and out[2, 3, 3] == 1
    assert lab[1, 4, 4] == 0        # the input is not modified
    assert tiling.fill_holes_per_slice(lab, ()) is lab
    tube = np.zeros((5, 7, 7), np.uint8); tube[:, 1:6, 1:6] = 1; tube[:, 3, 3] = 0  # open at both ends in 3D
    assert (tiling.fill_holes_per_slice(tube, (1,))[:, 3, 3] == 1).all()  # per slice it is enclosed


def test_postprocess_applies_the_manifest_steps_in_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(json.dumps(pointwise_manifest()))
    d["fill_holes"] = [1]
    d["largest_component"] = [1]
    (tmp_path / "labels.json").write_text(json.dumps(d))
    m = load_manifest(tmp_path / "labels.json")
    lab = np.zeros((2, 9, 9), np.uint8)
    lab[:, 1:6, 1:6] = 1
    lab[:, 3, 3] = 0                # a hole
    lab[1, 8, 8] = 1                # a speck
    out = tiling.postprocess(lab, m)
    assert out[1, 8, 8] == 0 and (out[:, 3, 3] == 1).all() and (out == 1).sum() == 50
    (tmp_path / "labels.json").write_text(json.dumps(pointwise_manifest()))
    assert tiling.postprocess(lab, load_manifest(tmp_path / "labels.json")) is lab  # no steps: as it is
