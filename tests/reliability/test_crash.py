"""Crashes: the node is killed with SIGKILL at random points during ingest, processing and sending.

Each round takes a fresh CT series through a real node (pipeline: the ``body`` model on a real
Triton over gRPC; results to a real Orthanc as the PACS) and kills the node at a random moment of
one phase, chosen round-robin:

- ``ingest``     while dcmtk storescu is sending; after the restart the PACS re-sends the series
                 (what a PACS does with instances it got no answer for);
- ``processing`` while the series' job is ``processing``;
- ``sending``    while the outbox holds the series' results (pending) or right after they went out.

After every kill: every instance storescu got a success status for is in the spool and the database
and reads back. At the end: every series is ``done``, no job is left queued/processing, the outbox
has nothing pending or dead, and Orthanc holds exactly one SEG and one SR per series (deterministic
UIDs make re-processing replace), the SEG referencing every slice of its series.

CI runs 3 rounds (one per phase); ``DICOMNODE_NIGHTLY=1`` runs 21 (``DICOMNODE_CRASH_ROUNDS``
overrides, ``DICOMNODE_CRASH_SEED`` picks the random kill points).
"""
from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.peers import Orthanc, make_ct_series, peer_env, storescu, wait_for
from tests.reliability.conftest import NodeUnderTest, report, sized, storescu_outcomes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHASES = ("ingest", "processing", "sending")
ROUNDS = int(os.environ.get("DICOMNODE_CRASH_ROUNDS") or sized(3, 21))
SEED = int(os.environ.get("DICOMNODE_CRASH_SEED") or 20261122)
SLICES = sized(40, 80)
SIZE = 256  # rows = columns: a 205 mm field of view keeps processing long enough to be hit
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def acknowledged_present(node: NodeUnderTest, uids: list[str]) -> None:
    """Every UID is indexed and its spool file reads back with the right SOP Instance UID."""
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    lost = [u for u in uids if u not in rows]
    assert not lost, f"{len(lost)} acknowledged instance(s) lost after SIGKILL"
    for u in uids:
        assert pydicom.dcmread(node.data_dir / "spool" / rows[u], stop_before_pixels=True).SOPInstanceUID == u


def job_state(node: NodeUnderTest, series_uid: str) -> str:
    rows = node.query("SELECT state FROM jobs WHERE series_instance_uid=? ORDER BY job_id DESC LIMIT 1", (series_uid,))
    return rows[0][0] if rows else ""


