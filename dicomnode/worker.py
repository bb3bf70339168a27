"""The worker pool: takes durable jobs from the database and runs the pipeline on them.

- Bounded concurrency: ``node.workers`` threads (the heavy work is in Triton, numpy and
  SimpleITK, which release the GIL).
- Bounded memory: before running a job its working set is estimated from the series' stored
  bytes; a job waits while the estimates of the jobs in flight plus its own exceed the budget
  (a share of the machine's memory), unless nothing else is running.
- Every outcome is recorded with per-stage timings: ``done``, ``quarantined`` (reason),
  ``failed`` (``internal:<Type>`` + traceback in the job record), or back to ``queued`` with a
  persisted exponential backoff for transient failures (never lost, never given up).
- At start, jobs left ``processing`` by a previous run (crash, kill -9) are requeued, and the
  result writers are warmed up in the background (``warmup.py``: ~1 s less for the first series).
- ``stop()`` stops claiming, lets jobs in flight finish within the grace period; a job still
  running after that stays ``processing`` in the database and is requeued at the next start.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from dicomnode.config import Config
from dicomnode.ops.logs import series_key
from dicomnode.pipeline import JobOutcome, PipelineContext, run_series
from dicomnode.store.db import Database
from dicomnode.store.records import Job

log = logging.getLogger(__name__)

MEMORY_FACTOR = 10  # working set per stored byte: int16 pixels -> float32 volume, resamples, labels, SEG
MEMORY_SHARE = 0.6  # share of total RAM the pool may plan for


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """A recent outcome, kept in memory for the status page (no patient data)."""

    job_id: int
    series_key: str
    state: str
    reason: str
    finished_at: float
    timings: tuple[tuple[str, float], ...]


def timings_json(outcome: JobOutcome) -> str:
    """The job record's timings: ``{"stages": [[name, s], ...], "total_s": s, "compute": [[stage, s], ...]}``.

    ``compute`` is the time spent inside Triton requests during each inference stage (the rest of
    an ``infer:*`` stage is resampling, normalisation and transport on the node).
    """
    return json.dumps({"stages": [[n, round(s, 4)] for n, s in outcome.timings], "total_s": round(outcome.total_s, 4),
                       "compute": [[n, round(s, 4)] for n, s in outcome.compute]})


def backoff_s(cfg: Config, attempts: int) -> float:
    """Seconds before a transiently failed job is tried again (exponential, capped)."""
    return float(min(cfg.outbox.backoff_max_s, cfg.outbox.backoff_base_s * (2 ** max(0, attempts - 1))))


class WorkerPool:
    """``node.workers`` threads running :func:`run_series` on claimed jobs."""

    def __init__(self, cfg: Config, db: Database, ctx: PipelineContext, *, name: str = "worker",
                 poll_s: float = 0.1, metrics: Any = None,
                 runner: Callable[[Job, PipelineContext], JobOutcome] = run_series,
                 memory_budget_bytes: int | None = None) -> None:
        self.cfg = cfg
        self.db = db
        self.ctx = ctx
        self.name = name
        self.poll_s = poll_s
        self.metrics = metrics
        self._runner = runner
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Condition()
        self._in_flight: dict[int, int] = {}  # job_id -> reserved bytes
        self.budget = memory_budget_bytes or int(psutil.virtual_memory().total * MEMORY_SHARE)
        self.recent: collections.deque[FinishedJob] = collections.deque(maxlen=200)
        self.started_at = 0.0

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        """Requeue stale jobs, then start the threads."""
        n = self.db.requeue_stale_jobs(0.0)
        if n:
            log.info("requeued %d job(s) left in processing by a previous run", n)
        self.started_at = time.time()
        from dicomnode.warmup import warm_up

        threading.Thread(target=warm_up, args=(self.cfg.results,), name="warm-up", daemon=True).start()
        for i in range(self.cfg.node.workers):
            t = threading.Thread(target=self._loop, name=f"{self.name}-{i}", args=(f"{self.name}-{i}",), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wake(self) -> None:
        """Tell idle threads a job may be waiting (called when a series completes)."""
        self._wake.set()

    def stop(self, grace_s: float = 60.0) -> int:
        """Stop claiming; wait up to ``grace_s`` for jobs in flight. Returns how many were left running.

        Jobs still running are parked: they stay ``processing`` and are requeued at the next start.
        """
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + grace_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        left = sum(t.is_alive() for t in self._threads)
        if left:
            log.warning("%d job(s) still running at shutdown: parked, requeued at next start", left)
        return left

    # ---- introspection (status page, metrics) -------------------------------------------------
    def in_flight(self) -> int:
        """Jobs running now."""
        with self._lock:
            return len(self._in_flight)

    def reserved_bytes(self) -> int:
        """Memory reserved by the jobs in flight (estimate)."""
        with self._lock:
            return sum(self._in_flight.values())

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self, worker_name: str) -> None:
        while not self._stop.is_set():
            try:
                job = self.db.claim_job(worker_name)
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the pool
                log.exception("claim_job failed")
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._run(job)

    def _estimate(self, job: Job) -> int:
        rec = self.db.get_series(job.series_instance_uid)
        return int((rec.bytes if rec is not None else 0) * MEMORY_FACTOR)

    def _reserve(self, job: Job, need: int) -> None:
        with self._lock:
            while self._in_flight and sum(self._in_flight.values()) + need > self.budget:
                self._lock.wait(1.0)
            self._in_flight[job.job_id] = need

    def _release(self, job: Job) -> None:
        with self._lock:
            self._in_flight.pop(job.job_id, None)
            self._lock.notify_all()

    def _run(self, job: Job) -> None:
        self._reserve(job, self._estimate(job))
        try:
            outcome = self._runner(job, self.ctx)
        except BaseException:  # run_series never raises; a runner that does must not lose the job
            log.exception("job %s: runner raised", job.job_id)
            outcome = JobOutcome("failed", reason="internal:runner", detail="runner raised")
        finally:
            self._release(job)
        self.record(job, outcome)

    def record(self, job: Job, outcome: JobOutcome) -> None:
        """Write ``outcome`` to the job record (and metrics / recent list)."""
        tj = timings_json(outcome)
        if outcome.state == "retry":
            retry_at = time.time() + backoff_s(self.cfg, job.attempts)
            self.db.finish_job(job.job_id, "queued", outcome.reason, tj, retry_at=retry_at)
        else:
            reason = outcome.reason + ("\n" + outcome.detail if outcome.state == "failed" and outcome.detail else "")
            self.db.finish_job(job.job_id, outcome.state, reason, tj)
        self.recent.append(FinishedJob(job.job_id, series_key(job.series_instance_uid), outcome.state,
                                       outcome.reason, time.time(), outcome.timings))
        if self.metrics is not None:
            self.metrics.observe_outcome(outcome)
