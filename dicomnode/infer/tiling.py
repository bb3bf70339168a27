"""Tiling: the model's canonical grid, normalisation, sliding windows with Gaussian weights, stitching.

Pure numpy/scipy: nothing here talks to a server. ``dicomnode.infer.client`` plugs its request
function into :func:`predict_volume`.

The canonical axial grid every model sees (``CANONICAL_DIRECTION``): array axes (Z, Y, X) =
(slice, row, column) pointing to the patient's feet (-S), back (+P) and left (+L) in LPS, i.e.
axial slices ordered head to feet, each displayed radiologically (patient's right on the image's
left, anterior at the top). The same convention as CTARR's atlas frame (z grows towards the feet).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dicomnode.infer.models import ModelManifest
from dicomnode.volume import Volume

# columns: LPS unit vectors of the (slice, row, column) axes
CANONICAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])

PredictFn = Callable[[np.ndarray], np.ndarray]  # [N, C, z, y, x] float32 -> [N, K, z, y, x] float32


def canonical_grid(volume: Volume, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(affine, shape) of the canonical axial grid at ``spacing`` covering ``volume``'s extent.

    The grid's voxel edges enclose the volume's voxel edges (its bounding box in the canonical
    axes); a volume already axial at ``spacing`` maps voxel for voxel (a permutation/flip).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, volume.shape[0] - 0.5)
                        for b in (-0.5, volume.shape[1] - 0.5) for c in (-0.5, volume.shape[2] - 0.5)])
    pts = volume.index_to_lps(corners) @ CANONICAL_DIRECTION  # canonical coordinates (mm)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    shape = tuple(max(1, int(math.ceil((h - l) / s - 1e-3))) for l, h, s in zip(lo, hi, sp))
    centre_lo = (lo + hi) / 2 - (np.asarray(shape) - 1) * sp / 2  # centre the grid on the extent
    aff = np.eye(4)
    aff[:3, :3] = CANONICAL_DIRECTION * sp
    aff[:3, 3] = CANONICAL_DIRECTION @ centre_lo
    return aff, shape  # type: ignore[return-value]


def exact_regrid(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                 dst_shape: tuple[int, int, int], fill: float) -> np.ndarray | None:
    """``array`` moved onto the grid (dst_affine, dst_shape) without interpolation, or None.

    Works when the destination voxel centres coincide with source voxel centres, i.e. when the
    grids differ by axis permutations, flips and whole-voxel shifts (an axial scan already at the
    model spacing, or labels mapped back onto it). Points outside the source get ``fill``.
    """
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    rot, off = m[:3, :3], m[:3, 3]
    r = np.rint(rot)
    if not np.allclose(rot, r, atol=1e-4) or not np.allclose(off, np.rint(off), atol=1e-3):
        return None
    if sorted(np.abs(r).sum(axis=0).tolist()) != [1, 1, 1] or sorted(np.abs(r).sum(axis=1).tolist()) != [1, 1, 1]:
        return None
    off = np.rint(off).astype(int)
    src_axis = [int(np.flatnonzero(r[:, a])[0]) for a in range(3)]  # dst axis a runs along src axis
    sign = [int(r[src_axis[a], a]) for a in range(3)]
    out = np.full(dst_shape, fill, dtype=array.dtype)
    view = np.transpose(array, src_axis)  # axes now in dst order, still source direction/offset
    dst_sl, src_sl = [], []
    for a in range(3):
        n_src, n_dst = array.shape[src_axis[a]], dst_shape[a]
        # source index of dst index j: off[src_axis[a]] + sign[a] * j
        o = off[src_axis[a]]
        j = np.arange(n_dst)
        idx = o + sign[a] * j
        ok = (idx >= 0) & (idx < n_src)
        if not ok.any():
            return out
        j0, j1 = int(j[ok][0]), int(j[ok][-1]) + 1
        i0, i1 = int(idx[ok][0]), int(idx[ok][-1])
        dst_sl.append(slice(j0, j1))
        src_sl.append(slice(i0, i1 + 1) if sign[a] > 0 else slice(i0, (i1 - 1) if i1 > 0 else None, -1))
    out[tuple(dst_sl)] = view[tuple(src_sl)]
    return out


def antialias_factors(volume: Volume, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Integer block sizes per source axis to average before resampling to ``spacing``.

    ``floor(factor)`` where the canonical axis most aligned with the source axis is ``factor`` times
    coarser; 1 (no averaging) below 2x.
    """
    coarse = np.asarray(spacing, dtype=np.float64)
    out = []
    for i, sp in enumerate(volume.spacing):
        axis = int(np.argmax(np.abs(volume.direction[:, i] @ CANONICAL_DIRECTION)))
        out.append(max(1, int(math.floor(coarse[axis] / sp + 1e-6))))
    return tuple(out)  # type: ignore[return-value]


