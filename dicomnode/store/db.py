"""Durable node state behind a small interface: instances, series, jobs.

:class:`Database` is the interface the rest of the node uses; :class:`SqliteDatabase` is the
embedded implementation (one file under ``data_dir``, WAL mode). The node opens it with
``synchronous=NORMAL``: a commit survives kill -9 of the process (it is in the OS page cache);
after a power loss the last commits may be lost, and :func:`dicomnode.net.scp.index_orphans`
re-derives instance rows at start from the fsync'd spool files, which are the durable record (a
lost job or job state is re-created by completion; results use deterministic UIDs, so
re-processing replaces). ``connect()`` defaults to FULL for stores that need it. A PostgreSQL implementation would take jobs
with ``SELECT ... FOR UPDATE SKIP LOCKED`` where this one uses ``BEGIN IMMEDIATE``.

Other stores (``store/outbox.py``) keep their own tables in the same file: open it with
:func:`connect` so every connection uses the same pragmas.

Thread safety: one connection per thread; write transactions are serialised by a lock.
Errors: ``sqlite3.Error`` propagates (the SCP turns it into 0xA700, nothing is acknowledged).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol
from contextlib import contextmanager

from dicomnode.store.records import (
    FINAL_JOB_STATES,
    InstanceMeta,
    Job,
    SeriesRecord,
)

if TYPE_CHECKING:
    from dicomnode.config import Config

__all__ = ["Database", "SqliteDatabase", "InstanceMeta", "SeriesRecord", "Job", "connect", "sqlite_path", "open_database"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_instance_uid TEXT PRIMARY KEY,
  series_instance_uid TEXT NOT NULL,
  study_instance_uid TEXT NOT NULL,
  sop_class_uid TEXT NOT NULL,
  transfer_syntax_uid TEXT NOT NULL,
  modality TEXT NOT NULL,
  path TEXT NOT NULL,
  size_bytes INTEGER NOT NULL,
  instance_number INTEGER,
  px REAL, py REAL, pz REAL,
  orientation TEXT,
  frames INTEGER NOT NULL DEFAULT 1,
  frame_of_reference_uid TEXT NOT NULL DEFAULT '',
  calling_ae TEXT NOT NULL DEFAULT '',
  association_id TEXT NOT NULL DEFAULT '',
  received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
  series_instance_uid TEXT PRIMARY KEY,
  study_instance_uid TEXT NOT NULL,
  modality TEXT NOT NULL,
  state TEXT NOT NULL,
  instance_count INTEGER NOT NULL DEFAULT 0,
  bytes INTEGER NOT NULL DEFAULT 0,
  first_received_at REAL NOT NULL,
  last_received_at REAL NOT NULL,
  released_at REAL,
  completed_at REAL,
  completion_reason TEXT NOT NULL DEFAULT '',
  generation INTEGER NOT NULL DEFAULT 1,
  last_association_id TEXT NOT NULL DEFAULT '',
  calling_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE TABLE IF NOT EXISTS jobs (
  job_id INTEGER PRIMARY KEY AUTOINCREMENT,
  series_instance_uid TEXT NOT NULL,
  study_instance_uid TEXT NOT NULL,
  generation INTEGER NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL,
  claimed_at REAL,
  finished_at REAL,
  worker TEXT NOT NULL DEFAULT '',
  reason TEXT NOT NULL DEFAULT '',
  timings_json TEXT NOT NULL DEFAULT '{}',
  not_before REAL NOT NULL DEFAULT 0,
  UNIQUE(series_instance_uid, generation)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
"""

_INSTANCE_COLS = (
    "sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid, transfer_syntax_uid, "
    "modality, path, size_bytes, instance_number, px, py, pz, orientation, frames, "
    "frame_of_reference_uid, calling_ae, association_id, received_at"
)
_SERIES_COLS = (
    "series_instance_uid, study_instance_uid, modality, state, instance_count, bytes, first_received_at, "
    "last_received_at, released_at, completed_at, completion_reason, generation, last_association_id, calling_ae"
)
_JOB_COLS = (
    "job_id, series_instance_uid, study_instance_uid, generation, state, attempts, created_at, claimed_at, "
    "finished_at, worker, reason, timings_json, not_before"
)


