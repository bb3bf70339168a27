"""A real Orthanc receives SEG and SR through the outbox; Orthanc killed mid-send (SIGKILL by PID)
and started again, and the node's sender restarted meanwhile, still gets everything exactly once."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.config import OutboxConfig, PeerConfig, ResultsConfig
from dicomnode.infer.models import Prediction
from dicomnode.net.scu import StoreSCU
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import ModelUsed, ReportFindings, build_sr, measure_predictions
from dicomnode.store.outbox import DEAD, SENT, Outbox, Sender, SqliteOutboxStore
from tests.dicom_synth import ellipsoid, make_series, manifest, source_volume
from tests.peers import Orthanc, peer_env, wait_for

N_SERIES = 20


def _results() -> list[pydicom.Dataset]:
    out = []
    shape = (16, 64, 64)
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(shape, (6, 24, 26), (5, 14, 15))] = 1
    lab[ellipsoid(shape, (9, 40, 40), (4, 10, 12))] = 2
    for _ in range(N_SERIES):
        src = make_series(shape=shape)
        vol = source_volume(src)
        preds = [Prediction(vol.with_array(lab), manifest())]
        seg = build_seg(src, preds, ResultsConfig())
        sr = build_sr(src, seg, ReportFindings(segments=measure_predictions(preds, vol),
                                               models=(ModelUsed("organs", "3"),)), ResultsConfig())
        out += [seg, sr]
    return out


def _restart(old: Orthanc) -> Orthanc:
    """Start Orthanc again on the same ports and storage (its config file is in the workdir)."""
    log = open(old.workdir / "orthanc.log", "ab")
    proc = subprocess.Popen(["Orthanc", str(old.workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=peer_env(), cwd=str(old.workdir))
    log.close()
    new = Orthanc(proc, old.dicom_port, old.http_port, old.ae_title, old.workdir)
    assert wait_for(lambda: _count(new) is not None, 60, 0.2), "Orthanc did not restart"
    return new


def _count(o: Orthanc) -> int | None:
    try:
        return int(o.rest("GET", "/statistics", timeout=5)["CountInstances"])
    except Exception:  # noqa: BLE001 - not up (yet)
        return None


def test_orthanc_killed_mid_send_gets_everything_once(tmp_path: Path) -> None:
    results = _results()
    expected = sorted(str(ds.SOPInstanceUID) for ds in results)
    orthanc = Orthanc.start(tmp_path / "orthanc")
    try:
        peer = PeerConfig(name="pacs", ae_title=orthanc.ae_title, port=orthanc.dicom_port, receives_results=True)
        cfg = OutboxConfig(backoff_base_s=0.2, backoff_max_s=1.0)
        db = tmp_path / "node" / "state.sqlite3"
        outbox = Outbox(SqliteOutboxStore(db), tmp_path / "node" / "outbox", cfg)
        for ds in results:
            outbox.enqueue(ds, "pacs", kind="seg" if ds.Modality == "SEG" else "sr")
        sender = Sender(outbox, [peer], StoreSCU("DICOMNODE", timeout_s=5), poll_s=0.05, batch=4)
        sender.start()
        try:
            assert wait_for(lambda: outbox.counts()[SENT] >= 4, 60, 0.005), "nothing arrived"
            orthanc.proc.kill()  # SIGKILL by PID, mid-send
            orthanc.proc.wait()
            got_before = outbox.counts()[SENT]
            assert got_before < len(results), "the kill came after everything was sent"
            assert wait_for(lambda: any(e.attempts >= 1 and e.state != SENT for e in outbox.list()), 30, 0.05)
        finally:
            sender.stop()  # the node goes down too
        outbox.close()

        orthanc = _restart(orthanc)
        outbox = Outbox(SqliteOutboxStore(db), tmp_path / "node" / "outbox", cfg)  # node restarted
        sender = Sender(outbox, [peer], StoreSCU("DICOMNODE", timeout_s=5), poll_s=0.05, batch=16)
        sender.start()
        try:
            assert wait_for(lambda: outbox.counts()[SENT] == len(results), 120, 0.1), outbox.counts()
        finally:
            sender.stop()
        assert outbox.counts()[DEAD] == 0
        assert any(e.attempts > 1 for e in outbox.list()), "no entry needed a retry"
        ids = orthanc.rest("GET", "/instances")
        assert len(ids) == len(results)  # one copy of each
        stored = sorted(orthanc.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in ids)
        assert stored == expected
        seg = next(ds for ds in results if ds.Modality == "SEG")
        one = orthanc.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": str(seg.SOPInstanceUID)}})
        raw = orthanc.rest("GET", f"/instances/{one[0]}/file")
        back = pydicom.dcmread(__import__("io").BytesIO(raw))
        assert back.PixelData == seg.PixelData and back.NumberOfFrames == seg.NumberOfFrames
        outbox.close()
    finally:
        orthanc.stop()

