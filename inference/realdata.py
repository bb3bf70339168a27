"""Real scans and label maps from ../shared/data, on the phantom's canonical grid and label values.

Canonical grid (as :mod:`inference.phantom`): array (slice, row, column) with slices head -> feet,
rows anterior -> posterior, columns patient right -> left; ``affine`` index -> LPS mm.
Files are only READ from the shared data folder (never copied into the repository).

Label maps are mapped to :data:`inference.phantom.LABELS` (TotalSegmentator "total" and "total_mr"
classes by name, from class_maps.json). Voxels without a TotalSegmentator label get a tissue class
from the image (CT: HU thresholds; MR: intensity clustering): air, gas, fat, soft tissue, bone.
Voxels whose CTARR class is unknown (e.g. unlabelled bone, MR "vertebrae" without level) are stored
as ``IGNORE_OFFSET + tissue label`` so training can synthesise them but exclude them from the loss.

Raises FileNotFoundError when the shared data is missing, KeyError for an unknown scan name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inference.phantom import LABELS

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TS = DATA / "totalsegmentator"
IGNORE_OFFSET = 100
L = LABELS


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip an (a0, a1, a2) array with index->LPS ``affine`` onto the canonical axes."""
    A = np.asarray(affine, float)
    dom = [int(np.argmax(np.abs(A[:3, a]))) for a in range(3)]  # LPS component of each array axis
    if sorted(dom) != [0, 1, 2]:
        raise ValueError("oblique orientation: cannot map array axes to patient axes")
    want = {2: 0, 1: 1, 0: 2}  # LPS z -> slice, y -> row, x -> column
    order = [dom.index(c) for c in (2, 1, 0)]
    arr = np.transpose(array, order)
    A2 = np.eye(4); A2[:3, 3] = A[:3, 3]
    A2[:3, :3] = A[:3, order]
    for ax in range(3):
        comp = {0: 2, 1: 1, 2: 0}[ax]
        sign = np.sign(A2[comp, ax])
        if (ax == 0 and sign > 0) or (ax > 0 and sign < 0):  # slices must go to -z (feet)
            n = arr.shape[ax]
            A2[:3, 3] = A2[:3, 3] + A2[:3, ax] * (n - 1)
            A2[:3, ax] = -A2[:3, ax]
            arr = np.flip(arr, ax)
    assert want  # documentation of the mapping above
    return np.ascontiguousarray(arr), A2


def load_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read NIfTI (nibabel) or NRRD (SimpleITK) onto the canonical grid: (array, affine)."""
    path = Path(path)
    if path.suffix == ".nrrd":
        import SimpleITK as sitk
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)  # (k, j, i)
        d = np.array(img.GetDirection()).reshape(3, 3); sp = np.array(img.GetSpacing())
        A = np.eye(4)
        for a, ia in enumerate((2, 1, 0)):
            A[:3, a] = d[:, ia] * sp[ia]
        A[:3, 3] = img.GetOrigin()
        return canonical(arr, A)
    import nibabel as nib
    im = nib.load(str(path))
    arr = np.asarray(im.dataobj).transpose(2, 1, 0)
    A = np.diag([-1.0, -1.0, 1.0, 1.0]) @ im.affine  # RAS -> LPS
    P = np.zeros((4, 4)); P[2, 0] = P[1, 1] = P[0, 2] = P[3, 3] = 1.0
    return canonical(arr, A @ P)


def _total_map(task: str) -> dict[int, int]:
    """TotalSegmentator class id -> phantom label value (IGNORE_OFFSET+x for unknown CTARR class)."""
    names = json.loads((TS / "class_maps.json").read_text())[task]
    out: dict[int, int] = {}
    for k, n in names.items():
        v: int
        if n in ("spleen", "liver", "brain", "skull", "heart", "sternum", "sacrum", "urinary_bladder"):
            v = L[n]
        elif n in ("kidney_left", "kidney_cyst_left"):
            v = L["left_kidney"]
        elif n in ("kidney_right", "kidney_cyst_right"):
            v = L["right_kidney"]
        elif n.startswith("lung_") and n.endswith("left") or n in ("lung_upper_lobe_left", "lung_lower_lobe_left"):
            v = L["left_lung"]
        elif n.startswith("lung_") and ("right" in n):
            v = L["right_lung"]
        elif n == "vertebrae_S1":
            v = L["sacrum"]
        elif n.startswith("vertebrae_") and len(n) <= 13:
            v = L[{"C": "cervical_vertebrae", "T": "thoracic_vertebrae", "L": "lumbar_vertebrae"}[n[10]]]
        elif n == "vertebrae":
            v = IGNORE_OFFSET + L["other_bone"]
        elif n.startswith("rib_left") or n in ("scapula_left", "clavicula_left"):
            v = L["left_ribs_scapula_clavicle"]
        elif n.startswith("rib_right") or n in ("scapula_right", "clavicula_right"):
            v = L["right_ribs_scapula_clavicle"]
        elif n in ("hip_left", "hip_right"):
            v = L["left_hip" if n.endswith("left") else "right_hip"]
        elif n.startswith(("humerus", "femur")):
            v = L["other_bone"]
        elif n in ("stomach", "small_bowel", "duodenum", "colon"):
            v = L["bowel"]
        elif n == "trachea":
            v = L["airway"]
        elif n == "spinal_cord":
            v = L["csf"]
        elif n == "costal_cartilages":
            v = L["cartilage"]
        elif n.startswith(("gluteus", "autochthon", "iliopsoas")):
            v = L["muscle"]
        elif any(t in n for t in ("aorta", "vena", "vein", "artery", "trunk", "atrial")):
            v = L["vessel"]
        else:
            v = L["soft_tissue"]
        out[int(k)] = v
    return out


def map_labels(seg: np.ndarray, task: str) -> np.ndarray:
    """Map a TotalSegmentator label map (``task`` "total" or "total_mr") to phantom label values."""
    lut = np.zeros(256, np.int16)
    for k, v in _total_map(task).items():
        lut[k] = v
    return lut[seg.astype(np.intp)]


def body_mask_ct(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Reference body mask of a CT: HU > threshold, largest 3D component, holes filled per slice."""
    m = hu > threshold
    m = ndi.binary_opening(m, iterations=1)
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = ndi.sum(m, lab, range(1, n + 1))
    m = lab == (1 + int(np.argmax(sizes)))
    return np.stack([ndi.binary_fill_holes(s) for s in m])


