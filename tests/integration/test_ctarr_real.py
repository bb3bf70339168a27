"""CTARR on the real scans of ../shared/data: orientation (8 configurations), crops, region learning.

Reference labels are TotalSegmentator outputs mapped to the 19 CTARR classes. Honesty notes:
- the shipped atlas and regions were built/learned from 16 (atlas) / 12 (regions) phantoms PLUS the
  example_ct label map, so cropping sensitivity on example_ct with the shipped regions is in-sample;
  ``test_liver_learned_from_phantoms_only_holds_the_real_liver`` is the held-out check.
- cta_aorta carries aorta/vessel labels and one vertebra (T12) only: it exercises "cannot tell".
The anatomy19 model tests run when triton_models/anatomy19 exists and a local Triton can start.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas, load_totalseg_class_map, map_totalseg
from dicomnode.anatomy.register import apply_orientation, register
from dicomnode.anatomy.regions import box_voxels_inside, crop_region, learn_region, load_regions
from dicomnode.series.convert import read_nifti
from dicomnode.volume import Volume
from tests.conftest import ROOT

CONFIGS = [(k, f) for k in range(4) for f in (False, True)]
ORGANS = {"liver": ("liver",), "spleen": ("spleen",), "kidneys": ("kidney_left", "kidney_right"),
          "urinary_bladder": ("urinary_bladder",)}


@pytest.fixture(scope="module")
def atlas():
    return load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")


@pytest.fixture(scope="module")
def ts(shared_data: Path) -> Path:
    return shared_data / "totalsegmentator"


@pytest.fixture(scope="module")
def class_map(ts: Path) -> dict[int, str]:
    return load_totalseg_class_map(ts / "class_maps.json")


def _labels(path: Path, class_map: dict[int, str]) -> tuple[Volume, Volume]:
    raw = read_nifti(path, modality="SEG")
    return raw, raw.with_array(map_totalseg(raw.array, class_map))


def _same_up_to_turn(fixed: Volume, orig: Volume, moved: Volume) -> bool:
    """Same array and axes as ``orig``, turned about the grid centre of ``moved``.

    Under an unchanged header a rotated non-square array has its grid centre elsewhere: where the
    patient really was is only known up to that translation, so the correction turns about it.
    """
    centre = lambda v: v.index_to_lps((np.asarray(v.shape) - 1) / 2.0)[0]  # noqa: E731
    return (np.array_equal(fixed.array, orig.array) and np.allclose(fixed.affine[:3, :3], orig.affine[:3, :3], atol=1e-6)
            and np.allclose(centre(fixed), centre(moved), atol=1e-6))


def _rot(vol: Volume, k: int, flip: bool) -> Volume:
    arr = np.rot90(np.asarray(vol.array), k, axes=(1, 2))
    if flip:
        arr = arr[::-1]
    return Volume(np.ascontiguousarray(arr), vol.affine, modality=vol.modality)


@pytest.mark.parametrize("seg_name", ["example_seg_fast_force_split.nii.gz", "example_seg.nii.gz"])
def test_all_8_orientations_detected_with_reference_labels(atlas, ts, class_map, seg_name):
    """example_ct (abdomen-pelvis) and example_ct_sm (30 slices): every configuration found and verified."""
    _, lab = _labels(ts / seg_name, class_map)
    for k, flip in CONFIGS:
        moved = _rot(lab, k, flip)
        reg = register(moved, atlas)
        assert reg.verified, (k, flip, reg.reason)
        fixed = apply_orientation(moved, reg)
        assert _same_up_to_turn(fixed, lab, moved), (k, flip, reg.rotation_k, reg.z_flip)


def test_ct_image_is_restored_by_the_correction(atlas, ts, class_map):
    """The correction found on the labels, applied to the CT itself, gives back the original CT."""
    ct = read_nifti(ts / "example_ct.nii.gz")
    _, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", class_map)
    for k, flip in [(1, False), (2, True), (3, True)]:
        reg = register(_rot(lab, k, flip), atlas)
        fixed = apply_orientation(_rot(ct, k, flip), reg)
        assert _same_up_to_turn(fixed, ct, _rot(ct, k, flip))


def test_chest_crop_with_one_vertebra_cannot_tell(atlas, ts):
    """cta_aorta: only T12 maps to a CTARR class -> header kept, verified False, with a reason."""
    t12 = read_nifti(ts / "cta_aorta" / "vertebrae_T12.nii.gz", modality="SEG")
    lab = t12.with_array((np.asarray(t12.array) > 0).astype(np.int16) * CLASS_INDEX["thoracic_vertebrae"])
    for k, flip in CONFIGS:
        reg = register(_rot(lab, k, flip), atlas)
        assert not reg.verified and (reg.rotation_k, reg.z_flip) == (0, False)
        assert "undecided" in reg.reason


def test_crop_sensitivity_and_foreground_on_example_ct(atlas, ts, class_map):
    """Shipped regions (in-sample for example_ct): >= 99 % of each organ inside its crop, fg fraction up."""
    ct = read_nifti(ts / "example_ct.nii.gz")
    raw, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", class_map)
    regions = load_regions(ROOT / "config" / "regions")
    reg = register(lab, atlas)
    by_name = {n: i for i, n in class_map.items()}
    for region, names in ORGANS.items():
        crop = crop_region(ct, reg, regions[region], lab)
        mask = np.isin(np.asarray(raw.array), [by_name[n] for n in names])
        assert box_voxels_inside(mask, crop.lower, crop.upper) >= 0.99, region
        before = mask.mean()
        sub = mask[crop.lower[0]:crop.upper[0], crop.lower[1]:crop.upper[1], crop.lower[2]:crop.upper[2]]
        assert sub.mean() > 2 * before, region
        assert np.array_equal(crop.volume.array, np.asarray(ct.array)[crop.lower[0]:crop.upper[0],
                                                                        crop.lower[1]:crop.upper[1],
                                                                        crop.lower[2]:crop.upper[2]])


def test_liver_learned_from_phantoms_only_holds_the_real_liver(atlas, ts, class_map):
    """Held-out: liver region learned from 8 phantoms (not example_ct) holds >= 99 % of example_ct's liver."""
    from inference.phantom import generate_phantom

    pairs = []
    for seed in range(5000, 5008):
        lab, aff = generate_phantom(seed)
        v = Volume(np.where(lab <= N_CLASSES, lab, 0).astype(np.int16), aff)
        pairs.append((v, v.with_array((lab == CLASS_INDEX["liver"]).astype(np.uint8))))
    region, _ = learn_region(pairs, atlas, "liver")
    ct = read_nifti(ts / "example_ct.nii.gz")
    raw, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", class_map)
    crop = crop_region(ct, register(lab, atlas), region, lab)
    liver_id = {n: i for i, n in class_map.items()}["liver"]
    assert box_voxels_inside(np.asarray(raw.array) == liver_id, crop.lower, crop.upper) >= 0.99


