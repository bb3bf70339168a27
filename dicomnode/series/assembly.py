"""Series completion: when has a series arrived in full?

A series in state ``receiving`` becomes ``complete`` (and gets exactly one durable job) when
1. ``released-contiguous``: the association that last fed it was released and its slice positions
   form a contiguous stack along the slice normal (no gap) - checked immediately on release;
2. ``quiet-period``: no new instance for ``completion.quiet_period_s``;
3. ``max-wait``: ``completion.max_wait_s`` after its first instance, whatever else.

Only header fields stored at receipt are read (positions, orientation, frame counts), never files.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from dicomnode.config import Config
from dicomnode.ops.logs import series_key
from dicomnode.store.db import SqliteDatabase
from dicomnode.store.records import SeriesRecord

LOG = logging.getLogger("dicomnode.assembly")

Geometry = tuple[tuple[float, float, float] | None, str | None, int]


@dataclass(frozen=True, slots=True)
class Completed:
    """A series that was just completed."""

    series_instance_uid: str
    job_id: int
    reason: str
    latency_s: float  # from the release (or last instance) to completion


def _normal(orient: Sequence[float]) -> tuple[float, float, float] | None:
    r, c = orient[:3], orient[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    return None if norm < 1e-6 else (n[0] / norm, n[1] / norm, n[2] / norm)


def is_contiguous(geometry: Sequence[Geometry], tolerance_mm: float = 0.05) -> bool:
    """True if the instances form one gap-free stack along the slice normal.

    One multi-frame instance (enhanced CT/MR) counts as a stack; single-frame instances need a
    position and one shared orientation, distinct positions along the normal, and every step within
    ``max(tolerance_mm, 2 % of the median step)`` of the median step (a missing slice doubles one).
    """
    if not geometry:
        return False
    if len(geometry) == 1:
        return geometry[0][2] > 1 or geometry[0][0] is not None
    orients = {g[1] for g in geometry}
    if len(orients) != 1 or None in orients or any(g[0] is None for g in geometry):
        return False
    orient = tuple(float(v) for v in next(iter(orients)).split(","))  # type: ignore[union-attr]
    n = _normal(orient)
    if n is None:
        return False
    d = sorted(sum(p * q for p, q in zip(g[0], n)) for g in geometry)  # type: ignore[arg-type]
    steps = [b - a for a, b in zip(d, d[1:])]
    if min(steps) <= 1e-3:  # duplicate positions: several stacks (echoes, phases) - wait
        return False
    median = sorted(steps)[len(steps) // 2]
    tol = max(tolerance_mm, 0.02 * median)
    return all(abs(s - median) <= tol for s in steps)


def decide(s: SeriesRecord, now: float, cfg: Config, contiguous: Callable[[str], bool]) -> str | None:
    """The completion reason for series ``s`` at ``now``, or None while it should keep waiting."""
    c = cfg.completion
    if now - s.first_received_at >= c.max_wait_s:
        return "max-wait"
    if s.released_at is not None and s.released_at >= s.last_received_at and contiguous(s.series_instance_uid):
        return "released-contiguous"
    if now - s.last_received_at >= c.quiet_period_s:
        return "quiet-period"
    return None


class CompletionMonitor:
    """Watches receiving series and completes them. ``notify()`` wakes it at once (on release)."""

    def __init__(self, cfg: Config, db: SqliteDatabase, *, poll_s: float = 0.5,
                 on_complete: Callable[[Completed], None] | None = None) -> None:
        self.cfg = cfg
        self.db = db
        self.poll_s = poll_s
        self.on_complete = on_complete
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_contiguous: dict[tuple[str, int, float], bool] = {}

    def notify(self, series_uids: Sequence[str] = ()) -> None:
        """Check now (called by the SCP when an association is released)."""
        self._wake.set()

    def _contiguous(self, s: SeriesRecord) -> bool:
        key = (s.series_instance_uid, s.generation, s.last_received_at)
        if key not in self._not_contiguous:
            geo = self.db.series_geometry(s.series_instance_uid)
            self._not_contiguous = {k: v for k, v in self._not_contiguous.items() if k[0] != key[0]}
            self._not_contiguous[key] = is_contiguous(geo, self.cfg.geometry.spacing_tolerance_mm)
        return self._not_contiguous[key]

    def check_once(self, now: float | None = None) -> list[Completed]:
        """One pass over every receiving series; returns those completed now.

        Database errors propagate (the loop logs them and retries on the next pass).
        """
        now = time.time() if now is None else now
        done: list[Completed] = []
        for s in self.db.receiving_series():
            reason = decide(s, now, self.cfg, lambda _uid, s=s: self._contiguous(s))
            if reason is None:
                continue
            job_id = self.db.complete_series(s.series_instance_uid, s.generation, reason, when=now)
            if job_id is None:
                continue
            since = s.released_at if reason == "released-contiguous" and s.released_at else s.last_received_at
            c = Completed(s.series_instance_uid, job_id, reason, max(0.0, now - since))
            LOG.info("series %s complete (%s, %d instances, job %d, %.3f s)", series_key(s.series_instance_uid),
                     reason, s.instance_count, job_id, c.latency_s)
            done.append(c)
            if self.on_complete is not None:
                self.on_complete(c)
        return done

    def run(self) -> None:
        """Loop until :meth:`stop`: check on every wake-up and at least every ``poll_s``."""
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.check_once()
            except Exception:
                LOG.exception("completion check failed; retrying")
                self._stop.wait(1.0)

    def start(self) -> None:
        """Run in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="dicomnode-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
