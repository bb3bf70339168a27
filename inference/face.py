"""Face-area (anonymisation) data: head masks, the face region, and defacing/refacing/blurring.

Images are on the canonical grid (slices head -> feet, rows anterior -> posterior, columns right
-> left) at isotropic ``spacing`` mm. The face region of a head is defined geometrically from its
head mask, like the slab-shaped face masks of pydeface/AFNI: every voxel below ``BROW_MM`` under
the vertex, in front of the plane ``DEPTH_MM`` behind the most anterior point of the head (out to
the edge of the field of view), and within the head's left-right extent of that slice plus
``MARGIN_MM``. An earlier definition followed the face's own outline (head mask dilated by 9 mm);
after defacing that outline is gone, so the target was not observable (the nose's shape cannot be
seen in the air that replaced it) and deface Dice on the held-out head stayed at 0.00-0.31 while
reface and blur reached 0.94-0.96. Every boundary of the slab can be seen in the anonymised image:
the cut plane, the brow plane, the width of the head behind the face, the edge of the image.
:func:`anonymise` alters that region in one of the seed paper's modes: "deface" (set to the
background value), "reface" (a smooth generic surface), "blur" (strong Gaussian blur, as in
"reface plus"). The face_area model learns where the image was altered; its evaluation applies
the same procedure to real MR heads it never saw.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

DEPTH_MM = 50.0
BROW_MM = 80.0
MARGIN_MM = 9.0
MODES = ("deface", "reface", "blur")
# Anonymisation happens at the scanner's resolution and the node resamples to 3 mm afterwards, so
# the cut has the same partial-volume softness as any natural edge. Anonymising on the 3 mm grid
# alone gives razor-sharp cuts, and a model trained only on those keys on the sharpness: defaced at
# 0.88 mm and resampled, the held-out head got Dice 0.00 (0.84 defaced at 3 mm). A light blur of
# the whole anonymised image (sigma 0.4-0.9 voxel) stands in for that resampling.
PARTIAL_VOLUME_P = 0.7
# Many MR heads come with the air masked to exactly 0 beyond a few mm of the head (chris_t1: no
# non-zero voxel beyond 11 mm, 95 % of the air is 0). The two real training heads have noisy air,
# so a defaced region (filled with the 1st percentile) was their only exactly constant area, and
# the model partly keyed on that (masking their air lowered their deface Dice 0.97 -> 0.90). With
# the air masked in half of the samples, a defaced face is told from air only by the missing face.
BACKGROUND_MASK_P = 0.5
# Many heads are stored with a tight field of view (chris_t1: the head touches the left, right and
# front edges), so the face region runs into the image edge. Our training heads had air all round,
# and the padding beyond a patch's image edge (the air value, target 0) looked exactly like a
# defaced face: the held-out deface result missed the slab's ends at both side edges. Now a share
# of the heads is cropped to the head +0-6 mm at the sides and the front, and the padding beyond
# the image is not in the loss (target 255) - nothing can be learned about voxels that do not exist.
TIGHT_FOV_P = 0.35


def mask_background(img: np.ndarray, head: np.ndarray, margin_vox: int) -> np.ndarray:
    """``img`` with every voxel farther than ``margin_vox`` voxels from ``head`` set to the image
    minimum, as scanners and converters that mask the air do."""
    keep = ndi.binary_dilation(head, iterations=margin_vox) if margin_vox > 0 else head
    out = np.asarray(img, np.float32).copy()
    out[~keep] = float(out.min())
    return out


def tight_fov(img: np.ndarray, head: np.ndarray, spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``img`` and ``head`` cropped to the head plus 0-6 mm at the left, right and front (rows run
    anterior -> posterior, columns across), as a tight field of view stores a head."""
    if not head.any():
        return img, head
    rows = np.nonzero(head.any(axis=(0, 2)))[0]; cols = np.nonzero(head.any(axis=(0, 1)))[0]
    m = lambda: int(round(rng.uniform(0.0, 6.0) / spacing))  # noqa: E731
    y0 = max(0, int(rows[0]) - m()); x0 = max(0, int(cols[0]) - m()); x1 = min(head.shape[2], int(cols[-1]) + 1 + m())
    return img[:, y0:, x0:x1], head[:, y0:, x0:x1]


def head_mask(img: np.ndarray) -> np.ndarray:
    """Largest bright component (threshold at 20% of the 99th percentile), holes filled per slice."""
    v = img.astype(np.float32)
    lo = np.percentile(v, 1)
    m = v > lo + 0.2 * (np.percentile(v, 99) - lo)
    m = ndi.binary_opening(m, iterations=1)
    lab, n = ndi.label(m)
    if n == 0:
        return m
    m = lab == 1 + int(np.argmax(ndi.sum(m, lab, range(1, n + 1))))
    return np.stack([ndi.binary_fill_holes(s) for s in m])