def sqlite_path(cfg: "Config") -> Path:
    """The SQLite file of a node: ``<data_dir>/state.sqlite3``."""
    return cfg.data_dir / "state.sqlite3"


def connect(path: str | Path, *, synchronous: str = "FULL", timeout_s: float = 30.0) -> sqlite3.Connection:
    """Open ``path`` with the node's pragmas (WAL, busy_timeout, synchronous, foreign keys).

    Autocommit mode (``isolation_level=None``): use explicit ``BEGIN IMMEDIATE`` / ``COMMIT``.
    Raises ``sqlite3.Error`` when the file cannot be opened.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Database(Protocol):
    """The node's state store. Every method is atomic; errors are ``sqlite3.Error``-like."""

    def add_instance(self, meta: InstanceMeta) -> bool:
        """Record a stored instance; True when new, False when the SOP instance was already held."""
        ...

    def association_released(self, association_id: str, when: float | None = None) -> list[str]:
        """Mark the series last fed by ``association_id`` as released; returns their series UIDs."""
        ...

    def receiving_series(self) -> list[SeriesRecord]:
        """Series still in state ``receiving`` (for the completion monitor)."""
        ...

    def series_instances(self, series_uid: str) -> list[InstanceMeta]:
        """Every instance of a series, ordered by instance number then receipt."""
        ...

    def complete_series(self, series_uid: str, generation: int, reason: str, when: float | None = None) -> int | None:
        """Mark the series complete and create its job; returns the job id, None if already done."""
        ...

    def claim_job(self, worker: str, now: float | None = None) -> Job | None:
        """Atomically take the oldest runnable queued job (state -> processing), or None."""
        ...

    def finish_job(self, job_id: int, state: str, reason: str = "", timings_json: str = "{}",
                   retry_at: float | None = None) -> None:
        """Finish a job as done/quarantined/failed, or ``queued`` (retry at ``retry_at``)."""
        ...

    def requeue_stale_jobs(self, older_than_s: float = 0.0) -> int:
        """Put jobs left in ``processing`` (by a crash) back to ``queued``; returns how many."""
        ...

    def series_geometry(self, series_uid: str) -> list[tuple[tuple[float, float, float] | None, str | None, int]]:
        """(position, orientation text, frames) per instance: all that completion reads."""
        ...

    def get_series(self, series_uid: str) -> SeriesRecord | None: ...
    def list_series(self, limit: int = 1000) -> list[SeriesRecord]: ...
    def set_series_state(self, series_uid: str, state: str) -> None: ...
    def delete_series(self, series_uid: str) -> list[str]: ...
    def get_job(self, job_id: int) -> Job | None: ...
    def job_for_series(self, series_uid: str) -> Job | None: ...
    def list_jobs(self, states: tuple[str, ...] = (), limit: int = 1000) -> list[Job]: ...
    def instance_paths(self) -> set[str]: ...
    def total_bytes(self) -> int: ...
    def close(self) -> None: ...


