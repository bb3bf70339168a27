"""The durable outbox, its Sender and the C-STORE SCU against real DICOM peers on 127.0.0.1:
dcmtk storescp (success), and pynetdicom SCPs that answer with chosen statuses, reject the
association, refuse SOP classes or stall (timeout)."""
from __future__ import annotations

import copy
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.cli import main as cli_main
from dicomnode.config import OutboxConfig, PeerConfig, ResultsConfig
from dicomnode.infer.models import Prediction
from dicomnode.net.scu import StoreSCU, classify_status
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import ModelUsed, ReportFindings, build_sr
from dicomnode.store.outbox import DEAD, PENDING, SENT, Outbox, Sender, SqliteOutboxStore
from tests.conftest import free_port
from tests.dicom_synth import ellipsoid, make_series, manifest, source_volume

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def results() -> list[pydicom.Dataset]:
    src = make_series(shape=(6, 24, 24))
    vol = source_volume(src)
    lab = ellipsoid(vol.shape, (3, 12, 12), (2, 6, 6)).astype(np.uint8)
    seg = build_seg(src, [Prediction(vol.with_array(lab), manifest(n_labels=1))], ResultsConfig())
    sr = build_sr(src, seg, ReportFindings(models=(ModelUsed("organs", "3"),)), ResultsConfig())
    return [seg, sr]


def _outbox(tmp_path: Path, **cfg: float) -> Outbox:
    return Outbox(SqliteOutboxStore(tmp_path / "state.sqlite3"), tmp_path / "outbox",
                  OutboxConfig(**cfg), rng=random.Random(7))


class StatusSCP:
    """A pynetdicom Storage SCP on 127.0.0.1 answering every C-STORE with ``status``."""

    def __init__(self, status: int = 0x0000, *, delay_s: float = 0.0, reject: str = "",
                 sop_classes: tuple[str, ...] = (SEG_CLASS, SR_CLASS)) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        self.status, self.delay_s, self.reject = status, delay_s, reject
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="TESTSCP")
        for uid in sop_classes:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        if reject == "permanent":  # pynetdicom rejects (1, 1, 7): called AE title not recognised
            ae.require_called_aet = True
        elif reject == "transient":  # pynetdicom rejects (2, 3, 2): local limit exceeded
            ae._maximum_associations = 0  # the public setter refuses 0
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _store(self, event) -> int:  # type: ignore[no-untyped-def]
        if self.delay_s:
            time.sleep(self.delay_s)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def peer(self, name: str = "pacs") -> PeerConfig:
        called = "WRONGAE" if self.reject == "permanent" else "TESTSCP"
        return PeerConfig(name=name, ae_title=called, port=self.port, receives_results=True)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory():
    started: list[StatusSCP] = []

    def make(*args, **kw) -> StatusSCP:  # type: ignore[no-untyped-def]
        scp = StatusSCP(*args, **kw)
        started.append(scp)
        return scp

    yield make
    for s in started:
        s.stop()


# ---- the outbox itself --------------------------------------------------------------------

def test_enqueue_is_durable_and_idempotent(tmp_path: Path, results) -> None:
    ob = _outbox(tmp_path)
    seg = results[0]
    a = ob.enqueue(seg, "pacs", kind="seg")
    b = ob.enqueue(seg, "pacs", kind="seg")
    c = ob.enqueue(seg, "archive", kind="seg")
    assert a.id == b.id and c.id != a.id and a.state == PENDING
    assert len(ob.list()) == 2 and len(list((tmp_path / "outbox").iterdir())) == 1  # one file, two rows
    assert pydicom.dcmread(ob.path_of(a)).SOPInstanceUID == seg.SOPInstanceUID
    ob.mark_sent(a.id)
    assert ob.enqueue(seg, "pacs", kind="seg").state == SENT  # the same object again: nothing to send
    changed = copy.deepcopy(seg)
    changed.SeriesDescription = "re-run"
    again = ob.enqueue(changed, "pacs", kind="seg")  # same UID, new content (a re-run): replaced and sent again
    assert again.id == a.id and again.state == PENDING and again.attempts == 0
    with pytest.raises(ValueError):
        bad = copy.deepcopy(seg)
        bad.SOPInstanceUID = "../../x"
        ob.enqueue(bad, "pacs")