def test_registration_and_crop_time(atlas, ts, class_map):
    """Registration + box mapping + crop of the 4 organs; generous bound (CI shares 2 cores)."""
    ct = read_nifti(ts / "example_ct.nii.gz")
    _, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", class_map)
    regions = load_regions(ROOT / "config" / "regions")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        reg = register(lab, atlas)
        for name in ORGANS:
            crop_region(ct, reg, regions[name], lab)
        times.append(time.perf_counter() - t0)
    assert min(times) < 2.0, times


def test_regions_locate_command_json(ts):
    """`dicomnode regions locate CT.nii.gz --labels ... --json`: boxes in NIfTI (i, j, k) order."""
    out = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "regions", "locate", str(ts / "example_ct.nii.gz"),
         "--labels", str(ts / "example_seg_fast_force_split.nii.gz"), "--class-map", str(ts / "class_maps.json"),
         "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    o = doc["orientation"]
    assert o["rotation_quarter_turns"] == 0 and o["z_flipped"] is False and o["verified"] is True and o["reason"]
    assert set(doc["seconds"]) == {"inference", "registration", "cropping"}
    assert doc["qc"]["ok"] in (True, False) and "findings" in doc["qc"]
    assert {"scale", "translation_mm"} <= set(doc["transform"])
    import nibabel as nib

    seg = np.asarray(nib.load(str(ts / "example_seg_fast_force_split.nii.gz")).dataobj)
    liver = doc["regions"]["liver"]["union"]
    lo, hi = liver["lower"], liver["upper"]
    assert doc["input"]["shape"] == list(seg.shape)
    inside = (seg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == 5).sum()
    assert inside / (seg == 5).sum() >= 0.99
    for name in ("liver", "spleen", "kidneys", "urinary_bladder", "lungs", "heart", "brain", "spine"):
        assert name in doc["regions"]


