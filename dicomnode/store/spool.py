"""Atomic, durable instance files: temp file, fsync, rename, fsync of the directory.

Layout: ``<root>/<study-key>/<series UID>/<SOP instance UID>.dcm`` where ``study-key`` is a short
hash of the study UID (keeps directories small without another 64-character component). UIDs are
validated (:func:`valid_uid`) before they become path components, so a peer cannot traverse.

Out of disk (ENOSPC/EDQUOT), over ``quota_bytes`` or under ``min_free_bytes`` free: raises
:class:`InstanceRejected` with 0xA700 and leaves no partial file. Re-writing the same SOP instance
replaces the file atomically (stored once).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from dicomnode.errors import InstanceRejected
from dicomnode.net.dimse import STATUS_OUT_OF_RESOURCES

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LOOSE_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros are common in the wild


def valid_uid(uid: str, *, strict: bool = False) -> bool:
    """True if ``uid`` is a DICOM UID (digits and dots, at most 64 characters).

    ``strict`` also refuses components with leading zeros (PS3.5 9.1); real scanners produce
    them, so the spool accepts them: either way only digits and dots reach a file name.
    """
    if not isinstance(uid, str) or not 0 < len(uid) <= 64:
        return False
    return bool((UID_RE if strict else LOOSE_UID_RE).match(uid))


def study_key(study_uid: str) -> str:
    """Directory name for a study: 16 hex characters of SHA-256 (not a secret, just short)."""
    return hashlib.sha256(study_uid.encode("ascii")).hexdigest()[:16]


class Spool:
    """The instance store under ``root``. Thread-safe."""

    def __init__(self, root: Path, *, quota_bytes: int = 0, min_free_bytes: int = 0,
                 used_bytes: Callable[[], int] | None = None, fsync: bool = True) -> None:
        """``used_bytes`` reports the bytes held (from the database) for the quota; it is
        refreshed every few seconds and counted up in between. Creates ``root``."""
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self._used_fn = used_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._used = used_bytes() if used_bytes else 0
        self._used_at = time.monotonic()
        self._free = shutil.disk_usage(self.root).free
        self._free_at = time.monotonic()
        self._known_dirs: set[Path] = set()
        self._seq = 0

    def clean_temp(self) -> int:
        """Remove temporary files left by a crash (never acknowledged); returns how many."""
        n = 0
        for p in self.tmp_dir.glob("*.part"):
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:  # pragma: no cover
                pass
        return n

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The spool-relative path of an instance; raises InstanceRejected(0xC000) on a bad UID."""
        for name, uid in (("study", study_uid), ("series", series_uid), ("sop instance", sop_uid)):
            if not valid_uid(uid):
                raise InstanceRejected(0xC000, f"invalid {name} UID")
        return f"{study_key(study_uid)}/{series_uid}/{sop_uid}.dcm"

    def abspath(self, relative: str) -> Path:
        """Absolute path of a spool-relative path."""
        return self.root / relative

    def _check_space(self, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._used_fn is not None and now - self._used_at > 5.0:
                self._used, self._used_at = self._used_fn(), now
            if now - self._free_at > 1.0 or self._free - nbytes < self.min_free_bytes + (64 << 20):
                self._free, self._free_at = shutil.disk_usage(self.root).free, now
            if self.quota_bytes and self._used + nbytes > self.quota_bytes:
                raise InstanceRejected(STATUS_OUT_OF_RESOURCES, "spool quota reached")
            if self._free - nbytes < self.min_free_bytes:
                raise InstanceRejected(STATUS_OUT_OF_RESOURCES, "disk space below the reserve")

    def write(self, relative: str, chunks: list[bytes] | tuple[bytes, ...]) -> int:
        """Write ``chunks`` durably at ``relative``; returns the byte count.

        Temp file in ``.tmp`` -> write -> fsync -> rename -> fsync directory. Raises
        InstanceRejected(0xA700) when out of space or over quota (temp file removed); other
        OSErrors propagate after the temp file is removed.
        """
        nbytes = sum(len(c) for c in chunks)
        self._check_space(nbytes)
        final = self.root / relative
        parent = final.parent
        with self._lock:
            self._seq += 1
            tmp = self.tmp_dir / f"{os.getpid()}-{threading.get_ident()}-{self._seq}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                if self._fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if parent not in self._known_dirs:
                self._make_dirs(parent)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # the series folder was removed meanwhile (retention)
                self._known_dirs.discard(parent)
                self._make_dirs(parent)
                os.replace(tmp, final)
            if self._fsync:
                _fsync_dir(parent)
        except OSError as exc:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InstanceRejected(STATUS_OUT_OF_RESOURCES, "disk full") from exc
            raise
        with self._lock:
            self._used += nbytes
            self._free -= nbytes
        return nbytes

    def _make_dirs(self, parent: Path) -> None:
        """Create the study/series directories durably (each new entry fsync'd in its parent)."""
        missing = []
        p = parent
        while p != self.root and not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                pass
            if self._fsync:
                _fsync_dir(d.parent)
        self._known_dirs.add(parent)

    def files(self) -> list[str]:
        """Every instance file in the spool, spool-relative (for recovery after power loss)."""
        return [str(p.relative_to(self.root)) for p in self.root.glob("*/*/*.dcm")]

    def delete(self, relative: str) -> None:
        """Remove an instance file (retention); missing files are ignored."""
        try:
            size = (self.root / relative).stat().st_size
            (self.root / relative).unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._used -= size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