def face_region(head: np.ndarray, spacing: float, depth_mm: float = DEPTH_MM, brow_mm: float = BROW_MM) -> np.ndarray:
    """The face region (boolean, same shape) of a head mask on the canonical grid (module
    docstring); empty when there is no head or no head below the brow."""
    out = np.zeros(head.shape, bool)
    zs = np.nonzero(head.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return out
    z0 = int(zs[0] + round(brow_mm / spacing))
    if z0 >= head.shape[0] or not head[z0:].any():
        return out
    rows = np.nonzero(head[z0:].any(axis=(0, 2)))[0]
    y1 = int(rows[0] + round(depth_mm / spacing))
    m = max(1, int(round(MARGIN_MM / spacing)))
    for z in range(z0, head.shape[0]):
        cols = np.nonzero(head[z].any(axis=0))[0]
        if cols.size:
            out[z, :y1, max(0, int(cols[0]) - m):int(cols[-1]) + m + 1] = True
    return out


def anonymise(img: np.ndarray, region: np.ndarray, rng: np.random.Generator, mode: str | None = None,
              spacing: float = 3.0) -> np.ndarray:
    """``img`` with ``region`` altered by ``mode`` (random when None); ``spacing`` is the voxel size
    in mm, so the reface/blur kernels are the same in mm at any resolution (reface 12-21 mm, blur
    6-12 mm). Raises ValueError for an unknown mode."""
    mode = mode or str(rng.choice(MODES))
    out = img.astype(np.float32).copy()
    if not region.any():
        return out
    per_mm = 3.0 / spacing  # the kernels below are in 3 mm voxels
    if mode == "deface":
        out[region] = float(np.percentile(img, 1))
    elif mode == "reface":
        smooth = ndi.gaussian_filter(out, rng.uniform(4, 7) * per_mm)
        out[region] = smooth[region] * rng.uniform(0.6, 1.0)
    elif mode == "blur":
        out[region] = ndi.gaussian_filter(out, rng.uniform(2, 4) * per_mm)[region]
    else:
        raise ValueError(f"unknown anonymisation mode {mode!r}")
    return out


def resample_head_grid(img: np.ndarray, affine: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """(image, affine) on the node's canonical grid at isotropic ``spacing`` mm, made by the node's
    own resampling (``dicomnode.infer.tiling.to_spacing_grid``, the body of ``to_model_grid``: block
    mean of axes downsampled 2x or more, then linear interpolation on the physical grid). An
    earlier ``ndi.zoom`` stand-in was close (correlation 0.96) but not equal, and the model trained
    on it lost most of the defaced area on the node's own grid (Dice 0.84 -> 0.44), so training,
    evaluation and node share this."""
    from dicomnode.infer.tiling import to_spacing_grid
    from dicomnode.volume import Volume
    g = to_spacing_grid(Volume(np.asarray(img, np.float32), np.asarray(affine, float)), (spacing, spacing, spacing))
    return np.asarray(g.array, np.float32), np.asarray(g.affine)


def resample_head(img: np.ndarray, affine: np.ndarray, spacing: float) -> np.ndarray:
    """The image of :func:`resample_head_grid`."""
    return resample_head_grid(img, affine, spacing)[0]


class FacePool:
    """Training heads: phantom head label maps (synthesised per sample) and real MR head images."""

    def __init__(self, n_phantoms: int, spacing: float, real: tuple[str, ...] = ("brain1_image.nrrd", "brain2_image.nrrd"),
                 seed0: int = 5000) -> None:
        from inference.phantom import generate_phantom
        from inference.realdata import DATA, load_image
        self.spacing = spacing
        self.phantoms = [generate_phantom(seed0 + i, "head", spacing)[0] for i in range(n_phantoms)]
        self.real = []
        for name in real:
            img, A = load_image(DATA / "mr_heads" / name)
            self.real.append(resample_head(img, A, spacing))

    def sample(self, rng: np.random.Generator, patch: tuple[int, int, int], real_p: float = 0.35,
               intact_p: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
        """(zscored image (1, *patch), target (patch)) of one head patch, anonymised except with
        probability ``intact_p`` (then the target is empty)."""
        from inference import synth
        from inference.train import crop_patch
        if self.real and rng.random() < real_p:
            img = self.real[int(rng.integers(len(self.real)))]
            if rng.random() < 0.3:  # other resolutions: a smooth unaltered head is not a blurred face
                img = ndi.gaussian_filter(img, rng.uniform(0.3, 1.0))
            img = img * rng.uniform(0.5, 2.0) * np.exp(0.15 * synth.smooth_field(img.shape, 12.0, rng))
            head = head_mask(img)
        else:
            lab = self.phantoms[int(rng.integers(len(self.phantoms)))]
            img = synth.mr_from_labels(lab, rng) if rng.random() < 0.75 else synth.ct_from_labels(lab, rng)
            head = ~np.isin(lab, synth.NOT_BODY)
        if rng.random() < BACKGROUND_MASK_P:
            img = mask_background(img, head, int(rng.integers(1, 4)))
        if rng.random() < TIGHT_FOV_P:
            img, head = tight_fov(img, head, self.spacing, rng)
        region = face_region(head, self.spacing, DEPTH_MM * rng.uniform(0.85, 1.15), BROW_MM * rng.uniform(0.85, 1.15))
        if rng.random() < intact_p:  # an intact face is not an altered area (else it learns where faces are)
            region = np.zeros_like(region)
        out = anonymise(img, region, rng)
        if rng.random() < PARTIAL_VOLUME_P:  # anonymised at the acquisition resolution, then resampled
            out = ndi.gaussian_filter(out, rng.uniform(0.4, 0.9))
        pts = np.argwhere(region) if region.any() and rng.random() < 0.7 else np.argwhere(head)
        c = pts[rng.integers(len(pts))] if len(pts) else np.array(out.shape) // 2
        fill = float(np.percentile(out, 1))
        x = crop_patch(out, c, patch, fill=0)
        x[crop_patch(np.ones(out.shape, bool), c, patch, fill=0) == 0] = fill
        y = crop_patch(region.astype(np.int64), c, patch, fill=255)  # beyond the image: not in the loss
        return synth.zscore(x), y
