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
    original ones again (slices stay slices). The provenance keeps describing the source images as
    their headers do - ``source`` frames (order and positions), ``source_affine``, ``source_shape``
    unchanged - and ``header_transform`` gains the inverse correction, so
    :func:`dicomnode.volume.to_source_grid` puts results computed on the corrected volume exactly
    onto the source frames (regular, reversed or irregularly spaced stacks alike). Returns
    ``volume`` unchanged when no correction is due; raises ValueError when the correction does not
    map the grid axes onto each other (an oblique grid).
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
    geometry = dataclasses.replace(volume.geometry, actions=volume.geometry.actions + ("reoriented:anatomy",))
    back = _inverse(corr)  # true coordinates -> the coordinates the volume had (exact: signed permutation)
    header = back if volume.header_transform is None else np.asarray(volume.header_transform) @ back
    header.flags.writeable = False
    return dataclasses.replace(volume, array=np.ascontiguousarray(arr), affine=new, geometry=geometry,
                               header_transform=header)


def _inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 isometry (orthogonal linear part), exact for signed permutations."""
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -(m[:3, :3].T @ m[:3, 3])
    return out
