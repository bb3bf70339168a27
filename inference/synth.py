"""Synthetic CT and MR-like images from label maps (Tsanda et al., "Learning CT Segmentation from
Label Masks Only"; SynthSeg-style random contrasts for MR).

Label values are those of :data:`inference.phantom.LABELS` (real label maps are first mapped to
them by :mod:`inference.realdata`). Everything works on (z, y, x) arrays of any size, so training
synthesises only the patch it needs.

* :func:`ct_from_labels` - per-tissue HU drawn from prior distributions (random contrast phase),
  constant fills plus smooth random textures, bone cortex, lung vessels, partial-volume blur,
  slice-thickness blur, Gaussian and correlated noise, a noise-free constant region outside the
  reconstruction circle, scanner clipping.
* :func:`mr_from_labels` - random tissue intensities, bias field, noise, blur (for the body model).
* :func:`omit_labels` - random label omission (an organ is not "pasted back": it becomes the
  surrounding tissue and background in the target).
* :func:`window_channels`, :func:`zscore` - the node's input normalisations.
* :func:`ctarr_target`, :func:`body_target` - training targets.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from inference.phantom import LABELS, N_LABELS

L = LABELS
BONES = tuple(L[n] for n in (
    "skull", "cervical_vertebrae", "left_ribs_scapula_clavicle", "right_ribs_scapula_clavicle",
    "sternum", "thoracic_vertebrae", "lumbar_vertebrae", "sacrum", "left_hip", "right_hip", "other_bone"))
NOT_BODY = (0, L["table"], L["outside_fov"])
# label -> (mean low, mean high, texture std low, texture std high) in HU, without contrast agent
_CT_PRIOR: dict[str, tuple[float, float, float, float]] = {
    "brain": (25, 45, 2, 8), "csf": (0, 15, 1, 5), "eye": (5, 20, 1, 5),
    "left_lung": (-900, -750, 10, 60), "right_lung": (-900, -750, 10, 60),
    "heart": (30, 55, 3, 10), "liver": (45, 75, 3, 15), "spleen": (35, 60, 3, 12),
    "left_kidney": (5, 45, 3, 12), "right_kidney": (5, 45, 3, 12), "urinary_bladder": (-5, 25, 1, 6),
    "fat": (-125, -75, 5, 25), "muscle": (15, 65, 5, 20), "bowel": (-20, 60, 10, 60),
    "gas": (-1010, -850, 5, 60), "table": (-400, 700, 5, 50), "soft_tissue": (15, 60, 5, 25),
    "vessel": (30, 55, 2, 8), "airway": (-1010, -900, 2, 20), "cartilage": (90, 220, 5, 30),
}
_CONTRAST = {  # phase -> label -> added HU (low, high)
    "arterial": {"heart": (150, 400), "vessel": (150, 450), "spleen": (30, 90), "liver": (10, 40),
                 "left_kidney": (80, 200), "right_kidney": (80, 200)},
    "venous": {"heart": (80, 180), "vessel": (80, 200), "spleen": (50, 90), "liver": (40, 80),
               "left_kidney": (100, 180), "right_kidney": (100, 180), "urinary_bladder": (0, 40)},
}
OUTSIDE_VALUES = (-1024.0, -2048.0, -3024.0, -1000.0, -2000.0, 0.0, -500.0, -1200.0)


def smooth_field(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-std Gaussian random field smoothed with ``sigma`` voxels (computed at low resolution)."""
    f = max(1, int(sigma // 2))
    small = tuple(max(2, -(-s // f)) for s in shape)
    g = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / f)
    if f > 1:
        g = ndi.zoom(g, [s / t for s, t in zip(shape, small)], order=1)[tuple(slice(0, s) for s in shape)]
    g = g - g.mean()
    return (g / (g.std() + 1e-6)).astype(np.float32)


def omit_labels(labels: np.ndarray, rng: np.random.Generator, p: float = 0.1) -> np.ndarray:
    """Return a copy where each present organ (11..19, not the brain) is replaced with p by fat/soft tissue/bowel."""
    out = labels.copy()
    for v in range(12, 20):
        if rng.random() < p and (out == v).any():
            out[out == v] = rng.choice([L["fat"], L["soft_tissue"], L["bowel"]])
    return out


def ct_from_labels(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthetic CT (float32 HU, same shape) from a phantom-valued label map."""
    U = rng.uniform
    shape = labels.shape
    mean = np.zeros(N_LABELS, np.float32); tex = np.zeros(N_LABELS, np.float32)
    mean[0] = U(-1010, -990); tex[0] = U(0, 5)
    for name, (a, b, c, d) in _CT_PRIOR.items():
        mean[L[name]] = U(a, b); tex[L[name]] = U(c, d)
    phase = rng.choice(["none", "arterial", "venous"], p=[0.4, 0.3, 0.3])
    for name, (a, b) in _CONTRAST.get(str(phase), {}).items():
        mean[L[name]] += U(a, b)
    if rng.random() < 0.15:  # oral contrast in the bowel
        mean[L["bowel"]] += U(100, 400)
    elif rng.random() < 0.3:  # fluid-filled stomach/bowel close to the liver's density: the liver is told by shape
        mean[L["bowel"]] = mean[L["liver"]] - U(5, 30); tex[L["bowel"]] = U(3, 12)
    for v in BONES:  # cancellous bone (real example_ct vertebrae: median 144-178 HU at 3 mm)
        mean[v] = U(90, 400); tex[v] = U(20, 120)
    lab = labels.astype(np.intp)
    field = smooth_field(shape, U(0.8, 2.5), rng)
    if rng.random() < 0.5:
        field = 0.7 * field + 0.7 * smooth_field(shape, U(3.0, 6.0), rng)
    img = mean[lab] + tex[lab] * field
    bone = np.isin(lab, BONES)
    if bone.any():
        cortex = bone & ~ndi.binary_erosion(bone, iterations=1)
        img[cortex] = U(350, 1200) + U(20, 150) * field[cortex]
    lung = (lab == L["left_lung"]) | (lab == L["right_lung"])
    if lung.any():
        spikes = smooth_field(shape, 0.7, rng) > U(1.6, 2.3)
        img[lung & spikes] += U(300, 800)
    img = ndi.gaussian_filter(img, U(0.3, 1.0))
    if rng.random() < 0.3:  # thick slices
        img = ndi.gaussian_filter1d(img, U(0.5, 1.5), axis=0)
    sd = U(3, 40)
    noise = rng.standard_normal(shape).astype(np.float32)
    if rng.random() < 0.5:
        noise = ndi.gaussian_filter(noise, 0.6) * 2.0
    img += sd * noise
    out = lab == L["outside_fov"]
    if out.any():
        img[out] = rng.choice(OUTSIDE_VALUES) if rng.random() < 0.8 else U(-1100, 300)
    lo = -1024.0 if rng.random() < 0.7 else U(-3100, -1024)
    np.clip(img, lo, 3071.0, out=img)
    return img.astype(np.float32)


def mr_from_labels(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthetic MR-like image (float32, arbitrary scale) with random tissue contrasts."""
    U = rng.uniform
    shape = labels.shape
    mean = rng.uniform(0.1, 1.0, N_LABELS).astype(np.float32)
    tex = rng.uniform(0.0, 0.08, N_LABELS).astype(np.float32)
    for v in (0, L["gas"], L["airway"]):
        mean[v] = U(0, 0.04); tex[v] = 0.0
    for v in BONES:  # cortical bone dark, marrow random
        mean[v] = U(0.05, 0.9)
    lab = labels.astype(np.intp)
    field = smooth_field(shape, U(0.8, 2.5), rng)
    img = mean[lab] + tex[lab] * field
    bone = np.isin(lab, BONES)
    if bone.any():
        img[bone & ~ndi.binary_erosion(bone)] = U(0.0, 0.08)
    img *= np.exp(U(0.05, 0.35) * smooth_field(shape, max(shape) / 3.0, rng))  # bias field
    img = ndi.gaussian_filter(img, U(0.3, 1.0))
    img = np.abs(img + U(0.005, 0.04) * rng.standard_normal(shape).astype(np.float32))
    img = img ** U(0.7, 1.4)
    out = lab == L["outside_fov"]
    if out.any():
        img[out] = 0.0
    return (img * U(100, 3000)).astype(np.float32)


def window_channels(hu: np.ndarray, windows: tuple[tuple[float, float], ...]) -> np.ndarray:
    """(C, ...) float32: each window clipped and scaled to [0, 1] (the manifest's "window")."""
    return np.stack([np.clip((hu - lo) / (hi - lo), 0.0, 1.0) for lo, hi in windows]).astype(np.float32)


def zscore(img: np.ndarray) -> np.ndarray:
    """(1, ...) float32 z-score over the whole volume (the manifest's "zscore")."""
    return ((img - img.mean()) / (img.std() + 1e-6))[None].astype(np.float32)


def ctarr_target(labels: np.ndarray) -> np.ndarray:
    """0..19 CTARR classes (extra tissue labels -> 0); 255 (ignore) stays 255."""
    t = np.where(labels <= 19, labels, 0).astype(np.int64)
    t[labels == 255] = 255
    return t


def body_target(labels: np.ndarray) -> np.ndarray:
    """1 inside the body (everything but air, table and outside the reconstruction circle)."""
    return (~np.isin(labels, NOT_BODY)).astype(np.int64)