def outbox_states(node: NodeUnderTest) -> dict[str, int]:
    """Outbox entries by state (rows are per result object and destination)."""
    try:
        return dict(node.query("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
    except Exception:  # noqa: BLE001 - the table appears with the first result
        return {}


def last_job_s(node: NodeUnderTest) -> float:
    """Duration of the latest finished job (its recorded stage timings), 0.5 s before there is one."""
    import json

    rows = node.query("SELECT timings_json FROM jobs WHERE state='done' ORDER BY job_id DESC LIMIT 1")
    return float(json.loads(rows[0][0]).get("total_s", 0.5)) if rows else 0.5


def orthanc_results(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """Modality -> SOP Instance UIDs of the results Orthanc holds for a study."""
    found = orthanc.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                                  "Expand": True})
    out: dict[str, list[str]] = {}
    for inst in found:
        tags = orthanc.rest("GET", f"/instances/{inst['ID']}/simplified-tags")
        out.setdefault(tags.get("Modality", "?"), []).append(tags["SOPInstanceUID"])
    return out


def test_sigkill_at_random_points_loses_nothing_and_results_arrive_once(tmp_path: Path, start_node, triton_server) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    with Orthanc.start(tmp_path / "orthanc", extra={"OverwriteInstances": True}) as orthanc:
        node = start_node(triton=triton_server, pacs=(orthanc.ae_title, orthanc.dicom_port), quiet_period_s=1.0)
        rounds = []
        series_all = []
        t_start = time.monotonic()
        for i in range(ROUNDS):
            phase = PHASES[i % len(PHASES)]
            s = make_ct_series(tmp_path / f"ct{i}", n=SLICES, rows=SIZE, cols=SIZE, seed=i,
                               patient_name="CRASH^ROUND", patient_id=f"CRASH-{i}")
            series_all.append(s)
            files = list(s.files)
            delay = 0.0
            acked: list[str] = []
            if phase == "ingest":
                args = ["storescu", "-v", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                        *map(str, files)]
                proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=peer_env())
                # kill at a random point of the transfer: once k of the instances are stored
                k = rng.randint(1, len(files) // 2)
                t_kill = time.monotonic()
                wait_for(lambda: node.query("SELECT COUNT(*) FROM instances WHERE series_instance_uid=?",
                                            (s.series_uid,))[0][0] >= k, 30, 0.001)
                node.proc.kill()
                delay = time.monotonic() - t_kill
                _, err = proc.communicate(timeout=60)
                outcome = storescu_outcomes(files, err)
                acked = [u for u, o in zip(s.sop_uids, outcome) if o == "Success"]
                assert len(acked) < len(files), "the kill came too late to interrupt ingest"
            else:
                r = storescu(files, node.port)
                acked = [u for u, o in zip(s.sop_uids, storescu_outcomes(files, r.stderr)) if o == "Success"]
                assert len(acked) == len(files), r.stderr[-2000:]
                if phase == "processing":
                    assert wait_for(lambda: job_state(node, s.series_uid) in ("processing", "done"), 60, 0.002)
                    delay = rng.uniform(0.0, 0.8 * last_job_s(node))
                else:
                    # this series' SEG + SR are queued (result UIDs are deterministic: 2 rows per series)
                    assert wait_for(lambda: sum(outbox_states(node).values()) >= 2 * len(series_all), 90, 0.005), \
                        (job_state(node, s.series_uid), outbox_states(node))
                    delay = rng.uniform(0.0, 0.05)
                time.sleep(delay)
                node.proc.kill()
            acknowledged_present(node, acked)
            rounds.append({"phase": phase, "delay_s": round(delay, 3), "acked_before_kill": len(acked),
                           "job_at_kill": job_state(node, s.series_uid), "outbox_at_kill": outbox_states(node)})
            node.restart()
            if phase == "ingest":  # the PACS re-sends what it got no answer for (here: the whole series)
                r = storescu(files, node.port)
                assert storescu_outcomes(files, r.stderr) == ["Success"] * len(files), r.stderr[-2000:]

        # everything settles: every series done, nothing stuck, results delivered exactly once
        def settled() -> bool:
            states = [job_state(node, s.series_uid) for s in series_all]
            box = outbox_states(node)
            return all(st == "done" for st in states) and not box.get("pending") and not box.get("dead")
        assert wait_for(settled, 180, 0.5), ([job_state(node, s.series_uid) for s in series_all], outbox_states(node))
        stuck = node.query("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'processing')")[0][0]
        assert stuck == 0
        assert outbox_states(node) == {"sent": 2 * len(series_all)}, outbox_states(node)
        per_series = []
        for s in series_all:
            got = orthanc_results(orthanc, s.study_uid)
            assert len(got.get("SEG", [])) == 1 and len(got.get("SR", [])) == 1, got
            assert set(got) <= {"SEG", "SR"}, got
            seg_id = orthanc.rest("POST", "/tools/lookup", got["SEG"][0].encode())[0]["ID"]
            seg = orthanc.rest("GET", f"/instances/{seg_id}/tags?simplify")
            refs = {r["ReferencedSOPInstanceUID"] for r in seg["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"]}
            assert refs == set(s.sop_uids), f"SEG references {len(refs)} of {len(s.sop_uids)} slices"
            per_series.append({"seg": 1, "sr": 1, "seg_refs": len(refs)})
        jobs_total = node.query("SELECT COUNT(*) FROM jobs")[0][0]
        hits = {"ingest": sum(1 for r in rounds if r["phase"] == "ingest"),
                "processing": sum(1 for r in rounds if r["phase"] == "processing" and r["job_at_kill"] == "processing"),
                "sending": sum(1 for r in rounds if r["phase"] == "sending" and r["outbox_at_kill"].get("pending"))}
        report("crash", {"rounds": len(rounds), "kills_inside_the_phase": hits, "seed": SEED, "slices": SLICES, "kills": rounds,
                         "jobs_total": jobs_total, "series": len(series_all), "wall_s": round(time.monotonic() - t_start, 1),
                         "orthanc": per_series})


def test_sigkill_of_a_node_with_local_triton_leaves_no_orphaned_server(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    """``triton.url = "local"``: the node's own Triton server dies with the node, even on SIGKILL
    (an orphan would hold its ports and ~0.5-1 GB, and every restart would add one)."""
    import psutil

    from tests.triton_fixture import VENV

    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    extra = '[triton]\nurl = "local"\nprotocol = "grpc"\n\n[[pipelines]]\nname = "ct"\nmodalities = ["CT"]\nmodels = ["body"]\n'
    node = start_node(extra=extra, timeout=180)
    children = psutil.Process(node.proc.proc.pid).children(recursive=True)
    assert any("tritonserver" in c.name() for c in children), [c.name() for c in children]
    node.proc.kill()

    def gone() -> bool:
        return not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert wait_for(gone, 30, 0.2), [(c.pid, c.name()) for c in children if c.is_running()]
