"""Series completion: contiguity along the slice normal, quiet period, max wait, one job per series."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from dicomnode.config import parse_config
from dicomnode.series.assembly import CompletionMonitor, decide, is_contiguous
from dicomnode.store.db import SqliteDatabase
from dicomnode.store.records import InstanceMeta

AXIAL = "1.0,0.0,0.0,0.0,1.0,0.0"


def stack(n: int, step: float = 2.5, orient: str = AXIAL, skip: tuple[int, ...] = ()) -> list:
    o = [float(v) for v in orient.split(",")]
    nrm = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    return [((10 + k * step * nrm[0], -5 + k * step * nrm[1], 100 + k * step * nrm[2]), orient, 1)
            for k in range(n) if k not in skip]


def test_contiguous_stacks() -> None:
    assert is_contiguous(stack(30))
    shuffled = stack(30)
    random.Random(1).shuffle(shuffled)
    assert is_contiguous(shuffled)  # arrival order does not matter
    c, s = math.cos(0.3), math.sin(0.3)
    assert is_contiguous(stack(20, 1.25, f"1.0,0.0,0.0,0.0,{c},{s}"))  # oblique (tilted) stack
    assert is_contiguous(stack(1))
    assert is_contiguous([(None, None, 120)])  # one enhanced multi-frame instance


def test_incomplete_or_ambiguous_stacks_wait() -> None:
    assert not is_contiguous(stack(30, skip=(14,)))  # a gap
    assert not is_contiguous(stack(10) + stack(10))  # duplicate positions (two echoes/phases)
    assert not is_contiguous(stack(10) + [(None, None, 1)])  # an instance without a position
    mixed = stack(5) + stack(5, orient="1.0,0.0,0.0,0.0,0.0,-1.0")
    assert not is_contiguous(mixed)  # two orientations
    assert not is_contiguous([])


def _cfg(quiet: float = 10.0, max_wait: float = 600.0):
    return parse_config({"completion": {"quiet_period_s": quiet, "max_wait_s": max_wait}})


def _meta(i: int, series: str, z: float, assoc: str, t: float) -> InstanceMeta:
    return InstanceMeta(sop_instance_uid=f"{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        series_instance_uid=series, study_instance_uid="1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                        modality="CT", path=f"p/{i}", size_bytes=1, instance_number=i, position=(0.0, 0.0, z),
                        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), association_id=assoc, received_at=t)


def test_monitor_completes_released_contiguous_at_once_and_gaps_after_quiet(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    mon = CompletionMonitor(_cfg(quiet=10), db)
    t0 = 1000.0
    for i in range(20):
        db.add_instance(_meta(i, "1.1", i * 2.0, "A", t0 + i * 0.01))
    for i in range(20):
        if i != 7:
            db.add_instance(_meta(i, "1.2", i * 2.0, "B", t0 + i * 0.01))
    assert mon.check_once(now=t0 + 0.5) == []  # nothing released, quiet period not over
    db.association_released("A", when=t0 + 0.3)
    db.association_released("B", when=t0 + 0.3)
    done = mon.check_once(now=t0 + 0.35)
    assert [(c.series_instance_uid, c.reason) for c in done] == [("1.1", "released-contiguous")]
    assert done[0].latency_s == pytest.approx(0.05)
    assert mon.check_once(now=t0 + 5) == []  # the gapped series waits
    done = mon.check_once(now=t0 + 10.5)
    assert [(c.series_instance_uid, c.reason) for c in done] == [("1.2", "quiet-period")]
    assert mon.check_once(now=t0 + 100) == []  # exactly one job each
    assert sorted(j.series_instance_uid for j in db.list_jobs()) == ["1.1", "1.2"]


def test_max_wait_bounds_a_trickling_series(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    cfg = _cfg(quiet=10, max_wait=30)
    mon = CompletionMonitor(cfg, db)
    t0 = 1000.0
    for i in range(10):  # one instance every 5 s: never quiet for 10 s
        db.add_instance(_meta(i, "1.3", i * 2.0 + (5 if i == 3 else 0), "C", t0 + 5 * i))
        done = mon.check_once(now=t0 + 5 * i + 1)
        if 5 * i + 1 >= 30:
            assert [c.reason for c in done] == ["max-wait"]
            break
        assert done == []
    else:
        pytest.fail("max_wait_s did not complete the series")


def test_release_of_an_older_association_does_not_complete(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    for i in range(5):
        db.add_instance(_meta(i, "1.4", i * 2.0, "A", 1000.0 + i))
    db.add_instance(_meta(5, "1.4", 10.0, "B", 1010.0))  # a second sender still at it
    assert db.association_released("A", when=1011.0) == []  # B fed it last
    s = db.get_series("1.4")
    assert s is not None and decide(s, 1011.5, _cfg(), lambda _u: True) is None