def test_backoff_with_jitter_persists_across_restart(tmp_path: Path, results) -> None:
    ob = _outbox(tmp_path, backoff_base_s=2.0, backoff_max_s=60.0)
    e = ob.enqueue(results[1], "pacs", kind="sr")
    t0 = time.time()
    times = []
    for attempt in range(1, 8):
        at = ob.mark_retry(e.id, "no connection", now=t0)
        assert at is not None
        delay = min(60.0, 2.0 * 2 ** (attempt - 1))
        assert delay / 2 <= at - t0 <= delay + 1e-6  # exponential, capped, jittered
        times.append(at - t0)
    assert times[-1] <= 60.0 and times[0] < times[3]
    ob.close()
    reopened = _outbox(tmp_path)  # a restart: the next attempt time comes from the database
    entry = reopened.get(e.id)
    assert entry is not None and entry.attempts == 7 and entry.last_error == "no connection"
    assert reopened.due(now=t0) == [] and [d.id for d in reopened.due(now=t0 + 61)] == [e.id]


def test_old_transient_failures_are_dead_lettered(tmp_path: Path, results) -> None:
    ob = _outbox(tmp_path, max_age_s=100.0)
    e = ob.enqueue(results[1], "pacs")
    assert ob.mark_retry(e.id, "timeout", now=e.created_at + 101) is None
    dead = ob.get(e.id)
    assert dead is not None and dead.state == DEAD and "expired" in dead.last_error


def test_status_classification() -> None:
    assert classify_status(0x0000)[0] == "success" and classify_status(0xB007)[0] == "success"
    assert classify_status(None)[0] == "transient" and classify_status(0xA702)[0] == "transient"
    for status in (0xA900, 0xA9FF, 0xC000, 0xC123, 0x0122):
        assert classify_status(status)[0] == "permanent"


# ---- sending to real peers ----------------------------------------------------------------

def test_sender_delivers_to_dcmtk_storescp(tmp_path: Path, results) -> None:
    import shutil
    import subprocess

    if shutil.which("storescp") is None:
        pytest.skip("dcmtk storescp not installed")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "+B", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        peer = PeerConfig(name="pacs", ae_title="STORESCP", port=port, receives_results=True)
        scu = StoreSCU("DICOMNODE", timeout_s=10)
        assoc = scu._associate(peer, [SEG_CLASS, SR_CLASS, SEG_CLASS])
        try:
            raw = assoc.dul.socket.socket
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            proposed = sorted(str(cx.abstract_syntax) for cx in assoc.requestor.requested_contexts)
            assert proposed == sorted([SEG_CLASS, SR_CLASS])  # only the contexts needed
        finally:
            assoc.release()
        ob = _outbox(tmp_path)
        ids = [ob.enqueue(ds, "pacs").id for ds in results]
        summary = Sender(ob, [peer], scu).run_once()
        assert (summary.sent, summary.retried, summary.dead) == (2, 0, 0)
        assert all(ob.get(i).state == SENT for i in ids)  # type: ignore[union-attr]
        got = sorted(pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir())
        assert got == sorted(ds.SOPInstanceUID for ds in results)
        assert Sender(ob, [peer], scu).run_once().sent == 0  # nothing due any more
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("status,state", [(0xA700, PENDING), (0xA900, DEAD), (0xC000, DEAD), (0x0000, SENT)])
def test_statuses_become_outcomes(tmp_path: Path, results, scp_factory, status: int, state: str) -> None:
    scp = scp_factory(status)
    ob = _outbox(tmp_path)
    e = ob.enqueue(results[0], "pacs")
    Sender(ob, [scp.peer()], StoreSCU("DICOMNODE", timeout_s=5)).run_once()
    after = ob.get(e.id)
    assert after is not None and after.state == state and after.attempts == 1
    assert scp.received == [results[0].SOPInstanceUID]
    if state == PENDING:
        assert after.next_attempt_at > time.time() and "0xA700" in after.last_error


