"""PHI-free logging.

Log lines carry an opaque job id and :func:`series_key` (a keyed hash of the series UID), never
names, IDs, dates, descriptions, UIDs or dataset dumps. pynetdicom's identifier logging and
pydicom's verbatim "invalid value" messages are switched off here.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import logging.handlers
import os
import secrets
from pathlib import Path

_KEY: bytes = b""


def set_hash_key(key: bytes) -> None:
    """Set the key used by :func:`series_key` (per install; see ``logging.hash_key_env``)."""
    global _KEY
    _KEY = key


def load_or_create_key(path: Path) -> bytes:
    """A per-install random key kept at ``path`` (created with mode 0600 when missing)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key


def series_key(uid: str) -> str:
    """A short keyed hash of a UID, safe for logs and metrics (not reversible without the key)."""
    return "s-" + hmac.new(_KEY, uid.encode("ascii", "replace"), hashlib.sha256).hexdigest()[:16]


def quiet_third_party() -> None:
    """Stop pynetdicom and pydicom from logging identifiers or element values."""
    try:
        from pynetdicom import _config as pn_config

        pn_config.LOG_REQUEST_IDENTIFIERS = False
        pn_config.LOG_RESPONSE_IDENTIFIERS = False
        pn_config.LOG_HANDLER_LEVEL = "none"
    except ImportError:  # pragma: no cover
        pass
    for name in ("pynetdicom", "pydicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # pydicom warns with values ("Invalid value for VR ..."); never let them through
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        import pydicom

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    except ImportError:  # pragma: no cover
        pass


class RedactThirdParty(logging.Filter):
    """Handler filter: records of pynetdicom/pydicom/highdicom keep level and logger name but not
    their text or traceback, which can quote received values (e.g. pynetdicom's "Invalid 'Affected
    SOP Instance UID' value '<uid>'" at ERROR when a peer sends a malformed command)."""

    PREFIXES = ("pynetdicom", "pydicom", "highdicom")

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite third-party records in place; always lets the record through."""
        if record.name.split(".", 1)[0] in self.PREFIXES:
            exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
            record.msg = "third-party message withheld (may quote received values)" + (f" [{exc}]" if exc else "")
            record.args = None
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def setup_logging(log_file: Path | None, level: str = "INFO") -> None:
    """Configure the root logger (stderr + optional rotating file) and silence PHI-prone loggers."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    stream.addFilter(RedactThirdParty())
    root.addHandler(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=20_000_000, backupCount=5)
        fh.setFormatter(fmt)
        fh.addFilter(RedactThirdParty())
        root.addHandler(fh)
    root.setLevel(level)
    quiet_third_party()
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
