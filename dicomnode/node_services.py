"""The processing half of a node, as services ``app.Node`` registers (see ``register_processing``):

- :class:`InferenceService` - starts the local Triton server when ``triton.url = "local"``, builds
  the inference client and checks every configured model's contract before anything runs
  (``ModelContractError`` fails startup loudly);
- :class:`SpoolSource` / :class:`NodeSink` - where a job's instances are (spool + database) and
  where results go (the durable outbox for each destination, plus a results folder when configured
  or when no peer receives results);
- :class:`FolderSink` - results into one folder (``dicomnode process``);
- :class:`MetricsServer` - Prometheus ``/metrics`` on ``web.metrics_port``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.errors import SeriesError, TransientError
from dicomnode.ops.logs import series_key
from dicomnode.pipeline import PipelineContext, ResultObject, SeriesSummary
from dicomnode.pipeline_select import check_model_repository, required_models
from dicomnode.store.records import Job

log = logging.getLogger(__name__)


class InferenceService:
    """The inference client for the pipeline; owns the local Triton server when configured.

    tritonclient's HTTP connection (geventhttpclient) is bound to the thread that made it, so
    every worker thread gets its own :class:`InferenceClient` (each with its own shared-memory
    regions). ``segment`` / ``segment_native`` delegate to the calling thread's client; before
    ``start`` (or after a failed one) they raise TransientError so jobs are retried, not lost.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.server: Any = None
        self.url = ""
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._started = False
        self._unchecked: list[str] = []  # models whose contract check waits for a remote server

    def _new_client(self) -> Any:
        from dicomnode.infer.client import InferenceClient

        class TimedClient(InferenceClient):
            """Counts the seconds spent inside Triton requests (model compute + transport)."""

            compute_s = 0.0

            def infer(self, model: str, x: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return super().infer(model, x, **kwargs)
                finally:
                    self.compute_s += time.perf_counter() - t0

        return TimedClient.from_config(self.cfg.triton, self.url)

    def take_compute_s(self) -> float:
        """Seconds this thread's client spent in Triton requests since the last call (then reset)."""
        client = getattr(self._local, "client", None)
        if client is None:
            return 0.0
        spent, client.compute_s = client.compute_s, 0.0
        return float(spent)

    def start(self) -> None:
        """Check the model repository, start local Triton if needed, connect, check contracts.

        Raises ModelContractError (a configured model is missing or disagrees with its manifest)
        and whatever LocalTriton raises when the server cannot start. A *remote* server that is
        unreachable is not fatal: the contract check runs on first use (jobs wait until then).
        """
        models = check_model_repository(self.cfg)
        t = self.cfg.triton
        if t.url == "local":
            from dicomnode.infer.server import local_server_from_config

            self.server = local_server_from_config(self.cfg)
            self.server.start()
            self.url = self.server.grpc_url if t.protocol == "grpc" else self.server.http_url
        else:
            self.url = t.url
        try:
            probe = self._new_client()
            try:
                probe.check_contract(list(models))
            finally:
                probe.close()
        except TransientError:
            if self.server is not None:  # our own server is up but does not answer: fail loudly
                self.stop()
                raise
            # a remote server that is down must not keep the node from receiving: check on first use
            log.warning("remote inference server unreachable at start: model check deferred, jobs wait for it")
            self._unchecked = list(models)
        except BaseException:
            self.stop()
            raise
        self._started = True
        log.info("inference ready (%s Triton, %d model(s))", "local" if self.server else "remote", len(models))

    def stop(self) -> None:
        """Close the clients and stop the local server (if this service started one)."""
        self._started = False
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - shutting down; a client of another thread may refuse
                log.debug("closing an inference client failed", exc_info=True)
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _ready(self) -> Any:
        if not self._started:
            raise TransientError("inference not started")
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        if self._unchecked:  # TransientError while the server is still down: the job is retried
            client.check_contract(list(self._unchecked))
            self._unchecked = []
            log.info("remote inference server reachable: model contracts checked")
        return client

    def segment(self, volume: Any, model: str) -> Any:
        """See ``InferenceClient.segment``."""
        return self._ready().segment(volume, model)

    def segment_native(self, volume: Any, model: str) -> Any:
        """See ``InferenceClient.segment_native``."""
        return self._ready().segment_native(volume, model)

    def manifest(self, model: str) -> Any:
        """See ``InferenceClient.manifest``."""
        return self._ready().manifest(model)


class SpoolSource:
    """A job's instance files: the database's instance rows, resolved in the spool."""

    def __init__(self, db: Any, spool: Any) -> None:
        self.db = db
        self.spool = spool

    def paths(self, job: Job) -> list[Path]:
        """Spool paths of the series' instances; raises SeriesError("empty_series")."""
        metas = self.db.series_instances(job.series_instance_uid)
        if not metas:
            raise SeriesError("empty_series", kind="inconsistent", detail="no stored instances")
        return [self.spool.abspath(m.path) for m in metas]


class DirectorySource:
    """The files of one series folder (``dicomnode process``)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)

    def paths(self, job: Job) -> list[Path]:
        """The folder's files; raises SeriesError("empty_series") when there are none."""
        if not self.files:
            raise SeriesError("empty_series", kind="inconsistent", detail="no files")
        return self.files


def write_results(folder: Path, objects: list[ResultObject], summary: SeriesSummary | None,
                  extra: dict[str, Any] | None = None, encoded: list[bytes] | None = None) -> list[Path]:
    """Write ``<kind>.dcm`` for each object (+ ``summary.json``) atomically into ``folder``.

    ``encoded``: the objects' file bytes when already encoded (``outbox.encode``), in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, obj in enumerate(objects):
        final = folder / f"{obj.kind}.dcm"
        tmp = folder / f".{obj.kind}.dcm.tmp"
        if encoded is not None:
            tmp.write_bytes(encoded[i])
        else:
            obj.dataset.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, final)
        written.append(final)
    if summary is not None or extra:
        doc = {**(summary.to_json() if summary is not None else {}), **(extra or {})}
        tmp = folder / ".summary.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, folder / "summary.json")
        written.append(folder / "summary.json")
    return written


class FolderSink:
    """Results into one folder (``dicomnode process``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.written: list[Path] = []

    def deliver(self, job: Job, objects: list[ResultObject], summary: SeriesSummary | None) -> None:
        """Write the objects (and summary) into the folder; raises OSError."""
        self.written.extend(write_results(self.folder, objects, None))


def result_destinations(cfg: Config, objects_dest: tuple[str, ...]) -> tuple[str, ...]:
    """The peers results go to: the pipeline's destinations, else every peer with receives_results."""
    return objects_dest or tuple(p.name for p in cfg.peers if p.receives_results)


def results_folder(cfg: Config) -> Path | None:
    """The results folder (``results.write_dir`` under data_dir; "results" when no peer receives)."""
    if cfg.results.write_dir:
        return cfg.data_dir / cfg.results.write_dir
    if not any(p.receives_results for p in cfg.peers):
        return cfg.data_dir / "results"
    return None


class NodeSink:
    """Results of the running node: durable outbox entries per destination + the results folder."""

    def __init__(self, cfg: Config, outbox: Any) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.folder = results_folder(cfg)

    def deliver(self, job: Job, objects: list[ResultObject], summary: SeriesSummary | None) -> None:
        """Queue every object for every destination (durably), write the results folder copy.

        Raises TransientError when the outbox cannot take the objects now (the job is retried).
        """
        from dicomnode.store.outbox import encode

        dests = {d for obj in objects for d in result_destinations(self.cfg, obj.destinations)}
        if dests and self.outbox is None:
            raise TransientError("results have destinations but the node has no outbox")
        encoded = [encode(obj.dataset) for obj in objects]  # once, for the folder and every destination
        if self.folder is not None:
            try:
                write_results(self.folder / series_key(job.series_instance_uid), objects, summary, encoded=encoded)
            except OSError as exc:
                raise TransientError(f"results folder not writable: {type(exc).__name__}") from exc
        for obj, data in zip(objects, encoded):
            for dest in result_destinations(self.cfg, obj.destinations):
                self.outbox.enqueue(obj.dataset, dest, kind=obj.kind, data=data, notify=False)
        if dests:
            self.outbox.notify()  # wake the sender once: SEG + SR go out in one association


class MetricsServer:
    """``NodeMetrics`` served on ``web.host:web.metrics_port`` as a node service (behind the
    ``web.token_env`` bearer token when that variable is set, like the status page)."""

    def __init__(self, cfg: Config, metrics: Any) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.port = 0

    def start(self) -> None:
        """Bind and serve; raises OSError when the port is taken."""
        self.port = self.metrics.serve(self.cfg.web.host, self.cfg.web.metrics_port,
                                       token=self.cfg.secret(self.cfg.web.token_env) or "")
        log.info("metrics on http://%s:%d/metrics", self.cfg.web.host, self.port)

    def stop(self) -> None:
        """Stop serving."""
        self.metrics.stop()


def load_anatomy(cfg: Config) -> tuple[Any, dict[str, Any]]:
    """The atlas and the regions the pipelines use (None, {} when no pipeline uses regions).

    Raises ModelContractError / OSError (via the anatomy loaders) when they are missing.
    """
    wanted = sorted({r for pl in cfg.pipelines for r in pl.regions})
    if not any("anatomy19" in pl.models for pl in cfg.pipelines):
        return None, {}
    from dicomnode.anatomy.atlas import load_atlas
    from dicomnode.anatomy.regions import load_regions

    atlas = load_atlas(cfg.resource(cfg.anatomy.atlas_file))
    regions = load_regions(cfg.resource(cfg.anatomy.regions_dir))
    missing = [r for r in wanted if r not in regions]
    if missing:
        from dicomnode.errors import ModelContractError

        raise ModelContractError(f"configured region(s) not defined in {cfg.anatomy.regions_dir}: {', '.join(missing)}")
    return atlas, regions


def build_context(cfg: Config, client: Any, source: Any, sink: Any, progress: Any = None) -> PipelineContext:
    """The pipeline context for ``cfg`` (atlas + regions loaded once)."""
    atlas, regions = load_anatomy(cfg)
    return PipelineContext(cfg=cfg, client=client, source=source, sink=sink, atlas=atlas, regions=regions,
                           progress=progress)


__all__ = [
    "InferenceService", "SpoolSource", "DirectorySource", "FolderSink", "NodeSink", "MetricsServer",
    "write_results", "results_folder", "result_destinations", "load_anatomy", "build_context",
    "required_models", "register_processing",
]


def register_processing(node: Any) -> None:
    """Register the processing services on an ``app.Node`` (call first in ``_register_services``).

    Start order: inference (local Triton, contract check) -> outbox sender -> workers -> status
    page -> metrics; ``Node.stop`` runs them in reverse, so workers finish (or park) their jobs
    while inference is still up. Raises ModelContractError when a configured model or region is
    missing, ImportError when a peer receives results but the outbox is not available.
    """
    from dicomnode.ops.metrics import NodeMetrics
    from dicomnode.ops.web import StatusServer

    cfg = node.cfg
    metrics = NodeMetrics()
    pool = None
    if not cfg.pipelines:
        log.warning("no [[pipelines]] configured: the node stores series but processes none")
    else:
        pool = _register_pipeline(node, cfg, metrics)
    node.metrics = metrics
    outbox = getattr(node, "outbox", None)
    metrics.watch_database(node.db, pool, outbox)
    if cfg.web.enabled:
        node.web = StatusServer(cfg, node.db, pool, outbox)
        node.add_service("web", node.web)
        node.add_service("metrics", MetricsServer(cfg, metrics))


def _register_pipeline(node: Any, cfg: Config, metrics: Any) -> Any:
    """Inference, outbox sender and workers; returns the worker pool."""
    from dicomnode.worker import WorkerPool

    inference = InferenceService(cfg)
    node.add_service("inference", inference)
    outbox = None
    if any(p.receives_results for p in cfg.peers) or any(pl.destinations for pl in cfg.pipelines):
        from dicomnode.store.outbox import Outbox, Sender

        outbox = Outbox.open(cfg)
        node.add_service("sender", Sender.from_config(cfg, outbox))
    node.outbox = outbox
    ctx = build_context(cfg, inference, SpoolSource(node.db, node.spool), NodeSink(cfg, outbox))
    pool = WorkerPool(cfg, node.db, ctx, metrics=metrics)
    node.add_service("workers", pool)
    node.workers = pool
    return pool
