"""The durable outbox: every result is queued on disk before it is sent, and sent until it arrives.

- :class:`Outbox` is what the node uses: ``enqueue(dataset, destination, kind=)`` writes the
  object durably (temp file, fsync, rename, fsync of the folder) under ``<data_dir>/outbox`` and
  records one row per (destination, SOP instance UID) - enqueuing the same object again is a
  no-op, a changed object with the same UID (a re-run) replaces the file and is sent again.
- Rows live in their own table of the node's SQLite file (``store.db.connect``: WAL, busy
  timeout) behind the small :class:`OutboxStore` protocol, so a PostgreSQL store can be added.
- Transient failures are retried with exponential backoff and jitter; the next attempt time is
  persisted, so retries survive restarts. Entries older than ``outbox.max_age_s`` and permanent
  failures are dead-lettered with a reason; operators list/retry/purge (``dicomnode outbox``).
- :class:`Sender` is the thread that drains the outbox with :class:`dicomnode.net.scu.StoreSCU`.

Logs carry entry ids, destinations and keyed series hashes only, never UIDs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from dicomnode.config import Config, OutboxConfig, PeerConfig
from dicomnode.errors import PermanentSendError, TransientError
from dicomnode.ops.logs import series_key
from dicomnode.results.uids import is_valid_uid
from dicomnode.store.db import ThreadConnections, sqlite_path

log = logging.getLogger(__name__)

PENDING, SENT, DEAD = "pending", "sent", "dead"
STATES = (PENDING, SENT, DEAD)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  destination TEXT NOT NULL,
  sop_instance_uid TEXT NOT NULL,
  sop_class_uid TEXT NOT NULL,
  series_instance_uid TEXT NOT NULL,
  kind TEXT NOT NULL DEFAULT '',
  path TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at REAL NOT NULL,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  sent_at REAL,
  last_error TEXT NOT NULL DEFAULT '',
  UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""
_COLS = ("id, destination, sop_instance_uid, sop_class_uid, series_instance_uid, kind, path, sha256, state, "
         "attempts, next_attempt_at, created_at, updated_at, sent_at, last_error")


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One object for one destination."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    kind: str
    path: str  # relative to the outbox folder
    sha256: str
    state: str
    attempts: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    sent_at: float | None
    last_error: str


class OutboxStore(Protocol):
    """Row storage of the outbox (SQLite here; PostgreSQL would take due rows FOR UPDATE SKIP LOCKED)."""

    def upsert(self, destination: str, sop_uid: str, sop_class: str, series_uid: str, kind: str, path: str,
               sha256: str, now: float) -> tuple[OutboxEntry, bool]:
        """Insert or refresh the row of (destination, sop_uid); True when it is (again) pending."""
        ...

    def due(self, now: float, limit: int) -> list[OutboxEntry]: ...
    def get(self, entry_id: int) -> OutboxEntry | None: ...
    def update(self, entry_id: int, *, state: str, attempts: int, next_attempt_at: float, last_error: str,
               now: float) -> None: ...
    def list(self, states: Sequence[str], destination: str | None, limit: int) -> list[OutboxEntry]: ...
    def reset(self, ids: Sequence[int] | None, states: Sequence[str], destination: str | None, now: float) -> int: ...
    def delete(self, states: Sequence[str], older_than: float) -> list[str]: ...
    def referenced(self, path: str) -> bool: ...
    def counts(self) -> dict[str, int]: ...
    def close(self) -> None: ...


class SqliteOutboxStore:
    """:class:`OutboxStore` in the node's SQLite file (own table; one connection per thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pool = ThreadConnections(self.path)
        self._conn = self._pool.conn
        self._write = self._pool.write
        self._pool.executescript(SCHEMA)

    def _one(self, conn: sqlite3.Connection, where: str, args: tuple) -> OutboxEntry | None:
        row = conn.execute(f"SELECT {_COLS} FROM outbox WHERE {where}", args).fetchone()
        return OutboxEntry(*row) if row else None

    def upsert(self, destination: str, sop_uid: str, sop_class: str, series_uid: str, kind: str, path: str,
               sha256: str, now: float) -> tuple[OutboxEntry, bool]:
        with self._write() as conn:
            old = self._one(conn, "destination=? AND sop_instance_uid=?", (destination, sop_uid))
            if old is None:
                conn.execute(
                    "INSERT INTO outbox (destination, sop_instance_uid, sop_class_uid, series_instance_uid, kind, path,"
                    " sha256, state, attempts, next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,0,?,?,?)",
                    (destination, sop_uid, sop_class, series_uid, kind, path, sha256, PENDING, now, now, now))
                fresh = True
            elif old.sha256 == sha256 and old.state in (PENDING, SENT):
                fresh = False  # the same object again: nothing to do
            else:  # new content under the same UID (a re-run), or a dead entry queued again
                conn.execute(
                    "UPDATE outbox SET sop_class_uid=?, kind=?, path=?, sha256=?, state=?, attempts=0,"
                    " next_attempt_at=?, created_at=?, updated_at=?, sent_at=NULL, last_error='' WHERE id=?",
                    (sop_class, kind, path, sha256, PENDING, now, now, now, old.id))
                fresh = True
            entry = self._one(conn, "destination=? AND sop_instance_uid=?", (destination, sop_uid))
        assert entry is not None
        return entry, fresh

    def due(self, now: float, limit: int) -> list[OutboxEntry]:
        rows = self._conn().execute(
            f"SELECT {_COLS} FROM outbox WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at, id LIMIT ?",
            (PENDING, now, limit)).fetchall()
        return [OutboxEntry(*r) for r in rows]

    def get(self, entry_id: int) -> OutboxEntry | None:
        return self._one(self._conn(), "id=?", (entry_id,))

    def update(self, entry_id: int, *, state: str, attempts: int, next_attempt_at: float, last_error: str,
               now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE outbox SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=?,"
                " sent_at=CASE WHEN ?='sent' THEN ? ELSE sent_at END WHERE id=?",
                (state, attempts, next_attempt_at, last_error[:500], now, state, now, entry_id))

    def list(self, states: Sequence[str], destination: str | None, limit: int) -> list[OutboxEntry]:
        where, args = self._filter(states, destination)
        rows = self._conn().execute(f"SELECT {_COLS} FROM outbox WHERE {where} ORDER BY id LIMIT ?",
                                    (*args, limit)).fetchall()
        return [OutboxEntry(*r) for r in rows]

    @staticmethod
    def _filter(states: Sequence[str], destination: str | None, ids: Sequence[int] | None = None) -> tuple[str, tuple]:
        clauses, args = ["1=1"], []
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if destination:
            clauses.append("destination=?")
            args.append(destination)
        if ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(ids))})" if ids else "0=1")
            args.extend(ids)
        return " AND ".join(clauses), tuple(args)

    def reset(self, ids: Sequence[int] | None, states: Sequence[str], destination: str | None, now: float) -> int:
        where, args = self._filter(states, destination, ids)
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, created_at=?, updated_at=?,"
                f" last_error='' WHERE {where} AND state!='sent'", (now, now, now, *args))
            return int(cur.rowcount)

    def delete(self, states: Sequence[str], older_than: float) -> list[str]:
        where, args = self._filter(states, None)
        with self._write() as conn:
            paths = [r[0] for r in conn.execute(
                f"SELECT DISTINCT path FROM outbox WHERE {where} AND updated_at<=?", (*args, older_than))]
            conn.execute(f"DELETE FROM outbox WHERE {where} AND updated_at<=?", (*args, older_than))
        return paths

    def referenced(self, path: str) -> bool:
        return self._conn().execute("SELECT 1 FROM outbox WHERE path=? LIMIT 1", (path,)).fetchone() is not None

    def counts(self) -> dict[str, int]:
        return {str(k): int(n) for k, n in self._conn().execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")}

    def close(self) -> None:
        """Close this store's connections."""
        self._pool.close()


def encode(dataset: Dataset) -> bytes:
    """``dataset`` as DICOM file bytes (file meta enforced), exactly as :meth:`Outbox.enqueue` stores it."""
    from io import BytesIO

    buf = BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full etc.: no partial file stays behind (its name is per process)
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """Durable queue of result objects per destination (see the module docstring)."""

    def __init__(self, store: OutboxStore, directory: str | Path, cfg: OutboxConfig | None = None,
                 *, rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.directory = Path(directory)
        self.cfg = cfg or OutboxConfig()
        self._rng = rng or random.Random()
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    def open(cls, cfg: Config) -> "Outbox":
        """The outbox of a node: table in ``<data_dir>/state.sqlite3``, files in ``<data_dir>/outbox``."""
        return cls(SqliteOutboxStore(sqlite_path(cfg)), cfg.data_dir / "outbox", cfg.outbox)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every enqueue that made an entry pending (the Sender wakes up)."""
        self._listeners.append(callback)

    def path_of(self, entry: OutboxEntry) -> Path:
        """The file of ``entry``."""
        return self.directory / entry.path

    def notify(self) -> None:
        """Call the listeners now (after a group of ``enqueue(..., notify=False)``)."""
        for cb in self._listeners:
            cb()

    def enqueue(self, dataset: Dataset, destination: str, *, kind: str = "", data: bytes | None = None,
                notify: bool = True) -> OutboxEntry:
        """Queue ``dataset`` for ``destination``; returns its entry once file and row are durable.

        ``data``: the dataset already encoded by :func:`encode` (one encoding for several
        destinations). ``notify=False`` leaves waking the sender to a later :meth:`notify`, so the
        objects of one series (SEG + SR) go out in one association. Raises ValueError for a dataset
        without valid SOP/series UIDs, TransientError when the file or the row cannot be written
        now (disk full, database locked).
        """
        sop_uid = str(dataset.get("SOPInstanceUID", ""))
        series_uid = str(dataset.get("SeriesInstanceUID", ""))
        if not (is_valid_uid(sop_uid) and is_valid_uid(series_uid)) or "SOPClassUID" not in dataset:
            raise ValueError("dataset needs valid SOP class, SOP instance and series UIDs")
        if data is None:
            data = encode(dataset)
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{sop_uid}.dcm"
        now = self._clock()
        try:
            current = self.directory / rel
            if not current.exists() or hashlib.sha256(current.read_bytes()).hexdigest() != digest:
                _write_durably(current, data)
            entry, fresh = self.store.upsert(destination, sop_uid, str(dataset.SOPClassUID), series_uid, kind,
                                             rel, digest, now)
        except (OSError, sqlite3.Error) as exc:
            raise TransientError(f"outbox cannot take the object now: {type(exc).__name__}") from exc
        if fresh:
            log.info("outbox: queued entry %d (%s) for %s, series %s", entry.id, kind or "object", destination,
                     series_key(series_uid))
            if notify:
                self.notify()
        return entry

    def due(self, now: float | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Pending entries whose next attempt time has come, oldest first."""
        return self.store.due(self._clock() if now is None else now, limit)

    def get(self, entry_id: int) -> OutboxEntry | None:
        """The entry with ``entry_id`` or None."""
        return self.store.get(entry_id)

    def mark_sent(self, entry_id: int) -> None:
        """The destination confirmed storage."""
        entry = self._require(entry_id)
        self.store.update(entry_id, state=SENT, attempts=entry.attempts + 1, next_attempt_at=entry.next_attempt_at,
                          last_error="", now=self._clock())

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: exponential, capped, with jitter (half fixed, half random)."""
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** max(0, attempts - 1)))
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def mark_retry(self, entry_id: int, reason: str, now: float | None = None) -> float | None:
        """A transient failure: schedule the next attempt (persisted); returns its time.

        Entries older than ``max_age_s`` are dead-lettered instead (returns None).
        """
        entry = self._require(entry_id)
        now = self._clock() if now is None else now
        attempts = entry.attempts + 1
        if now - entry.created_at > self.cfg.max_age_s:
            self.store.update(entry_id, state=DEAD, attempts=attempts, next_attempt_at=now,
                              last_error=f"expired after {attempts} attempts: {reason}", now=now)
            log.warning("outbox: entry %d dead-lettered (expired) for %s", entry_id, entry.destination)
            return None
        at = now + self.backoff(attempts)
        self.store.update(entry_id, state=PENDING, attempts=attempts, next_attempt_at=at, last_error=reason, now=now)
        log.info("outbox: entry %d for %s retried in %.1f s (%s)", entry_id, entry.destination, at - now, reason)
        return at

    def mark_dead(self, entry_id: int, reason: str) -> None:
        """A permanent failure: dead-letter with ``reason``."""
        entry = self._require(entry_id)
        now = self._clock()
        self.store.update(entry_id, state=DEAD, attempts=entry.attempts + 1, next_attempt_at=now,
                          last_error=reason, now=now)
        log.warning("outbox: entry %d dead-lettered for %s: %s", entry_id, entry.destination, reason)

    def list(self, states: Sequence[str] = (), destination: str | None = None, limit: int = 1000) -> list[OutboxEntry]:
        """Entries (optionally only in ``states`` / for ``destination``), by id."""
        return self.store.list(tuple(states), destination, limit)

    def retry(self, ids: Sequence[int] | None = None, *, destination: str | None = None,
              states: Sequence[str] = (DEAD,)) -> int:
        """Make entries pending and due now (dead ones by default; sent ones never); returns how many."""
        n = self.store.reset(None if ids is None else list(ids), tuple(states), destination, self._clock())
        if n:
            for cb in self._listeners:
                cb()
        return n

    def purge(self, states: Sequence[str] = (SENT,), older_than_s: float = 0.0) -> int:
        """Delete entries in ``states`` untouched for ``older_than_s``, and files nothing refers to."""
        paths = self.store.delete(tuple(states), self._clock() - older_than_s)
        for rel in paths:
            if not self.store.referenced(rel):
                try:
                    (self.directory / rel).unlink()
                except FileNotFoundError:
                    pass
        return len(paths)

    def counts(self) -> dict[str, int]:
        """Number of entries per state."""
        out = {s: 0 for s in STATES}
        out.update(self.store.counts())
        return out

    def _require(self, entry_id: int) -> OutboxEntry:
        entry = self.store.get(entry_id)
        if entry is None:
            raise KeyError(entry_id)
        return entry

    def close(self) -> None:
        """Close the store's connections."""
        self.store.close()


@dataclass(frozen=True, slots=True)
class SendSummary:
    """What one pass of the Sender did."""

    sent: int = 0
    retried: int = 0
    dead: int = 0


class Sender:
    """The thread that drains the outbox: due entries, grouped per destination, one association each."""

    def __init__(self, outbox: Outbox, peers: Iterable[PeerConfig], scu: object, *, poll_s: float = 1.0,
                 batch: int = 64) -> None:
        self.outbox = outbox
        self.peers = {p.name: p for p in peers}
        self.scu = scu  # anything with send(peer, paths, sop_classes) -> list[StoreResult] (net.scu.StoreSCU)
        self.poll_s = poll_s
        self.batch = batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        outbox.add_listener(self._wake.set)

    @classmethod
    def from_config(cls, cfg: Config, outbox: Outbox) -> "Sender":
        """A Sender for the node's peers, sending as ``node.ae_title`` (TLS for peers with ``tls``)."""
        from dicomnode.net.scu import StoreSCU

        tls = None
        if any(p.tls for p in cfg.peers):
            from dicomnode.net.security import client_ssl_context

            tls = client_ssl_context(cfg)
        scu = StoreSCU(cfg.node.ae_title, timeout_s=cfg.outbox.timeout_s, max_pdu=cfg.node.max_pdu, tls_context=tls)
        return cls(outbox, cfg.peers, scu)

    def wake(self) -> None:
        """Try now instead of at the next poll."""
        self._wake.set()

    def run_once(self, now: float | None = None) -> SendSummary:
        """Send every due entry once; returns the counts. Never raises for send failures."""
        due = self.outbox.due(now, self.batch)
        groups: dict[str, list[OutboxEntry]] = {}
        for e in due:
            groups.setdefault(e.destination, []).append(e)
        sent = retried = dead = 0
        for dest, entries in groups.items():
            peer = self.peers.get(dest)
            if peer is None:
                for e in entries:
                    self.outbox.mark_dead(e.id, f"unknown destination {dest!r}")
                dead += len(entries)
                continue
            ready: list[OutboxEntry] = []
            for e in entries:
                if self.outbox.path_of(e).is_file():
                    ready.append(e)
                else:
                    self.outbox.mark_dead(e.id, "outbox file missing")
                    dead += 1
            if not ready:
                continue
            try:  # files are read one at a time by the SCU, right before each C-STORE
                results = self.scu.send(peer, [self.outbox.path_of(e) for e in ready],  # type: ignore[attr-defined]
                                        [e.sop_class_uid for e in ready])
            except TransientError as exc:
                for e in ready:
                    self.outbox.mark_retry(e.id, str(exc), now)
                retried += len(ready)
                continue
            except PermanentSendError as exc:
                for e in ready:
                    self.outbox.mark_dead(e.id, str(exc))
                dead += len(ready)
                continue
            for r in results:
                e = ready[r.index]
                if r.outcome == "success":
                    self.outbox.mark_sent(e.id)
                    sent += 1
                elif r.outcome == "transient":
                    self.outbox.mark_retry(e.id, r.reason, now)
                    retried += 1
                else:
                    self.outbox.mark_dead(e.id, r.reason)
                    dead += 1
        if sent or retried or dead:
            log.info("outbox: sent %d, retry %d, dead %d", sent, retried, dead)
        return SendSummary(sent, retried, dead)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                summary = self.run_once()
            except Exception:  # noqa: BLE001 - the sender must survive anything; entries stay queued
                log.exception("outbox: sender pass failed")
                summary = SendSummary()
            if summary.sent and not self._stop.is_set():
                continue  # more may be due right away
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def start(self) -> None:
        """Start the sender thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="outbox-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current pass (an interrupted send stays pending and is sent again later)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