# ---- with the anatomy19 model (Triton) -----------------------------------------------------------
ANATOMY_MODEL = ROOT / "triton_models" / "anatomy19"


@pytest.fixture(scope="module")
def anatomy_client(request):
    if not ANATOMY_MODEL.is_dir():
        pytest.skip("the anatomy19 model is not in triton_models/ yet")
    server = request.getfixturevalue("triton_server")
    repo = request.getfixturevalue("triton_repo")
    from dicomnode.infer.client import InferenceClient

    with InferenceClient(server.http_url, models_dir=repo) as client:
        yield client


def test_orientation_with_the_anatomy19_model(atlas, ts, anatomy_client):
    """example_ct through Triton, as the node decides (turns.py): every configuration found and verified."""
    from dicomnode.anatomy.turns import orientation_by_turns
    from dicomnode.infer import tiling

    ct = read_nifti(ts / "example_ct.nii.gz")
    manifest = anatomy_client.manifest("anatomy19")
    outcomes = []
    for k, flip in [(0, False), (2, False), (3, True)]:  # 3 of 8 here (24 model runs); all 8 in process below
        moved = _rot(ct, k, flip)
        found = orientation_by_turns(moved, lambda v: anatomy_client.segment_native(v, "anatomy19").labels, atlas,
                                     prepare=lambda v: tiling.to_model_grid(v, manifest))
        reg = found.registration
        right = _same_up_to_turn(apply_orientation(moved, reg), ct, moved)
        outcomes.append((k, flip, reg.verified, right, round(found.rotation_ratio, 2), round(found.flip_ratio, 2)))
    assert all(v and r for _, _, v, r, _, _ in outcomes), outcomes


from tests.triton_fixture import triton_repo, triton_server  # noqa: E402,F401  (fixtures for the model tests)


_SESSION: list = []
_MEMO: dict[bytes, np.ndarray] = {}


def _anatomy_in_process(volume: Volume) -> Volume:
    """anatomy19 run with onnxruntime in this process, prepared exactly as the node prepares it
    (``InferenceClient.segment_native`` without the server): labels on the model's 3 mm grid.
    Memoised by the model input's content (the turns of turned arrays repeat)."""
    import hashlib

    import onnxruntime as ort

    from dicomnode.infer import tiling
    from dicomnode.infer.models import load_manifest

    m = load_manifest(ANATOMY_MODEL / "labels.json")
    if not _SESSION:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        _SESSION.append(ort.InferenceSession(str(ANATOMY_MODEL / "1" / "model.onnx"), so,
                                             providers=["CPUExecutionProvider"]))
    sess = _SESSION[0]
    grid = tiling.to_model_grid(volume, m)
    x = np.ascontiguousarray(tiling.normalise(grid.array, m, volume.modality), np.float32)
    key = hashlib.sha1(x.tobytes() + repr(x.shape).encode()).digest()
    if key not in _MEMO:
        labels, _ = tiling.predict_volume(x, m, lambda xb: sess.run(None, {m.input_name: xb})[0])
        _MEMO[key] = tiling.postprocess(labels, m).astype(np.int16)
    return grid.with_array(_MEMO[key])


@pytest.mark.skipif(not (ANATOMY_MODEL / "1" / "model.onnx").exists(), reason="no anatomy19 model exported yet")
@pytest.mark.parametrize("image", ["example_ct.nii.gz", "example_ct_sm.nii.gz", "cta_aorta/ct_cropped.nii.gz"])
def test_model_output_orientation_all_eight_configurations(atlas, ts, image):
    """The node's decision from the model (turns.py), all 8 configurations: found and verified.

    The model alone (one run, landmark search) made wrong verified claims - 3 of 24 with the
    step-4450 weights, whose labels follow image position on turned arrays; the single run is
    kept below as the reason for the turns. Never wrong is the hard rule; all 8 found is the goal
    (issue 6) that the shipped model reaches on these scans (benchmarks/ctarr_orientation.py).
    """
    from dicomnode.anatomy.turns import orientation_by_turns
    from dicomnode.infer import tiling
    from dicomnode.infer.models import load_manifest

    m = load_manifest(ANATOMY_MODEL / "labels.json")
    ct = read_nifti(ts / image)
    wrong, undecided = [], []
    for k, flip in CONFIGS:
        moved = _rot(ct, k, flip)
        found = orientation_by_turns(moved, _anatomy_in_process, atlas, prepare=lambda v: tiling.to_model_grid(v, m))
        reg = found.registration
        if not reg.verified:
            undecided.append((k, flip, reg.reason))
        elif not _same_up_to_turn(apply_orientation(moved, reg), ct, moved):
            wrong.append((k, flip, reg.rotation_k, reg.z_flip))
    assert not wrong, f"verified but wrong: {wrong}"
    assert not undecided, f"not decided: {undecided}"


