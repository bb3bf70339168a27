"""inference.face.resample_head feeds training and the face_area evaluation the same 3 mm image the
node makes (dicomnode.infer.tiling.to_model_grid: block mean before linear interpolation)."""
from __future__ import annotations

import types

import numpy as np
from scipy import ndimage as ndi

from dicomnode.infer.tiling import to_model_grid
from dicomnode.volume import Volume
from inference.face import resample_head


def _head_like(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 0.9 mm canonical-grid image (smooth structure + voxel noise) and its index->LPS affine."""
    rng = np.random.default_rng(seed)
    shape = (60, 66, 57)
    img = 5 * ndi.gaussian_filter(rng.normal(size=shape), 6) / 0.02 + rng.normal(size=shape)
    A = np.eye(4)
    A[:3, :3] = np.array([[0.0, 0.0, -0.9], [0.0, 0.9, 0.0], [0.9, 0.0, 0.0]]).T  # head->feet, A->P, R->L
    return img.astype(np.float32), A


def test_resample_head_matches_the_node_grid() -> None:
    img, A = _head_like(0)
    node = to_model_grid(Volume(img, A), types.SimpleNamespace(spacing_mm=(3.0, 3.0, 3.0))).array
    mine = resample_head(img, A, 3.0)
    assert all(abs(a - b) <= 1 for a, b in zip(node.shape, mine.shape))
    s = tuple(slice(2, min(a, b) - 2) for a, b in zip(node.shape, mine.shape))
    assert np.corrcoef(node[s].ravel(), mine[s].ravel())[0, 1] > 0.9  # same orientation and content
    noise = np.random.default_rng(1).normal(size=img.shape).astype(np.float32)
    n_node = to_model_grid(Volume(noise, A), types.SimpleNamespace(spacing_mm=(3.0, 3.0, 3.0))).array.std()
    n_mine = resample_head(noise, A, 3.0).std()
    n_plain = ndi.zoom(noise, 0.3, order=1).std()  # decimation without the block mean
    assert abs(n_mine / n_node - 1) < 0.25
    assert n_plain > 3 * n_mine


def test_anonymise_kernels_are_in_mm_at_any_resolution() -> None:
    """Blurring a region of a 1 mm image and of the same image at 3 mm alters it by the same amount
    in mm: the 3 mm result of blurring at 1 mm then downsampling is close to blurring at 3 mm."""
    from inference import face

    rng = np.random.default_rng(0)
    fine = ndi.gaussian_filter(rng.normal(size=(60, 60, 60)).astype(np.float32), 3.0)
    fine[:, 30:] += 2.0  # an edge for the blur to smear
    region = np.zeros(fine.shape, bool)
    region[15:45, 15:45, 15:45] = True
    coarse, region3 = fine[1::3, 1::3, 1::3], region[1::3, 1::3, 1::3]
    at_fine = face.anonymise(fine, region, np.random.default_rng(5), "blur", spacing=1.0)[1::3, 1::3, 1::3]
    at_coarse = face.anonymise(coarse, region3, np.random.default_rng(5), "blur", spacing=3.0)
    change_fine = np.abs(at_fine - coarse)[region3].mean()
    change_coarse = np.abs(at_coarse - coarse)[region3].mean()
    assert 0.6 < change_fine / change_coarse < 1.6, (change_fine, change_coarse)
    # the old voxel-unit kernel at 1 mm would have blurred 3x less in mm
    weak = face.anonymise(fine, region, np.random.default_rng(5), "blur", spacing=3.0)[1::3, 1::3, 1::3]
    assert np.abs(weak - coarse)[region3].mean() < 0.8 * change_fine


def test_masked_background_makes_a_defaced_face_look_like_air() -> None:
    """With the air masked (as on many MR heads), a defaced region holds exactly the air's value:
    the only cue left is the missing face shape, which is what training with masked air teaches."""
    from inference import face

    rng = np.random.default_rng(2)
    img = rng.normal(5.0, 1.0, size=(60, 40, 40)).astype(np.float32)  # noisy air
    head = np.zeros(img.shape, bool)
    head[5:55, 10:30, 10:30] = True
    img[head] += 100.0
    masked = face.mask_background(img, head, 2)
    near = ndi.binary_dilation(head, iterations=2)
    assert np.array_equal(masked[near], img[near])  # the head and 2 voxels of air are kept
    assert (masked[~near] == img.min()).all()  # the rest is exactly the minimum
    region = face.face_region(head, 3.0)
    defaced = face.anonymise(masked, region, rng, "deface")
    assert region.any() and (defaced[region] == masked[~near][0]).all()
    assert np.array_equal(face.mask_background(img, head, 0)[head], img[head])


def test_tight_field_of_view_and_padding_outside_the_loss() -> None:
    """A tight field of view keeps the head plus at most 6 mm at the sides and the front; training
    patches reaching beyond the image carry the ignore target 255 there, never 'not altered'."""
    from inference import face

    rng = np.random.default_rng(3)
    img = rng.normal(5.0, 1.0, size=(60, 50, 50)).astype(np.float32)
    head = np.zeros(img.shape, bool)
    head[5:55, 12:40, 10:38] = True
    for _ in range(10):
        ti, th = face.tight_fov(img, head, 3.0, rng)
        assert th.sum() == head.sum() and ti.shape == th.shape and ti.shape[0] == 60
        assert 28 <= ti.shape[2] <= 28 + 4 and 38 <= ti.shape[1] <= 38 + 2  # +0..2 voxels of 3 mm a side
    pool = face.FacePool(1, 3.0, real=())
    seen: set[int] = set()
    for i in range(12):
        x, y = pool.sample(np.random.default_rng(i), (48, 64, 64))
        seen |= set(np.unique(y).tolist())
    assert seen == {0, 1, 255}