def _sum_blocks(s: np.ndarray, ax: int, f: int) -> np.ndarray:
    """int32 sums of blocks of ``f`` along axis ``ax``; a partial last block counts its last plane again."""
    if f == 1:
        return s
    v = np.moveaxis(s, ax, 0)
    n = v.shape[0]
    m = n // f * f
    red = v[0:m:f].astype(np.int32)
    for j in range(1, f):  # strided adds, vectorised over whole planes (also along the column axis)
        red += v[j:m:f]
    if m < n:
        tail = v[m:].sum(axis=0, dtype=np.int32) + np.int32(f - (n - m)) * v[-1].astype(np.int32)
        red = np.concatenate([red, tail[None]], axis=0)
    return np.moveaxis(red, 0, ax)


def _block_sum_int(array: np.ndarray, k: tuple[int, int, int]) -> np.ndarray:
    """Exact int32 sums of k0 x k1 x k2 blocks of an integer array, edges padded by replication.

    One block of slices at a time (its planes summed, then rows and columns), so the work stays in
    cache and nothing volume-sized is allocated but the output; the replicated edge of a partial
    block is added as ``missing * last`` instead of padding.
    """
    f0 = k[0]
    n0 = array.shape[0]
    first = _sum_blocks(_sum_blocks(array[:1].sum(axis=0, dtype=np.int32), 0, k[1]), 1, k[2])
    out = np.empty((-(-n0 // f0),) + first.shape, dtype=np.int32)
    for b, z in enumerate(range(0, n0, f0)):
        chunk = array[z:z + f0]
        plane = chunk.sum(axis=0, dtype=np.int32)
        if chunk.shape[0] < f0:
            plane += np.int32(f0 - chunk.shape[0]) * chunk[-1].astype(np.int32)
        out[b] = _sum_blocks(_sum_blocks(plane, 0, k[1]), 1, k[2])
    return out


def block_mean(array: np.ndarray, affine: np.ndarray, k: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 means of k0 x k1 x k2 blocks, the affine of the block grid); edges padded by replication.

    Integer arrays (CT) whose block sums stay below 2**24 are summed exactly in int32 without a
    padded copy: float32 sums of such values are exact in any order, so the result is bit for bit
    numpy's ``mean(dtype=float32)`` of the padded array (the general path), ~3x faster.
    """
    count = int(k[0] * k[1] * k[2])
    limit = max(abs(int(np.iinfo(array.dtype).min)), int(np.iinfo(array.dtype).max)) if array.dtype.kind in "iu" else 0
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2 and count * limit < 2 ** 24:
        out = np.ascontiguousarray(_block_sum_int(array, k), dtype=np.float32)
        np.true_divide(out, np.intp(count), out=out, casting="unsafe")  # as numpy's mean: float64 divide, rounded
    else:
        pad = [(0, (-n) % f) for n, f in zip(array.shape, k)]
        a = np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array
        n = [s // f for s, f in zip(a.shape, k)]
        out = a.reshape(n[0], k[0], n[1], k[1], n[2], k[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    aff = np.array(affine, dtype=np.float64)
    new = aff.copy()
    new[:3, :3] = aff[:3, :3] * np.asarray(k, dtype=np.float64)
    new[:3, 3] = aff[:3, :3] @ ((np.asarray(k, dtype=np.float64) - 1) / 2) + aff[:3, 3]
    return out, new


def to_model_grid(volume: Volume, manifest: ModelManifest) -> Volume:
    """``volume`` on the model's canonical grid: :func:`to_spacing_grid` at ``manifest.spacing_mm``."""
    return to_spacing_grid(volume, manifest.spacing_mm)


def to_spacing_grid(volume: Volume, spacing: tuple[float, float, float]) -> Volume:
    """``volume`` linearly resampled onto the canonical grid at ``spacing`` mm (float32).

    Each source voxel covers +-0.5 voxel around its centre: grid points within that extent get
    (edge-clamped) linear interpolation, so edge slices survive rounding; points outside it (the
    corners of an oblique volume's bounding box) get the volume's minimum (air for CT). Axes
    downsampled 2x or more are block-averaged first (:func:`antialias_factors`), so a 0.7 mm scan
    at 3 mm has about the noise of a 3 mm reconstruction rather than single-voxel samples.
    """
    from scipy import ndimage

    aff, shape = canonical_grid(volume, spacing)
    fill = float(np.min(volume.array)) if volume.array.size else 0.0
    fast = exact_regrid(np.asarray(volume.array), volume.affine, aff, shape, fill)
    if fast is not None:
        return dataclasses.replace(volume, array=fast.astype(np.float32, copy=False), affine=aff)
    src = np.ascontiguousarray(volume.array)  # no float copy of a large int16 CT: output is float32
    src_affine = volume.affine
    k = antialias_factors(volume, spacing)
    if max(k) > 1:
        src, src_affine = block_mean(src, src_affine, k)
    m = np.linalg.inv(src_affine) @ aff
    out = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=1,
                                   mode="nearest", prefilter=False, output=np.float32)
    inside = ndimage.affine_transform(np.ones(src.shape, np.uint8), m[:3, :3], offset=m[:3, 3],
                                      output_shape=shape, order=0, mode="grid-constant", cval=0, prefilter=False)
    out[inside == 0] = fill
    return dataclasses.replace(volume, array=out, affine=aff)


def normalise(array: np.ndarray, manifest: ModelManifest, modality: str) -> np.ndarray:
    """float32 [C, Z, Y, X] network input: per-window clip + scale to [0, 1], or a volume z-score."""
    a = np.asarray(array, dtype=np.float32)
    if manifest.normalisation_for(modality) == "zscore":
        std = float(a.std())
        return ((a - float(a.mean())) / (std if std > 1e-6 else 1.0))[None].astype(np.float32)
    out = np.empty((len(manifest.windows), *a.shape), dtype=np.float32)
    for c, (lo, hi) in enumerate(manifest.windows):
        np.clip((a - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0, out=out[c])
    return out


def gaussian_weight(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net style importance map: a Gaussian with sigma = patch/8, max 1, minimum > 0."""
    grids = np.meshgrid(*[np.arange(p, dtype=np.float32) - (p - 1) / 2 for p in patch], indexing="ij")
    w = np.ones(patch, dtype=np.float32)
    for g, p in zip(grids, patch):
        w *= np.exp(-0.5 * (g / max(p * sigma_scale, 1e-3)) ** 2)
    w /= w.max()
    return np.maximum(w, max(float(w[w > 0].min()), 1e-4)).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` along an axis of ``size`` (>= patch), step patch*(1-overlap)."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = int(math.ceil((size - patch) / step)) + 1
    return sorted({int(round(i * (size - patch) / (n - 1))) for i in range(n)})


def pad_shape(shape: tuple[int, ...], multiple: int, minimum: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """``shape`` grown to multiples of ``multiple`` (and at least ``minimum``)."""
    out = [int(math.ceil(s / multiple) * multiple) for s in shape]
    if minimum is not None:
        out = [max(o, int(math.ceil(m / multiple) * multiple)) for o, m in zip(out, minimum)]
    return tuple(out)


def pad_channels(x: np.ndarray, padded: tuple[int, ...]) -> np.ndarray:
    """[C, Z, Y, X] grown at the far end of each axis to ``padded``, each channel with its own
    minimum (the value of air in every window); ``x`` itself when nothing is to be added."""
    pad = [(0, p - s) for p, s in zip(padded, x.shape[1:])]
    if not any(p[1] for p in pad):
        return x
    return np.stack([np.pad(ch, pad, constant_values=ch.min()) for ch in x])


@dataclass(frozen=True, slots=True)
class TilePlan:
    """How a volume goes to the server: ``whole`` (one request) or ``windows`` starts per axis."""

    padded: tuple[int, int, int]
    patch: tuple[int, int, int]
    starts: tuple[tuple[int, int, int], ...]

    @property
    def whole(self) -> bool:
        """True when one request carries the whole (padded) volume."""
        return len(self.starts) == 1 and self.patch == self.padded


def plan_tiles(shape: tuple[int, int, int], manifest: ModelManifest) -> TilePlan:
    """Whole volume when it fits in the manifest's patch (after padding), else overlapping windows."""
    padded = pad_shape(shape, manifest.pad_multiple)
    patch = tuple(min(p, s) for p, s in zip(pad_shape(manifest.patch, manifest.pad_multiple), padded))
    padded = tuple(max(p, q) for p, q in zip(padded, patch))
    axes = [window_starts(s, p, manifest.overlap) for s, p in zip(padded, patch)]
    starts = tuple((a, b, c) for a in axes[0] for b in axes[1] for c in axes[2])
    return TilePlan(padded=padded, patch=patch, starts=starts)  # type: ignore[arg-type]


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def predict_volume(
    x: np.ndarray, manifest: ModelManifest, predict: PredictFn, *, batch: int = 1, want_probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``predict`` over ``x`` [C, Z, Y, X]; returns (argmax labels uint8/uint16 [Z, Y, X], probabilities).

    The volume is padded (with each channel's minimum) to the plan; a whole-volume plan is one
    request, otherwise windows go ``batch`` per request and are stitched with Gaussian weights
    (probabilities are averaged, logits are softmaxed first). Probabilities are returned when asked
    for (or when stitching computed them anyway). Raises ValueError on a wrong output shape.
    """
    _, *shape = x.shape
    plan = plan_tiles(tuple(shape), manifest)  # type: ignore[arg-type]
    xp = pad_channels(x, plan.padded)
    k = manifest.n_classes
    dtype = np.uint8 if k <= 255 else np.uint16
    crop = (slice(None), *(slice(0, s) for s in shape))
    if plan.whole:
        y = predict(np.ascontiguousarray(xp[None], dtype=np.float32))
        if y.shape != (1, k, *plan.padded):
            raise ValueError(f"model output {y.shape}, expected {(1, k, *plan.padded)}")
        out = y[0][crop]
        labels = np.argmax(out, axis=0).astype(dtype)
        probs = None
        if want_probabilities:
            probs = out if manifest.output_kind == "probabilities" else _softmax(out, 0)
        return labels, (probs.astype(np.float32) if probs is not None else None)
    weight = gaussian_weight(plan.patch)
    acc = np.zeros((k, *plan.padded), dtype=np.float32)
    norm = np.zeros(plan.padded, dtype=np.float32)
    for i in range(0, len(plan.starts), max(1, batch)):
        group = plan.starts[i:i + max(1, batch)]
        sl = [tuple(slice(s, s + p) for s, p in zip(st, plan.patch)) for st in group]
        xb = np.ascontiguousarray(np.stack([xp[(slice(None), *s)] for s in sl]), dtype=np.float32)
        y = predict(xb)
        if y.shape != (len(group), k, *plan.patch):
            raise ValueError(f"model output {y.shape}, expected {(len(group), k, *plan.patch)}")
        if manifest.output_kind == "logits":
            y = _softmax(y, 1)
        for j, s in enumerate(sl):
            acc[(slice(None), *s)] += y[j] * weight
            norm[s] += weight
    probs = (acc / norm)[crop]
    return np.argmax(probs, axis=0).astype(dtype), probs


def _edit_per_label(labels: np.ndarray, values: tuple[int, ...],
                    edit: Callable[[np.ndarray, np.ndarray], np.ndarray | None], to: int | None) -> np.ndarray:
    """For each of ``values`` present in ``labels``: ``edit(mask, current)`` names the voxels to
    set (to ``to``, or to the value itself when ``to`` is None), or returns None for none.
    ``labels`` is copied only when something changes, so an unchanged map is returned as it is."""
    out = labels
    for v in values:
        mask = labels == v
        if not mask.any():
            continue
        where = edit(mask, out)
        if where is None or not where.any():
            continue
        if out is labels:
            out = labels.copy()
        out[where] = v if to is None else to
    return out


def keep_largest_components(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """``labels`` with each of ``values`` kept to its largest 26-connected component (rest -> 0).

    For organs that are one connected piece (the liver): specks elsewhere in a crop are errors.
    Works on a copy only when something changes; never raises for empty labels.
    """
    from scipy import ndimage as ndi

    def smaller_pieces(mask: np.ndarray, _: np.ndarray) -> np.ndarray | None:
        comp, n = ndi.label(mask, np.ones((3, 3, 3), bool))
        if n <= 1:
            return None
        return mask & (comp != 1 + int(np.argmax(np.bincount(comp.ravel())[1:])))

    return _edit_per_label(labels, values, smaller_pieces, 0)


def fill_holes_per_slice(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """``labels`` with the background holes of each of ``values`` filled, slice by slice (axis 0).

    On the model grid axis 0 runs along the slices (head -> feet), so this fills what an axial
    slice shows enclosed by the label: for the body, the lungs, airways and bowel gas. Only
    background voxels change; a 3D fill would also close the airway where it leaves the body.
    Works on a copy only when something changes; never raises for empty labels.
    """
    from scipy import ndimage as ndi

    def holes(mask: np.ndarray, current: np.ndarray) -> np.ndarray:
        filled = np.stack([ndi.binary_fill_holes(sl) if sl.any() else sl for sl in mask])
        return filled & (current == 0)

    return _edit_per_label(labels, values, holes, None)


def postprocess(labels: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    """The manifest's post-processing of an argmax label map on the model grid, in this order:
    ``largest_component`` (:func:`keep_largest_components`), then ``fill_holes``
    (:func:`fill_holes_per_slice`). The one place the node, the evaluation and the benchmarks take
    it from. Never raises for label maps of any content."""
    return fill_holes_per_slice(keep_largest_components(labels, manifest.largest_component), manifest.fill_holes)
