"""Composition root: builds every service of a node from the config, nothing else does.

``Node(cfg)`` opens the shared resources (database, spool) and registers the services in
:meth:`Node._register_services` - the ONE place to add a service (workers, outbox sender, web
status page, local Triton...). A service is anything with ``start()`` and ``stop()``; services
start in registration order and stop in reverse order.

    node = Node(load_config("node.toml"))
    node.start()      # raises OSError when the DICOM port cannot be bound, ConfigError on bad TLS files
    ...
    node.stop()
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from dicomnode.config import Config
from dicomnode.net.scp import StorageSCP, index_orphans
from dicomnode.ops.logs import load_or_create_key, set_hash_key, setup_logging
from dicomnode.series.assembly import CompletionMonitor
from dicomnode.store.db import SqliteDatabase, sqlite_path
from dicomnode.store.spool import Spool

LOG = logging.getLogger("dicomnode.app")


class Service(Protocol):
    """What the node runs: started once, stopped once."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RegisteredService:
    """A named service of the node."""

    name: str
    service: Service


def init_logging(cfg: Config, *, to_file: bool = True) -> None:
    """PHI-free logging for ``cfg``: the series-hash key (env var named in the config, else a
    per-install key in ``data_dir``) and the log file under ``data_dir``."""
    secret = cfg.secret(cfg.logging.hash_key_env)
    set_hash_key(secret.encode() if secret else load_or_create_key(cfg.data_dir / "log-hash.key"))
    setup_logging(cfg.data_dir / cfg.logging.file if to_file else None, cfg.node.log_level)


class Node:
    """A running dicomnode: shared resources + registered services."""

    def __init__(self, cfg: Config) -> None:
        """Open the database and spool under ``cfg.data_dir`` and register the services.

        Raises ``sqlite3.Error`` / ``OSError`` when the data directory is unusable and ConfigError
        when TLS files cannot be loaded.
        """
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = SqliteDatabase(sqlite_path(cfg), synchronous="NORMAL")
        self.spool = Spool(cfg.data_dir / "spool", quota_bytes=cfg.node.quota_bytes,
                           min_free_bytes=cfg.node.min_free_bytes, used_bytes=self.db.total_bytes,
                           fsync=cfg.node.fsync)
        self.services: list[RegisteredService] = []
        self._started: list[RegisteredService] = []
        self._lock = threading.Lock()
        self.completion = CompletionMonitor(cfg, self.db)
        self.scp = StorageSCP(cfg, self.db, self.spool, on_release=self.completion.notify)
        self._register_services()

    def _register_services(self) -> None:
        """Every service the node runs, in start order. Add new services here."""
        from dicomnode.node_services import register_processing

        register_processing(self)  # inference (local Triton), outbox sender, workers, status page, metrics
        self.add_service("completion", self.completion)
        self.add_service("scp", self.scp)

    def add_service(self, name: str, service: Service) -> None:
        """Register ``service``; if the node is already running it is started now."""
        reg = RegisteredService(name, service)
        with self._lock:
            self.services.append(reg)
            running = bool(self._started)
        if running:
            service.start()
            with self._lock:
                self._started.append(reg)

    def service(self, name: str) -> Service:
        """The service registered as ``name``; raises KeyError."""
        for reg in self.services:
            if reg.name == name:
                return reg.service
        raise KeyError(name)

    def start(self) -> None:
        """Recover from a crash (temp files, stale jobs), then start every service in order.

        If a service fails to start, those already started are stopped and the error propagates.
        """
        removed = self.spool.clean_temp()
        indexed = index_orphans(self.db, self.spool)
        requeued = self.db.requeue_stale_jobs()
        if removed or requeued or indexed:
            LOG.info("recovered after restart: %d temp file(s) removed, %d spool file(s) re-indexed, "
                     "%d job(s) requeued", removed, indexed, requeued)
        self.completion.check_once()
        for reg in list(self.services):
            try:
                reg.service.start()
            except BaseException:
                LOG.error("service %s failed to start", reg.name)
                self.stop()
                raise
            with self._lock:
                self._started.append(reg)

    def stop(self) -> None:
        """Stop the started services in reverse order (errors are logged, not raised), close the DB."""
        with self._lock:
            started, self._started = list(self._started), []
        for reg in reversed(started):
            try:
                reg.service.stop()
            except Exception:
                LOG.exception("service %s failed to stop cleanly", reg.name)
        self.db.close()