class ThreadConnections:
    """One SQLite connection per thread on one file (see :func:`connect`) and serialised writes.

    Shared by :class:`SqliteDatabase` and the outbox store, which keep their tables in the same file.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use; raises ``sqlite3.Error``)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, synchronous=self._synchronous)
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
        conn = self.conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def executescript(self, script: str) -> None:
        """Run a schema script under the write lock."""
        with self._write_lock:
            self.conn().executescript(script)

    def close(self) -> None:
        """Close every connection opened through this object."""
        with self._all_lock:
            for c in self._all:
                try:
                    c.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
            self._all.clear()
        self._local = threading.local()


class SqliteDatabase:
    """:class:`Database` on one SQLite file (WAL). Safe to share between threads."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        """Open (and create) the database at ``path``; raises ``sqlite3.Error``."""
        self.path = Path(path)
        self._pool = ThreadConnections(self.path, synchronous=synchronous)
        self._conn = self._pool.conn
        self._write = self._pool.write
        self._pool.executescript(SCHEMA)

    def close(self) -> None:
        """Close every connection this object opened."""
        self._pool.close()

    # ---- instances and series ------------------------------------------------------------
    def add_instance(self, meta: InstanceMeta) -> bool:
        """Record a stored instance (see :class:`Database`). A new instance of a series that is no
        longer receiving re-opens it (new generation; a still-queued job is superseded)."""
        now = meta.received_at or time.time()
        pos = meta.position or (None, None, None)
        orient = ",".join(repr(float(v)) for v in meta.orientation) if meta.orientation else None
        with self._write() as c:
            old = c.execute("SELECT series_instance_uid, size_bytes FROM instances WHERE sop_instance_uid=?",
                            (meta.sop_instance_uid,)).fetchone()
            c.execute(
                f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLS}) VALUES ({','.join('?' * 18)})",
                (meta.sop_instance_uid, meta.sop_class_uid, meta.series_instance_uid, meta.study_instance_uid,
                 meta.transfer_syntax_uid, meta.modality, meta.path, meta.size_bytes, meta.instance_number,
                 pos[0], pos[1], pos[2], orient, meta.frames, meta.frame_of_reference_uid, meta.calling_ae,
                 meta.association_id, now),
            )
            is_new = old is None or old[0] != meta.series_instance_uid
            if old is not None and old[0] != meta.series_instance_uid:  # moved between series: fix the old one
                c.execute("UPDATE series SET instance_count=instance_count-1, bytes=bytes-? WHERE series_instance_uid=?",
                          (old[1], old[0]))
            row = c.execute("SELECT state, generation FROM series WHERE series_instance_uid=?",
                            (meta.series_instance_uid,)).fetchone()
            delta_n = 1 if is_new else 0
            delta_b = meta.size_bytes - (0 if is_new or old is None else old[1])
            if row is None:
                c.execute(
                    f"INSERT INTO series ({_SERIES_COLS}) VALUES (?,?,?,'receiving',1,?,?,?,NULL,NULL,'',1,?,?)",
                    (meta.series_instance_uid, meta.study_instance_uid, meta.modality, meta.size_bytes, now, now,
                     meta.association_id, meta.calling_ae),
                )
            elif row[0] == "receiving" or not is_new:
                c.execute(
                    "UPDATE series SET instance_count=instance_count+?, bytes=bytes+?, last_received_at=?, "
                    "released_at=CASE WHEN state='receiving' THEN NULL ELSE released_at END, "
                    "last_association_id=CASE WHEN state='receiving' THEN ? ELSE last_association_id END "
                    "WHERE series_instance_uid=?",
                    (delta_n, delta_b, now, meta.association_id, meta.series_instance_uid),
                )
            else:  # a new instance for a series already complete/processed: re-open it
                c.execute("UPDATE jobs SET state='superseded', finished_at=? WHERE series_instance_uid=? "
                          "AND state='queued'", (now, meta.series_instance_uid))
                c.execute(
                    "UPDATE series SET state='receiving', instance_count=instance_count+1, bytes=bytes+?, "
                    "first_received_at=?, last_received_at=?, released_at=NULL, completed_at=NULL, "
                    "completion_reason='', generation=generation+1, last_association_id=? "
                    "WHERE series_instance_uid=?",
                    (meta.size_bytes, now, now, meta.association_id, meta.series_instance_uid),
                )
        return is_new

    def association_released(self, association_id: str, when: float | None = None) -> list[str]:
        """See :class:`Database`."""
        when = time.time() if when is None else when
        with self._write() as c:
            rows = c.execute("SELECT series_instance_uid FROM series WHERE state='receiving' AND "
                             "last_association_id=?", (association_id,)).fetchall()
            c.execute("UPDATE series SET released_at=? WHERE state='receiving' AND last_association_id=?",
                      (when, association_id))
        return [r[0] for r in rows]

    def receiving_series(self) -> list[SeriesRecord]:
        """See :class:`Database`."""
        rows = self._conn().execute(f"SELECT {_SERIES_COLS} FROM series WHERE state='receiving'").fetchall()
        return [SeriesRecord(*r) for r in rows]

    def series_instances(self, series_uid: str) -> list[InstanceMeta]:
        """See :class:`Database`."""
        rows = self._conn().execute(
            f"SELECT {_INSTANCE_COLS} FROM instances WHERE series_instance_uid=? "
            "ORDER BY instance_number IS NULL, instance_number, received_at", (series_uid,)).fetchall()
        return [_instance(r) for r in rows]

    def series_geometry(self, series_uid: str) -> list[tuple[tuple[float, float, float] | None, str | None, int]]:
        """(position, orientation text, frames) of every instance: what completion needs, nothing more."""
        rows = self._conn().execute(
            "SELECT px, py, pz, orientation, frames FROM instances WHERE series_instance_uid=?",
            (series_uid,)).fetchall()
        return [((r[0], r[1], r[2]) if r[0] is not None else None, r[3], r[4]) for r in rows]

    def complete_series(self, series_uid: str, generation: int, reason: str, when: float | None = None) -> int | None:
        """See :class:`Database`. Exactly one job per (series, generation)."""
        when = time.time() if when is None else when
        with self._write() as c:
            cur = c.execute(
                "UPDATE series SET state='complete', completed_at=?, completion_reason=? "
                "WHERE series_instance_uid=? AND state='receiving' AND generation=?",
                (when, reason, series_uid, generation))
            if cur.rowcount != 1:
                return None
            study = c.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid=?",
                              (series_uid,)).fetchone()[0]
            cur = c.execute(
                "INSERT INTO jobs (series_instance_uid, study_instance_uid, generation, state, created_at) "
                "VALUES (?,?,?,'queued',?)", (series_uid, study, generation, when))
            return int(cur.lastrowid)

    def set_series_state(self, series_uid: str, state: str) -> None:
        """Force a series state (operator actions, tests)."""
        with self._write() as c:
            c.execute("UPDATE series SET state=? WHERE series_instance_uid=?", (state, series_uid))

    def get_series(self, series_uid: str) -> SeriesRecord | None:
        """The series, or None."""
        r = self._conn().execute(f"SELECT {_SERIES_COLS} FROM series WHERE series_instance_uid=?",
                                 (series_uid,)).fetchone()
        return SeriesRecord(*r) if r else None

    def list_series(self, limit: int = 1000) -> list[SeriesRecord]:
        """The most recently active series first."""
        rows = self._conn().execute(f"SELECT {_SERIES_COLS} FROM series ORDER BY last_received_at DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [SeriesRecord(*r) for r in rows]

    def total_bytes(self) -> int:
        """Bytes of every instance held (for the spool quota)."""
        return int(self._conn().execute("SELECT COALESCE(SUM(bytes), 0) FROM series").fetchone()[0])

    def instance_paths(self) -> set[str]:
        """The spool paths of every instance held (for recovery)."""
        return {r[0] for r in self._conn().execute("SELECT path FROM instances")}

    def delete_series(self, series_uid: str) -> list[str]:
        """Forget a series and its instances (retention); returns the spool paths to delete."""
        with self._write() as c:
            paths = [r[0] for r in c.execute("SELECT path FROM instances WHERE series_instance_uid=?", (series_uid,))]
            c.execute("DELETE FROM instances WHERE series_instance_uid=?", (series_uid,))
            c.execute("DELETE FROM series WHERE series_instance_uid=?", (series_uid,))
        return paths

    # ---- jobs ----------------------------------------------------------------------------
    def claim_job(self, worker: str, now: float | None = None) -> Job | None:
        """See :class:`Database`. The series goes to ``processing`` with the job."""
        now = time.time() if now is None else now
        with self._write() as c:
            r = c.execute("SELECT job_id FROM jobs WHERE state='queued' AND not_before<=? ORDER BY job_id LIMIT 1",
                          (now,)).fetchone()
            if r is None:
                return None
            c.execute("UPDATE jobs SET state='processing', attempts=attempts+1, claimed_at=?, worker=? WHERE job_id=?",
                      (now, worker, r[0]))
            job = Job(*c.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE job_id=?", (r[0],)).fetchone())
            c.execute("UPDATE series SET state='processing' WHERE series_instance_uid=? AND generation=? "
                      "AND state='complete'", (job.series_instance_uid, job.generation))
        return job

    def finish_job(self, job_id: int, state: str, reason: str = "", timings_json: str = "{}",
                   retry_at: float | None = None) -> None:
        """See :class:`Database`. Raises ValueError for an unknown state or a job not processing.

        The series takes the job's state (``queued`` -> ``complete``) unless new instances
        re-opened it meanwhile.
        """
        if state not in FINAL_JOB_STATES:
            raise ValueError(f"finish_job: state must be one of {FINAL_JOB_STATES}, got {state!r}")
        now = time.time()
        with self._write() as c:
            r = c.execute("SELECT series_instance_uid, generation, state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if r is None or r[2] != "processing":
                raise ValueError(f"finish_job: job {job_id} is not processing")
            c.execute("UPDATE jobs SET state=?, reason=?, timings_json=?, finished_at=?, not_before=?, "
                      "worker=CASE WHEN ?='queued' THEN '' ELSE worker END WHERE job_id=?",
                      (state, reason, timings_json, None if state == "queued" else now,
                       retry_at or 0.0, state, job_id))
            series_state = "complete" if state == "queued" else state
            c.execute("UPDATE series SET state=? WHERE series_instance_uid=? AND generation=? AND state='processing'",
                      (series_state, r[0], r[1]))

    def requeue_stale_jobs(self, older_than_s: float = 0.0) -> int:
        """See :class:`Database`. Call at startup (single node: every processing job is stale)."""
        cutoff = time.time() - older_than_s
        with self._write() as c:
            rows = c.execute("SELECT job_id, series_instance_uid, generation FROM jobs WHERE state='processing' "
                             "AND claimed_at<=?", (cutoff,)).fetchall()
            for job_id, series_uid, gen in rows:
                c.execute("UPDATE jobs SET state='queued', worker='' WHERE job_id=?", (job_id,))
                c.execute("UPDATE series SET state='complete' WHERE series_instance_uid=? AND generation=? "
                          "AND state='processing'", (series_uid, gen))
        return len(rows)

    def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        r = self._conn().execute(f"SELECT {_JOB_COLS} FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return Job(*r) if r else None

    def list_jobs(self, states: tuple[str, ...] = (), limit: int = 1000) -> list[Job]:
        """Jobs, newest first, optionally only those in ``states``."""
        q = f"SELECT {_JOB_COLS} FROM jobs"
        args: list[object] = []
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
            args.extend(states)
        rows = self._conn().execute(q + " ORDER BY job_id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job(*r) for r in rows]

    def job_for_series(self, series_uid: str) -> Job | None:
        """The latest job of a series, or None."""
        r = self._conn().execute(f"SELECT {_JOB_COLS} FROM jobs WHERE series_instance_uid=? ORDER BY job_id DESC "
                                 "LIMIT 1", (series_uid,)).fetchone()
        return Job(*r) if r else None


def _instance(r: tuple) -> InstanceMeta:
    orient = tuple(float(v) for v in r[12].split(",")) if r[12] else None
    pos = (r[9], r[10], r[11]) if r[9] is not None else None
    return InstanceMeta(
        sop_instance_uid=r[0], sop_class_uid=r[1], series_instance_uid=r[2], study_instance_uid=r[3],
        transfer_syntax_uid=r[4], modality=r[5], path=r[6], size_bytes=r[7], instance_number=r[8],
        position=pos, orientation=orient,  # type: ignore[arg-type]
        frames=r[13], frame_of_reference_uid=r[14], calling_ae=r[15], association_id=r[16], received_at=r[17],
    )


def open_database(cfg: "Config") -> SqliteDatabase:
    """The node's database for ``cfg`` (created when missing); raises ``sqlite3.Error``."""
    return SqliteDatabase(sqlite_path(cfg))