def test_association_failures(tmp_path: Path, results, scp_factory) -> None:
    ob = _outbox(tmp_path)
    scu = StoreSCU("DICOMNODE", timeout_s=5)
    # permanent rejection (result 1, source 1 service user, reason 7 called AE not recognised)
    perm = scp_factory(reject="permanent")
    e1 = ob.enqueue(results[0], "perm")
    # transient rejection (result 2, source 3 service provider presentation, reason 2 local limit)
    trans = scp_factory(reject="transient")
    e2 = ob.enqueue(results[0], "trans")
    # nobody listening
    closed = PeerConfig(name="closed", ae_title="NOBODY", port=free_port())
    e3 = ob.enqueue(results[0], "closed")
    # the peer takes CT only: SEG refused
    ct_only = scp_factory(sop_classes=("1.2.840.10008.5.1.4.1.1.2",))
    e4 = ob.enqueue(results[0], "ctonly")
    e5 = ob.enqueue(results[0], "nowhere")  # not a configured peer
    peers = [perm.peer("perm"), trans.peer("trans"), closed, ct_only.peer("ctonly")]
    summary = Sender(ob, peers, scu).run_once()
    assert (summary.sent, summary.retried, summary.dead) == (0, 2, 3)
    states = {e.id: (e.state, e.last_error) for e in ob.list()}
    assert states[e1.id][0] == DEAD and "permanently" in states[e1.id][1]
    assert states[e2.id][0] == PENDING and "transiently" in states[e2.id][1]
    assert states[e3.id][0] == PENDING
    assert states[e4.id][0] == DEAD and "none of the proposed" in states[e4.id][1]
    assert states[e5.id][0] == DEAD and "unknown destination" in states[e5.id][1]


def test_timeout_is_transient(tmp_path: Path, results, scp_factory) -> None:
    scp = scp_factory(delay_s=3.0)
    ob = _outbox(tmp_path)
    e = ob.enqueue(results[1], "pacs")
    t = time.time()
    summary = Sender(ob, [scp.peer()], StoreSCU("DICOMNODE", timeout_s=1.0)).run_once()
    assert summary.retried == 1 and time.time() - t < 10
    assert ob.get(e.id).state == PENDING  # type: ignore[union-attr]


def test_sender_thread_retries_until_peer_appears(tmp_path: Path, results) -> None:
    ob = _outbox(tmp_path, backoff_base_s=0.2, backoff_max_s=0.4)
    port = free_port()
    peer = PeerConfig(name="pacs", ae_title="TESTSCP", port=port)
    sender = Sender(ob, [peer], StoreSCU("DICOMNODE", timeout_s=2), poll_s=0.1)
    sender.start()
    try:
        ids = [ob.enqueue(ds, "pacs").id for ds in results]
        deadline = time.time() + 15  # a loaded machine may take a while for the first failed attempts
        while time.time() < deadline and not all(ob.get(i).attempts >= 1 for i in ids):  # type: ignore[union-attr]
            time.sleep(0.05)
        assert all(ob.get(i).attempts >= 1 and ob.get(i).state == PENDING for i in ids)  # type: ignore[union-attr]
        # now a real SCP appears on the port the entries are waiting for
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        received: list[str] = []
        ae = AE(ae_title="TESTSCP")
        for uid in (SEG_CLASS, SR_CLASS):
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, lambda ev: received.append(str(ev.request.AffectedSOPInstanceUID)) or 0x0000)])
        try:
            deadline = time.time() + 10
            while time.time() < deadline and not all(ob.get(i).state == SENT for i in ids):  # type: ignore[union-attr]
                time.sleep(0.05)
            assert all(ob.get(i).state == SENT for i in ids)  # type: ignore[union-attr]
            assert sorted(received) == sorted(ds.SOPInstanceUID for ds in results)
        finally:
            server.shutdown()
    finally:
        sender.stop()


