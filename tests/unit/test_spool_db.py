"""Spool (atomic durable files) and the SQLite state store (instances, series, jobs)."""
from __future__ import annotations

import errno
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from dicomnode.errors import InstanceRejected
from dicomnode.store.db import SqliteDatabase, connect
from dicomnode.store.records import InstanceMeta
from dicomnode.store.spool import Spool, valid_uid

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"


def meta(sop: str, series: str = SERIES, z: float = 0.0, assoc: str = "a1", size: int = 10) -> InstanceMeta:
    return InstanceMeta(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
                        study_instance_uid=STUDY, transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
                        path=f"x/{series}/{sop}.dcm", size_bytes=size, instance_number=int(z),
                        position=(0.0, 0.0, z), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), association_id=assoc)


@pytest.mark.parametrize("uid,ok", [
    ("1.2.840.10008.1.2", True), ("1.2.3.04", True), ("1" * 64, True), ("1" * 65, False), ("", False),
    ("../../etc/passwd", False), ("1.2/3", False), ("1..2", False), ("1.2.", False), ("1.2\x00", False),
    ("１.２", False),
])
def test_valid_uid(uid: str, ok: bool) -> None:
    assert valid_uid(uid) is ok


def test_spool_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    rel = sp.relative_path(STUDY, SERIES, "1.2.3.4.5.6")
    assert rel.endswith(f"/{SERIES}/1.2.3.4.5.6.dcm") and ".." not in rel
    assert sp.write(rel, [b"abc", memoryview(b"def")]) == 6
    assert sp.abspath(rel).read_bytes() == b"abcdef"
    sp.write(rel, [b"xyz"])  # a re-sent instance replaces the file: stored once
    assert sp.abspath(rel).read_bytes() == b"xyz"
    assert list(sp.tmp_dir.iterdir()) == []
    assert sp.files() == [rel]


