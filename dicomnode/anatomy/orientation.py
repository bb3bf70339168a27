"""Orientation correction: put a volume where its anatomy says it is (CTARR beyond the paper).

``apply_orientation(volume, registration)`` is re-exported by :mod:`dicomnode.anatomy.register`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from dicomnode.anatomy.atlas import LPS_TO_FRAME
from dicomnode.volume import Volume

if TYPE_CHECKING:
    from dicomnode.anatomy.register import Registration


def correction_matrix(registration: Registration) -> np.ndarray:
    """4x4 LPS -> LPS map taking where the header puts a voxel to where the anatomy really is."""
    m = LPS_TO_FRAME.T @ registration.matrix @ LPS_TO_FRAME
    c = np.asarray(registration.centre, np.float64)
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = c - m @ c
    return out


def apply_orientation(volume: Volume, registration: Registration) -> Volume:
    """``volume`` in the anatomically correct orientation (no interpolation).

    The affine is corrected so it states where the voxels really are (rotation about the anatomy
    grid centre), then the array axes are permuted/flipped so the axis directions match the
    original ones again (slices stay slices). ``source_affine`` moves with the correction, so
    ``to_source_grid`` still lands results on the original pixel grid; ``source`` frames follow
    the slice axis (reversed for a z flip). Returns ``volume`` unchanged when no correction is due.
    """
    if not registration.reoriented:
        return volume
    corr = correction_matrix(registration)
    aff = corr @ volume.affine
    target = volume.direction
    d = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    dots = target.T @ d  # [old axis j, new-affine axis i]
    perm = [int(np.argmax(np.abs(dots[j]))) for j in range(3)]
    if sorted(perm) != [0, 1, 2]:
        raise ValueError("orientation correction does not map the grid axes onto each other")
    arr = np.asarray(volume.array).transpose(perm)
    new = np.eye(4)
    new[:3, :3] = aff[:3, :3][:, perm]
    new[:3, 3] = aff[:3, 3]
    shape = arr.shape
    flips = [j for j in range(3) if dots[j, perm[j]] < 0]
    for j in flips:
        new[:3, 3] = new[:3, 3] + new[:3, j] * (shape[j] - 1)
        new[:3, j] = -new[:3, j]
    if flips:
        arr = np.flip(arr, axis=tuple(flips))
    source = volume.source
    if source and perm[0] == 0 and len(source) == shape[0]:
        source = tuple(reversed(source)) if 0 in flips else source
    elif source:
        source = ()
    geometry = dataclasses.replace(volume.geometry, actions=volume.geometry.actions + ("reoriented:anatomy",))
    src_aff = corr @ volume.source_affine if volume.source_affine is not None else None
    return dataclasses.replace(volume, array=np.ascontiguousarray(arr), affine=new, source=source, geometry=geometry,
                               source_affine=src_aff, source_shape=volume.source_shape)