# ---- the operator command -----------------------------------------------------------------

def test_outbox_command(tmp_path: Path, results, capsys) -> None:
    data = tmp_path / "var"
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(f'[node]\ndata_dir = "{data}"\n[[peers]]\nname = "pacs"\nae_title = "PACS"\nport = 4242\n')
    from dicomnode.config import load_config

    ob = Outbox.open(load_config(cfg_file))
    e_dead = ob.enqueue(results[0], "pacs", kind="seg")
    e_sent = ob.enqueue(results[1], "pacs", kind="sr")
    ob.mark_dead(e_dead.id, "cannot understand 0xC000")
    ob.mark_sent(e_sent.id)
    ob.close()
    assert cli_main(["outbox", "list", "--config", str(cfg_file), "--json"]) == 0
    import json

    listed = json.loads(capsys.readouterr().out)
    assert listed["counts"] == {"pending": 0, "sent": 1, "dead": 1}
    text = json.dumps(listed)
    assert results[0].SOPInstanceUID not in text and results[0].SeriesInstanceUID not in text  # no UIDs
    assert cli_main(["outbox", "retry", "--config", str(cfg_file)]) == 0
    ob = Outbox.open(load_config(cfg_file))
    assert ob.get(e_dead.id).state == PENDING and ob.get(e_sent.id).state == SENT  # type: ignore[union-attr]
    ob.close()
    assert cli_main(["outbox", "retry", "--config", str(cfg_file)]) == 2  # nothing dead any more
    assert cli_main(["outbox", "purge", "--config", str(cfg_file)]) == 0  # sent entries
    ob = Outbox.open(load_config(cfg_file))
    assert [e.id for e in ob.list()] == [e_dead.id]
    assert sorted(p.name for p in (data / "outbox").iterdir()) == [f"{results[0].SOPInstanceUID}.dcm"]
    ob.close()
    capsys.readouterr()
    assert cli_main(["outbox", "list", "--config", str(cfg_file)]) == 0
    assert "pending=1" in capsys.readouterr().out


def test_no_patient_data_or_uids_in_logs(tmp_path: Path, results, scp_factory, caplog) -> None:
    import logging

    from dicomnode.ops.logs import quiet_third_party

    quiet_third_party()
    caplog.set_level(logging.DEBUG)
    ob = _outbox(tmp_path)
    ok, bad = scp_factory(), scp_factory(0xC000)
    for ds in results:
        ob.enqueue(ds, "ok")
        ob.enqueue(ds, "bad")
    ob.enqueue(results[0], "closed")
    closed = PeerConfig(name="closed", ae_title="NOBODY", port=free_port())
    Sender(ob, [ok.peer("ok"), bad.peer("bad"), closed], StoreSCU("DICOMNODE", timeout_s=5)).run_once()
    text = caplog.text
    assert "dead-lettered" in text and "queued" in text  # the outbox did log
    for ds in results:
        for value in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, str(ds.PatientName), ds.PatientID):
            assert str(value) not in text


def test_missing_or_corrupt_outbox_files_are_dead_lettered(tmp_path: Path, results, scp_factory) -> None:
    scp = scp_factory()
    ob = _outbox(tmp_path)
    gone = ob.enqueue(results[0], "pacs")
    broken = ob.enqueue(results[1], "pacs")
    ob.path_of(gone).unlink()
    ob.path_of(broken).write_bytes(b"not dicom at all")
    summary = Sender(ob, [scp.peer()], StoreSCU("DICOMNODE", timeout_s=5)).run_once()
    assert summary.dead == 2 and scp.received == []
    assert "missing" in ob.get(gone.id).last_error  # type: ignore[union-attr]
    assert "unreadable" in ob.get(broken.id).last_error  # type: ignore[union-attr]
