"""The worker pool on a real SQLite database: outcomes recorded, retries backed off, jobs parked.

The pipeline is replaced by runner functions here (the pool takes ``runner=``); run_series itself
is tested in tests/integration/test_pipeline_flow.py and end to end in tests/e2e.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dicomnode.config import parse_config
from dicomnode.ops.metrics import NodeMetrics
from dicomnode.ops.web import status_snapshot
from dicomnode.pipeline import JobOutcome, PipelineContext
from dicomnode.store.db import SqliteDatabase
from dicomnode.store.records import InstanceMeta, Job
from dicomnode.worker import WorkerPool, backoff_s


def _series(db: SqliteDatabase, uid: str, n: int = 3) -> int:
    for i in range(n):
        db.add_instance(InstanceMeta(
            sop_instance_uid=f"{uid}.{i + 1}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid=uid, study_instance_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="CT", path=f"x/{uid}/{i}.dcm", size_bytes=1000, instance_number=i + 1))
    job = db.complete_series(uid, 1, "test")
    assert job is not None
    return job


@pytest.fixture()
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = SqliteDatabase(tmp_path / "state.sqlite3")
    yield d
    d.close()


def _pool(db: SqliteDatabase, runner, workers: int = 1, **kw) -> WorkerPool:  # type: ignore[no-untyped-def]
    cfg = parse_config({"node": {"workers": workers}, "outbox": {"backoff_base_s": 30.0}})
    ctx = PipelineContext(cfg=cfg, client=None, source=None, sink=None)  # type: ignore[arg-type]
    return WorkerPool(cfg, db, ctx, runner=runner, poll_s=0.02, **kw)


def _wait(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_outcomes_are_recorded_with_timings_and_reasons(db: SqliteDatabase) -> None:
    outcomes = {
        "1.9.1": JobOutcome("done", timings=(("convert", 0.5), ("infer:body", 1.5)), compute=(("infer:body", 1.2),)),
        "1.9.2": JobOutcome("quarantined", reason="geometry:gap", timings=(("convert", 0.1),)),
        "1.9.3": JobOutcome("failed", reason="internal:KeyError", detail="Traceback ...\nKeyError: 'x'"),
    }
    ids = {uid: _series(db, uid) for uid in outcomes}
    metrics = NodeMetrics()
    pool = _pool(db, lambda job, ctx: outcomes[job.series_instance_uid], metrics=metrics).start()
    try:
        _wait(lambda: all(db.get_job(i).state != "queued" and db.get_job(i).state != "processing" for i in ids.values()))
    finally:
        pool.stop(5)
    done, quarantined, failed = (db.get_job(ids[u]) for u in outcomes)
    assert done.state == "done" and json.loads(done.timings_json)["stages"] == [["convert", 0.5], ["infer:body", 1.5]]
    assert json.loads(done.timings_json)["compute"] == [["infer:body", 1.2]]
    assert quarantined.state == "quarantined" and quarantined.reason == "geometry:gap"
    assert failed.state == "failed" and failed.reason.startswith("internal:KeyError\nTraceback")
    assert db.get_series("1.9.1").state == "done" and db.get_series("1.9.2").state == "quarantined"
    cfg = parse_config({})
    snap = status_snapshot(cfg, db, pool)
    reasons = {f["reason"] for f in snap["recent_failures"]}
    assert reasons == {"geometry:gap", "internal:KeyError"}  # first line only: no traceback on the page
    assert snap["stage_stats"]["infer:body"]["n"] == 1
    assert all("1.9." not in json.dumps(s) for s in snap["series"])  # hashes, never UIDs
    assert metrics.jobs_finished.labels("done")._value.get() == 1


def test_transient_failure_goes_back_to_the_queue_with_backoff(db: SqliteDatabase) -> None:
    job_id = _series(db, "1.8.1")
    pool = _pool(db, lambda job, ctx: JobOutcome("retry", reason="transient:triton down")).start()
    try:
        _wait(lambda: db.get_job(job_id).attempts == 1 and db.get_job(job_id).state == "queued")
    finally:
        pool.stop(5)
    job = db.get_job(job_id)
    assert job.reason == "transient:triton down"
    assert job.not_before > time.time() + 20  # 30 s base backoff, persisted in the row
    assert db.get_series("1.8.1").state == "complete"  # not lost: still waiting for processing
    assert db.claim_job("other") is None  # not due yet
    cfg = parse_config({"outbox": {"backoff_base_s": 2.0, "backoff_max_s": 10.0}})
    assert [backoff_s(cfg, a) for a in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_stop_parks_a_running_job_and_the_next_start_requeues_it(db: SqliteDatabase) -> None:
    job_id = _series(db, "1.7.1")
    release = threading.Event()
    started = threading.Event()

    def slow(job: Job, ctx: PipelineContext) -> JobOutcome:
        started.set()
        release.wait(10)
        return JobOutcome("done")

    pool = _pool(db, slow).start()
    assert started.wait(5)
    assert pool.stop(grace_s=0.2) == 1  # still running after the grace period: parked
    assert db.get_job(job_id).state == "processing"
    release.set()
    time.sleep(0.2)
    # the parked run may still record its result; either way the job is not lost
    if db.get_job(job_id).state == "processing":
        pool2 = _pool(db, lambda job, ctx: JobOutcome("done")).start()  # requeues stale jobs first
        try:
            _wait(lambda: db.get_job(job_id).state == "done")
        finally:
            pool2.stop(5)
    assert db.get_job(job_id).state == "done"


def test_memory_budget_serialises_jobs_that_do_not_fit_together(db: SqliteDatabase) -> None:
    ids = [_series(db, f"1.6.{i}", n=10) for i in range(3)]  # 10 kB each -> 100 kB estimated
    running: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def runner(job: Job, ctx: PipelineContext) -> JobOutcome:
        with lock:
            running.append(job.job_id)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.15)
        with lock:
            running.remove(job.job_id)
        return JobOutcome("done")

    pool = _pool(db, runner, workers=3, memory_budget_bytes=150_000).start()
    try:
        _wait(lambda: all(db.get_job(i).state == "done" for i in ids))
    finally:
        pool.stop(5)
    assert peak[0] == 1  # each needs 100 kB of a 150 kB budget: one at a time despite 3 workers


def test_warm_up_builds_a_seg_and_sr_without_failing(caplog: pytest.LogCaptureFixture) -> None:
    from dicomnode.config import ResultsConfig
    from dicomnode.warmup import warm_up

    with caplog.at_level("WARNING", logger="dicomnode.warmup"):
        warm_up(ResultsConfig())
    assert not caplog.records, [r.getMessage() for r in caplog.records]