def test_spool_rejects_bad_uids(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    for bad in ("../../x", "1.2/../3", "a.b"):
        with pytest.raises(InstanceRejected) as ei:
            sp.relative_path(STUDY, bad, "1.2.3")
        assert ei.value.status == 0xC000


def test_quota_gives_a700_and_no_partial_file(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", quota_bytes=100, used_bytes=lambda: 90)
    with pytest.raises(InstanceRejected) as ei:
        sp.write(sp.relative_path(STUDY, SERIES, "1.2.3"), [b"x" * 20])
    assert ei.value.status == 0xA700
    assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*"))
    sp2 = Spool(tmp_path / "spool2", min_free_bytes=1 << 62)  # more reserve than any disk has
    with pytest.raises(InstanceRejected) as ei2:
        sp2.write(sp2.relative_path(STUDY, SERIES, "1.2.3"), [b"x"])
    assert ei2.value.status == 0xA700


def test_disk_full_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = Spool(tmp_path / "spool")
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(InstanceRejected) as ei:
        sp.write(sp.relative_path(STUDY, SERIES, "1.2.3"), [b"a" * 10, b"b" * 10])
    assert ei.value.status == 0xA700
    assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*"))


def test_crash_leftover_temp_files_are_cleaned(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    (sp.tmp_dir / "123-1-1.part").write_bytes(b"half")
    assert sp.clean_temp() == 1 and list(sp.tmp_dir.iterdir()) == []


def test_instances_series_and_duplicates(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    assert db.add_instance(meta("1.1", z=0)) is True
    assert db.add_instance(meta("1.2", z=1)) is True
    assert db.add_instance(meta("1.2", z=1)) is False  # re-sent: stored once
    s = db.get_series(SERIES)
    assert s is not None and s.instance_count == 2 and s.state == "receiving" and s.bytes == 20
    got = db.series_instances(SERIES)
    assert [m.sop_instance_uid for m in got] == ["1.1", "1.2"]
    assert got[1].position == (0.0, 0.0, 1.0) and got[1].orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert db.association_released("a1") == [SERIES]
    assert db.get_series(SERIES).released_at is not None  # type: ignore[union-attr]
    assert db.total_bytes() == 20


def test_one_job_per_completion_even_when_racing(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    db.add_instance(meta("1.1"))
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda: results.append(db.complete_series(SERIES, 1, "quiet-period")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([r for r in results if r is not None]) == 1
    assert len(db.list_jobs()) == 1 and db.get_series(SERIES).state == "complete"  # type: ignore[union-attr]


def test_claim_is_atomic_across_threads(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    for i in range(20):
        series = f"1.2.3.{i}"
        db.add_instance(meta(f"9.{i}", series=series))
        assert db.complete_series(series, 1, "quiet-period") is not None
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := db.claim_job(name)) is not None:
            with lock:
                claimed.append(job.job_id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.job_id for j in db.list_jobs())  # each job exactly once
    assert all(s.state == "processing" for s in db.list_series())


def test_job_lifecycle_and_crash_requeue(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = SqliteDatabase(path)
    db.add_instance(meta("1.1"))
    job_id = db.complete_series(SERIES, 1, "released-contiguous")
    job = db.claim_job("w1")
    assert job is not None and job.job_id == job_id and job.attempts == 1 and job.state == "processing"
    assert db.claim_job("w2") is None
    db.close()
    db = SqliteDatabase(path)  # "restart" with the job left processing
    assert db.requeue_stale_jobs() == 1
    assert db.get_series(SERIES).state == "complete"  # type: ignore[union-attr]
    job = db.claim_job("w1")
    assert job is not None and job.attempts == 2
    db.finish_job(job.job_id, "queued", "triton down", retry_at=1e18)  # transient: retry much later
    assert db.claim_job("w1") is None
    assert db.get_series(SERIES).state == "complete"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        db.finish_job(job.job_id, "done")  # not processing any more
    job = db.claim_job("w1", now=2e18)
    assert job is not None
    db.finish_job(job.job_id, "quarantined", "geometry:gap", '{"convert_s": 0.1}')
    assert db.get_series(SERIES).state == "quarantined"  # type: ignore[union-attr]
    j = db.get_job(job.job_id)
    assert j is not None and j.reason == "geometry:gap" and j.timings_json == '{"convert_s": 0.1}'
    with pytest.raises(ValueError):
        db.finish_job(job.job_id, "bogus")


def test_new_instance_reopens_a_finished_series(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    db.add_instance(meta("1.1"))
    first = db.complete_series(SERIES, 1, "quiet-period")
    db.add_instance(meta("1.2", z=1, assoc="a2"))  # late instance before the job ran
    s = db.get_series(SERIES)
    assert s.state == "receiving" and s.generation == 2 and s.instance_count == 2  # type: ignore[union-attr]
    assert db.get_job(first).state == "superseded"  # type: ignore[arg-type, union-attr]
    assert db.complete_series(SERIES, 1, "quiet-period") is None  # stale generation
    assert db.complete_series(SERIES, 2, "quiet-period") is not None


def test_connect_sets_wal_and_busy_timeout(tmp_path: Path) -> None:
    conn = connect(tmp_path / "o.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    conn.close()
    with pytest.raises(sqlite3.Error):
        connect(tmp_path / "o.db", synchronous="NOPE; DROP TABLE x")


def test_spool_files_without_rows_are_reindexed(tmp_path: Path) -> None:
    """After a power loss the last SQLite commits may be gone; the fsync'd files are re-indexed."""
    from dicomnode.net.scp import index_orphans
    from tests.peers import make_ct_series

    info = make_ct_series(tmp_path / "ct", n=3, rows=8, cols=8)
    sp = Spool(tmp_path / "spool")
    db = SqliteDatabase(tmp_path / "s.db")
    for f, sop in zip(info.files, info.sop_uids):
        sp.write(sp.relative_path(info.study_uid, info.series_uid, sop), [f.read_bytes()])
    bogus = sp.relative_path(info.study_uid, info.series_uid, "1.2.3.999")
    sp.write(bogus, [b"not dicom at all"])
    assert index_orphans(db, sp) == 3
    s = db.get_series(info.series_uid)
    assert s is not None and s.instance_count == 3 and s.state == "receiving"
    assert sorted(m.sop_instance_uid for m in db.series_instances(info.series_uid)) == sorted(info.sop_uids)
    assert not sp.abspath(bogus).exists() and (sp.root / ".orphans" / "1.2.3.999.dcm").exists()
    assert index_orphans(db, sp) == 0  # idempotent


def test_write_recreates_a_series_folder_removed_meanwhile(tmp_path: Path) -> None:
    import shutil

    sp = Spool(tmp_path / "spool")
    rel = sp.relative_path(STUDY, SERIES, "1.2.3.1")
    sp.write(rel, [b"a"])
    shutil.rmtree(sp.abspath(rel).parent.parent)  # retention removed the study folder
    sp.write(rel, [b"b"])
    assert sp.abspath(rel).read_bytes() == b"b"
