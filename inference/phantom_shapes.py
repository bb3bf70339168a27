"""Shape primitives of the procedural phantom (:mod:`inference.phantom`): a label canvas in body
millimetres and predicates for ellipsoids, sheared shapes and capsules.

Body frame: x towards the patient's left, y posterior, z from the vertex towards the feet (mm);
a predicate ``fn(z, y, x)`` returns a boolean mask, a box is (z0, z1, y0, y1, x0, x1) in mm.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

Mask = np.ndarray
Fn = Callable[[np.ndarray, np.ndarray, np.ndarray], Mask]


def interp(z: np.ndarray, zs: list[float], vs: list[float]) -> np.ndarray:
    """Piecewise-linear profile ``vs`` over heights ``zs`` at ``z``."""
    return np.interp(z, zs, vs)


class Canvas:
    """Label grid + body-frame <-> index transform (yaw about z, xy shift)."""

    def __init__(self, shape: tuple[int, int, int], sp: float, z0: float, half: float,
                 yaw: float, shift: tuple[float, float]) -> None:
        self.lab = np.zeros(shape, np.int16)
        self.sp, self.z0, self.half = sp, z0, half
        self.c, self.s = math.cos(yaw), math.sin(yaw)
        self.tx, self.ty = shift

    def _world_xy(self, xb: np.ndarray, yb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.c * xb - self.s * yb + self.tx, self.s * xb + self.c * yb + self.ty

    def paint(self, box: tuple[float, float, float, float, float, float], fn: Fn, value: int,
              only: tuple[int, ...] | None = None) -> None:
        """Set ``value`` where ``fn(z, y, x)`` (body mm) is true inside body box (z0,z1,y0,y1,x0,x1)."""
        z0, z1, y0, y1, x0, x1 = box
        nz, ny, nx = self.lab.shape
        k0 = max(int(math.floor((z0 - self.z0) / self.sp)), 0)
        k1 = min(int(math.ceil((z1 - self.z0) / self.sp)) + 1, nz)
        cx = np.array([x0, x1, x0, x1]); cy = np.array([y0, y0, y1, y1])
        wx, wy = self._world_xy(cx, cy)
        i0 = max(int(math.floor((wx.min() + self.half) / self.sp)), 0)
        i1 = min(int(math.ceil((wx.max() + self.half) / self.sp)) + 1, nx)
        j0 = max(int(math.floor((wy.min() + self.half) / self.sp)), 0)
        j1 = min(int(math.ceil((wy.max() + self.half) / self.sp)) + 1, ny)
        if k0 >= k1 or i0 >= i1 or j0 >= j1:
            return
        z = (self.z0 + self.sp * np.arange(k0, k1))[:, None, None]
        X = (-self.half + self.sp * (np.arange(i0, i1) + 0.5))[None, None, :] - self.tx
        Y = (-self.half + self.sp * (np.arange(j0, j1) + 0.5))[None, :, None] - self.ty
        xb = self.c * X + self.s * Y
        yb = -self.s * X + self.c * Y
        m = np.broadcast_to(fn(z, yb, xb), (k1 - k0, j1 - j0, i1 - i0))
        sub = self.lab[k0:k1, j0:j1, i0:i1]
        if only is not None:
            m = m & np.isin(sub, only)
        sub[m] = value


def ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float], rot: float = 0.0) -> tuple[Fn, tuple]:
    """Ellipsoid centre (x, y, z), semi-axes (x, y, z), rotated by ``rot`` rad about z."""
    cx, cy, cz = c; rx, ry, rz = r
    co, si = math.cos(rot), math.sin(rot)

    def fn(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> Mask:
        dx, dy = x - cx, y - cy
        u, v = co * dx + si * dy, -si * dx + co * dy
        return (u / rx) ** 2 + (v / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
    m = max(rx, ry)
    return fn, (cz - rz, cz + rz, cy - m, cy + m, cx - m, cx + m)


def sheared(f: Fn, box: tuple, z0: float, slope: float) -> tuple[Fn, tuple]:
    """Shape ``f`` (with its box) sheared in x: at height z it is moved by ``slope * (z - z0)`` mm."""
    w = abs(slope) * (box[1] - box[0]) / 2
    return (lambda z, y, x: f(z, y, x - slope * (z - z0))), (box[0], box[1], box[2], box[3], box[4] - w, box[5] + w)


def tube(p0: tuple[float, float, float], p1: tuple[float, float, float], rad: float) -> tuple[Fn, tuple]:
    """Capsule between points (x, y, z) with radius ``rad``."""
    a, b = np.array(p0, float), np.array(p1, float)
    d = b - a; L2 = float(d @ d) or 1.0

    def fn(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> Mask:
        t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / L2, 0, 1)
        return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= rad * rad
    lo, hi = np.minimum(a, b) - rad, np.maximum(a, b) + rad
    return fn, (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])