def fill_unlabelled_ct(mapped: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Tissue classes for unlabelled voxels of a CT label map (seed paper, data set #2)."""
    out = mapped.copy()
    body = body_mask_ct(hu)
    free = out == 0
    out[free & body & (hu < -400)] = L["gas"]
    out[free & body & (hu >= -400) & (hu < -20)] = L["fat"]
    out[free & body & (hu >= -20) & (hu < 200)] = L["soft_tissue"]
    out[free & body & (hu >= 200)] = IGNORE_OFFSET + L["other_bone"]
    out[free & ~body & (hu > -500)] = L["table"]
    return out


def fill_unlabelled_mr(mapped: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Unlabelled MR voxels: body by Otsu-like threshold, then 2-means into fat (bright) / soft tissue."""
    out = mapped.copy()
    v = img.astype(np.float32)
    t = np.percentile(v, 60) * 0.35 + 1e-3
    body = np.stack([ndi.binary_fill_holes(s) for s in ndi.binary_opening(v > t)])
    free = (out == 0) & body
    vals = v[free]
    if vals.size:
        c = np.percentile(vals, [25, 85]).astype(float)
        for _ in range(10):
            hi = np.abs(vals - c[1]) < np.abs(vals - c[0])
            c = np.array([vals[~hi].mean() if (~hi).any() else c[0], vals[hi].mean() if hi.any() else c[1]])
        out[free] = np.where(np.abs(v[free] - c[1]) < np.abs(v[free] - c[0]), L["fat"], L["soft_tissue"])
    return out


@dataclass(frozen=True)
class RealScan:
    """A real image with its label map mapped to phantom labels (canonical grid)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    modality: str


def load_scan(name: str) -> RealScan:
    """``example_ct`` | ``example_ct_sm`` | ``example_mr`` | ``cta_aorta``; raises KeyError/FileNotFoundError."""
    if name in ("example_ct", "example_ct_sm"):
        segf = "example_seg_fast_force_split.nii.gz" if name == "example_ct" else "example_seg.nii.gz"
        img, A = load_image(TS / f"{name}.nii.gz")
        seg, _ = load_image(TS / segf)
        lab = fill_unlabelled_ct(map_labels(seg, "total"), img)
        return RealScan(name, img.astype(np.float32), lab, A, "CT")
    if name == "example_mr":
        img, A = load_image(TS / "example_mr_sm.nii.gz")
        seg, _ = load_image(TS / "example_seg_mr.nii.gz")
        return RealScan(name, img.astype(np.float32), fill_unlabelled_mr(map_labels(seg, "total_mr"), img), A, "MR")
    if name == "cta_aorta":
        d = TS / "cta_aorta"
        img, A = load_image(d / "ct_cropped.nii.gz")
        lab = np.zeros(img.shape, np.int16)
        for f, v in (("aorta.nii.gz", L["vessel"]), ("vertebrae_T12.nii.gz", L["thoracic_vertebrae"])):
            m, _ = load_image(d / f)
            lab[m > 0] = v
        return RealScan(name, img.astype(np.float32), fill_unlabelled_ct(lab, img), A, "CT")
    raise KeyError(name)


def resample_labels(lab: np.ndarray, affine: np.ndarray, spacing: float) -> np.ndarray:
    """Nearest-neighbour resampling of a canonical label map to isotropic ``spacing`` mm."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    if np.allclose(sp, spacing, atol=1e-3):
        return lab
    return ndi.zoom(lab, sp / spacing, order=0)


def real_pool(names: list[str], spacing: float):  # -> train.Pool
    """A training pool of real label maps (resampled to ``spacing``)."""
    from inference.train import Pool
    maps = []
    for n in names:
        s = load_scan(n)
        maps.append(resample_labels(s.labels, s.affine, spacing).astype(np.int16))
    return Pool(maps, names)