def _labeller(ref: Volume, *, follows: str):
    """A stand-in anatomy model answering with ``ref``'s labels at each voxel it is given, looked up
    either where the voxel's pixel came from (``header``: follows the content, like a perfectly
    rotation-consistent model) or where the volume's affine says it is (``position``: the worst
    case of a model that names anatomies by where they sit in the image)."""
    from dicomnode.volume import resample

    def segment(v: Volume) -> Volume:
        aff = v.header_affine if follows == "header" else v.affine
        return v.with_array(np.asarray(resample(ref, aff, v.shape, order=0).array).astype(np.int16))
    return segment


def test_turns_decide_with_a_content_following_model_and_refuse_a_position_labeller(atlas, ts, class_map):
    """turns.py on example_ct_sm (30 slices): a model whose labels follow the content finds every
    configuration; one whose labels follow the image position gets "cannot tell", never a claim."""
    from dicomnode.anatomy.turns import orientation_by_turns
    from dicomnode.infer import tiling
    from dicomnode.infer.models import load_manifest

    m = load_manifest(ROOT / "triton_models" / "anatomy19" / "labels.json")
    ct = read_nifti(ts / "example_ct_sm.nii.gz")
    _, ref = _labels(ts / "example_seg.nii.gz", class_map)
    for k, flip in [(0, False), (1, True), (2, False), (3, True)]:
        moved, moved_ref = _rot(ct, k, flip), _rot(ref, k, flip)
        prepare = lambda v: tiling.to_model_grid(v, m)  # noqa: E731
        good = orientation_by_turns(moved, _labeller(moved_ref, follows="header"), atlas, prepare=prepare)
        assert good.registration.verified, good.registration.reason
        assert _same_up_to_turn(apply_orientation(moved, good.registration), ct, moved), (k, flip)
        assert good.rotation_ratio > 1.25 and good.flip_ratio > 1.25
        bad = orientation_by_turns(moved, _labeller(ref, follows="position"), atlas, prepare=prepare)
        assert not bad.registration.verified, (k, flip, bad.dice)
        assert not bad.registration.reoriented  # header kept


def test_regions_learn_command_on_the_real_labels(ts, tmp_path):
    """`dicomnode regions learn` from example_ct's labels writes a region holding all of its liver."""
    out = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "regions", "learn",
         "--anatomy", str(ts / "example_seg_fast_force_split.nii.gz"),
         "--masks", str(ts / "example_seg_fast_force_split.nii.gz"), "--class-map", str(ts / "class_maps.json"),
         "--mask-labels", "liver", "--name", "liver_test", "--threshold", "0", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    region = load_regions(tmp_path)["liver_test"]
    assert region.n_scans == 1 and "example_seg_fast_force_split" in region.learned_from
    atlas = load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")
    cmap = load_totalseg_class_map(ts / "class_maps.json")
    raw, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", cmap)
    crop = crop_region(raw, register(lab, atlas), region, lab)
    assert box_voxels_inside(np.asarray(raw.array) == 5, crop.lower, crop.upper) == 1.0


def test_crops_follow_the_anatomy_in_every_orientation(atlas, ts, class_map):
    """Rotated/flipped scan, boxes mapped without correcting it: the crop still holds the organ."""
    raw, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", class_map)
    regions = load_regions(ROOT / "config" / "regions")
    by_name = {n: i for i, n in class_map.items()}
    for k, flip in CONFIGS:
        moved_lab, moved_raw = _rot(lab, k, flip), _rot(raw, k, flip)
        reg = register(moved_lab, atlas)
        for region, names in ORGANS.items():
            crop = crop_region(moved_raw, reg, regions[region], moved_lab)
            mask = np.isin(np.asarray(moved_raw.array), [by_name[n] for n in names])
            assert box_voxels_inside(mask, crop.lower, crop.upper) >= 0.99, (k, flip, region)


