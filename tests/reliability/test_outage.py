"""Outages of the node's peers: Triton (down at start, down while jobs wait, a model's backend process
killed) and the PACS (Orthanc down while results are due). Jobs and results wait - persisted - and
complete once the peer is back; nothing is lost and nothing is delivered twice.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Orthanc, make_ct_series, peer_env, storescu, wait_for
from tests.reliability.conftest import FixedPortTriton, NodeUnderTest, report

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def job(node: NodeUnderTest, series_uid: str) -> tuple[str, int, str]:
    """(state, attempts, reason) of the series' latest job."""
    rows = node.query("SELECT state, attempts, reason FROM jobs WHERE series_instance_uid=? ORDER BY job_id DESC LIMIT 1",
                      (series_uid,))
    return tuple(rows[0]) if rows else ("", 0, "")  # type: ignore[return-value]


def send_series(node: NodeUnderTest, folder: Path, seed: int) -> Any:
    s = make_ct_series(folder, n=24, rows=96, cols=96, seed=seed)
    r = storescu(list(s.files), node.port)
    assert r.returncode == 0, r.stderr[-2000:]
    return s


def test_triton_outages_jobs_wait_and_complete(tmp_path: Path, start_node, own_triton: FixedPortTriton) -> None:  # type: ignore[no-untyped-def]
    figures: dict[str, Any] = {}
    # 1. Triton is down when the node starts: the node still starts and receives
    node = start_node(triton=own_triton)
    a = send_series(node, tmp_path / "a", 1)
    assert wait_for(lambda: job(node, a.series_uid)[1] >= 2, 60, 0.2), job(node, a.series_uid)
    state, attempts, reason = job(node, a.series_uid)
    assert state in ("queued", "processing") and reason.startswith("transient"), (state, reason)
    figures["down_at_start"] = {"attempts_while_down": attempts, "reason": reason.splitlines()[0]}
    t0 = time.monotonic()
    own_triton.start()
    assert wait_for(lambda: job(node, a.series_uid)[0] == "done", 120, 0.2), job(node, a.series_uid)
    figures["down_at_start"]["done_s_after_triton_up"] = round(time.monotonic() - t0, 1)

    # 2. Triton goes away while the node runs, and comes back
    own_triton.stop()
    b = send_series(node, tmp_path / "b", 2)
    assert wait_for(lambda: job(node, b.series_uid)[1] >= 2, 60, 0.2), job(node, b.series_uid)
    assert job(node, b.series_uid)[0] in ("queued", "processing")
    t0 = time.monotonic()
    own_triton.start()
    assert wait_for(lambda: job(node, b.series_uid)[0] == "done", 120, 0.2), job(node, b.series_uid)
    figures["down_while_running"] = {"attempts": job(node, b.series_uid)[1],
                                     "done_s_after_triton_up": round(time.monotonic() - t0, 1)}

    # 3. the model's backend process dies (the model fails; Triton still says ready and does not
    #    restart it): the job waits as transient until Triton is restarted, then completes
    stubs = own_triton.stubs()
    assert stubs, "no python backend stub found"
    for p in stubs:
        p.kill()
    c = send_series(node, tmp_path / "c", 3)
    assert wait_for(lambda: job(node, c.series_uid)[1] >= 2, 60, 0.2), job(node, c.series_uid)
    state, attempts, reason = job(node, c.series_uid)
    assert state in ("queued", "processing") and reason.startswith("transient"), (state, reason[:500])
    own_triton.stop()
    t0 = time.monotonic()
    own_triton.start()
    assert wait_for(lambda: job(node, c.series_uid)[0] == "done", 120, 0.2), job(node, c.series_uid)
    figures["model_backend_killed"] = {"attempts": job(node, c.series_uid)[1], "reason_while_failing": reason.splitlines()[0][:120],
                                       "done_s_after_triton_restart": round(time.monotonic() - t0, 1)}
    assert node.alive()
    assert node.query("SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'superseded')")[0][0] == 0
    report("outage_triton", figures)


def restart_orthanc(old: Orthanc) -> Orthanc:
    """Orthanc again on the same ports and storage (its config file stays in the workdir)."""
    log = open(old.workdir / "orthanc.log", "ab")
    proc = subprocess.Popen(["Orthanc", str(old.workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=peer_env(), cwd=str(old.workdir))
    log.close()
    new = Orthanc(proc, old.dicom_port, old.http_port, old.ae_title, old.workdir)
    assert wait_for(lambda: new.rest("GET", "/system", timeout=5), 60, 0.2), "Orthanc did not restart"
    return new


def test_pacs_down_results_are_delivered_once_after_it_returns(tmp_path: Path, start_node, triton_server) -> None:  # type: ignore[no-untyped-def]
    orthanc = Orthanc.start(tmp_path / "orthanc")
    try:
        node = start_node(triton=triton_server, pacs=(orthanc.ae_title, orthanc.dicom_port))
        orthanc.stop()  # the PACS is down while results are due
        series = [send_series(node, tmp_path / f"s{i}", 10 + i) for i in range(3)]
        assert wait_for(lambda: all(job(node, s.series_uid)[0] == "done" for s in series), 120, 0.2)
        assert wait_for(lambda: node.query("SELECT MIN(attempts) FROM outbox")[0][0] >= 2, 60, 0.2), \
            node.query("SELECT state, attempts, last_error FROM outbox")
        pending = node.query("SELECT COUNT(*) FROM outbox WHERE state='pending'")[0][0]
        assert pending == 2 * len(series)
        # ... and the node restarts meanwhile: the outbox is durable
        node.proc.stop()
        node.restart()
        t0 = time.monotonic()
        orthanc = restart_orthanc(orthanc)
        assert wait_for(lambda: node.query("SELECT COUNT(*) FROM outbox WHERE state='sent'")[0][0] == 2 * len(series),
                        120, 0.2), node.query("SELECT state, attempts, last_error FROM outbox")
        delivered_s = time.monotonic() - t0
        stats = orthanc.rest("GET", "/statistics")
        assert int(stats["CountInstances"]) == 2 * len(series), stats
        for s in series:
            found = orthanc.rest("POST", "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": s.study_uid},
                                                          "Expand": True})
            modalities = sorted(x["MainDicomTags"]["Modality"] for x in found)
            assert modalities == ["SEG", "SR"], modalities
        attempts = [r[0] for r in node.query("SELECT attempts FROM outbox")]
        report("outage_pacs", {"results": 2 * len(series), "attempts_max": max(attempts),
                               "delivered_s_after_pacs_up": round(delivered_s, 1)})
    finally:
        orthanc.stop()


def test_a_crashed_model_backend_counts_as_transient() -> None:
    """gRPC reports a dead python-backend stub as INTERNAL (HTTP: 500): retry, do not fail the job."""
    from tritonclient.utils import InferenceServerException

    from dicomnode.infer.client import _is_transient

    assert _is_transient(InferenceServerException("Stub process 'body_0_0' is not healthy.", status="StatusCode.INTERNAL"))
    # a restarting Triton knows the model but has not loaded it yet: wait; a model it does not know: fail
    assert _is_transient(InferenceServerException("Request for unknown model: 'body' has no available versions",
                                                  status="StatusCode.NOT_FOUND"))
    assert not _is_transient(InferenceServerException("Request for unknown model: 'nope' is not found",
                                                      status="StatusCode.NOT_FOUND"))
    assert not _is_transient(InferenceServerException("unexpected shape for input 'INPUT'", status="StatusCode.INVALID_ARGUMENT"))