@pytest.mark.parametrize("damage", ["speckle", "false_blobs", "drop_half_the_classes", "lumbar_as_cervical"])
def test_damaged_segmentations_never_claim_a_wrong_orientation(atlas, ts, class_map, damage):
    """Segmentation errors a model makes: the orientation is right or honestly undecided, never wrong."""
    _, lab = _labels(ts / "example_seg_fast_force_split.nii.gz", class_map)
    rng = np.random.default_rng(42)
    decided = 0
    for k, flip in CONFIGS:
        clean = _rot(lab, k, flip)
        arr = np.asarray(clean.array).copy()
        if damage == "speckle":  # 2 % of the voxels get a random label
            m = rng.random(arr.shape) < 0.02
            arr[m] = rng.integers(0, N_CLASSES + 1, int(m.sum()))
        elif damage == "false_blobs":  # six 18 mm cubes of random anatomies anywhere
            for _ in range(6):
                z, y, x = (int(rng.integers(5, s - 5)) for s in arr.shape)
                arr[z - 3:z + 3, y - 3:y + 3, x - 3:x + 3] = rng.integers(1, N_CLASSES + 1)
        elif damage == "drop_half_the_classes":
            present = np.unique(arr)[1:]
            arr[np.isin(arr, rng.choice(present, len(present) // 2, replace=False))] = 0
        else:
            arr[arr == CLASS_INDEX["lumbar_vertebrae"]] = CLASS_INDEX["cervical_vertebrae"]
        reg = register(clean.with_array(arr), atlas)
        if reg.verified:
            decided += 1
            assert _same_up_to_turn(apply_orientation(clean, reg), lab, clean), (damage, k, flip)
    assert decided >= 6, damage  # measured: 8/8 for each damage on example_ct


def test_locate_on_a_dicom_series_at_finer_resolution(ts, tmp_path):
    """DICOM input at 1.5 mm in-plane, anatomy labels on the 3 mm NIfTI grid: boxes in (slice, row, column)
    of the series hold the organs (boxes go through LPS mm, not through array indices)."""
    from tests.ct_dicom import nifti_to_dicom, reference_on_series

    series = nifti_to_dicom(ts / "example_ct.nii.gz", tmp_path / "ct", shape_ijk=(244, 202, 112))
    out = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "regions", "locate", str(series.folder),
         "--labels", str(ts / "example_seg_fast_force_split.nii.gz"), "--class-map", str(ts / "class_maps.json"),
         "--regions", "liver", "spleen", "kidneys", "urinary_bladder", "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["input"]["path_kind"].startswith("dicom") and doc["input"]["shape"] == list(series.shape)
    ref = reference_on_series(ts / "example_seg_fast_force_split.nii.gz", series)
    ids = {"liver": (5,), "spleen": (1,), "kidneys": (2, 3), "urinary_bladder": (21,)}
    for name, labels in ids.items():
        box = doc["regions"][name]["union"]
        assert box_voxels_inside(np.isin(ref, labels), box["lower"], box["upper"]) >= 0.99, name


def test_locate_with_the_model_finds_a_turned_scan(ts, tmp_path, anatomy_client, request):
    """`dicomnode regions locate` without --labels runs anatomy19 on Triton the way the node does
    (8 turns): example_ct_sm turned 180 degrees under its header is found turned, verified, and the
    liver box (mapped into the turned array) holds the reference liver."""
    from dicomnode.series.convert import write_nifti

    server = request.getfixturevalue("triton_server")
    ct = read_nifti(ts / "example_ct_sm.nii.gz")
    turned = _rot(ct, 2, False)
    write_nifti(turned, tmp_path / "turned.nii.gz")
    out = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "regions", "--triton", server.http_url.removeprefix("http://"),
         "locate", str(tmp_path / "turned.nii.gz"), "--regions", "liver", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    o = doc["orientation"]
    assert o["verified"] and o["method"] == "turns" and o["rotation_quarter_turns"] == 2 and not o["z_flipped"], o
    assert doc["input"]["anatomy_source"] == "anatomy19 (Triton)" and doc["seconds"]["inference"] > 0
    raw = read_nifti(ts / "example_seg.nii.gz", modality="SEG")
    liver = _rot(raw.with_array((np.asarray(raw.array) == 5).astype(np.uint8)), 2, False)
    box = doc["regions"]["liver"]["union"]
    lo, hi = box["lower"][::-1], box["upper"][::-1]  # NIfTI (i, j, k) -> array (slice, row, column)
    assert box_voxels_inside(np.asarray(liver.array) > 0, lo, hi) >= 0.99
