"""Ingest from dcmtk: echoscu/storescu (TCP_NODELAY=1) against ``dicomnode serve``.

Checks: C-ECHO; every acknowledged instance is on disk, byte-identical to what was sent and in
the database; the series completes < 1 s after release (figure printed); a re-send is stored once;
compressed transfer syntaxes are stored as received; garbage gets a failure status and no file.
"""
from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from tests.peers import (
    NodeProcess,
    Peer,
    SeriesInfo,
    acked_files,
    free_port,
    make_ct_series,
    peer_env,
    require_tool,
    storescu,
    wait_for,
    write_node_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["fast", "pynetdicom"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """The node with each SCP engine (the lean upper layer and pynetdicom's)."""
    require_tool("storescu")
    d = tmp_path_factory.mktemp("node")
    port = free_port()
    cfg = write_node_config(d / "node.toml", port, d / "data",
                            [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")], quiet_period_s=30,
                            node_extra=f'scp_engine = "{request.param}"')
    with NodeProcess.start(cfg, port) as n:
        yield n


def _db(node: NodeProcess) -> sqlite3.Connection:
    return sqlite3.connect(node.config.parent / "data" / "state.sqlite3")


def _series(node: NodeProcess, series_uid: str) -> tuple:
    with _db(node) as c:
        return c.execute("SELECT state, instance_count, released_at, completed_at, completion_reason "
                         "FROM series WHERE series_instance_uid=?", (series_uid,)).fetchone()


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta group (the dataset as it travels on the wire)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[])
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_len:]


def test_echoscu(node: NodeProcess) -> None:
    require_tool("echoscu")
    r = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30, env=peer_env())
    assert r.returncode == 0, r.stderr


def test_storescu_series_is_stored_and_completes_fast(node: NodeProcess, tmp_path: Path) -> None:
    info = make_ct_series(tmp_path / "ct", n=40, rows=64, cols=64, shuffle_names=True)
    r = storescu(info.folder, node.port)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(acked_files(r.stderr + r.stdout)) == 40
    assert wait_for(lambda: _series(node, info.series_uid)[0] == "complete", 10)
    state, count, released, completed, reason = _series(node, info.series_uid)
    assert count == 40 and reason == "released-contiguous"
    latency = completed - released
    print(f"\ncompletion latency after release: {latency * 1000:.1f} ms")
    assert latency < 1.0
    with _db(node) as c:
        rows = dict(c.execute("SELECT sop_instance_uid, path FROM instances WHERE series_instance_uid=?",
                              (info.series_uid,)).fetchall())
        jobs = c.execute("SELECT COUNT(*) FROM jobs WHERE series_instance_uid=?", (info.series_uid,)).fetchone()[0]
    assert jobs == 1
    spool = node.config.parent / "data" / "spool"
    for f, sop in zip(info.files, info.sop_uids):
        stored = spool / rows[sop]
        assert _dataset_bytes(stored) == _dataset_bytes(f)  # the bytes as received
        ds = pydicom.dcmread(stored)
        assert ds.SOPInstanceUID == sop and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.pixel_array.shape == (64, 64)
    st = node.status()
    entry = [s for s in st["series"] if s["instances"] == 40]
    assert entry and entry[0]["state"] == "complete"
    assert info.series_uid not in str(st) and "CANARY" not in str(st)  # no identifiers in status

    # a re-send is stored once, and re-opens nothing
    r2 = storescu(info.folder, node.port)
    assert r2.returncode == 0
    assert _series(node, info.series_uid)[1] == 40
    with _db(node) as c:
        assert c.execute("SELECT COUNT(*) FROM instances WHERE series_instance_uid=?",
                         (info.series_uid,)).fetchone()[0] == 40


@pytest.mark.parametrize("tool,args,propose,ts", [
    ("dcmcrle", [], "-xr", "1.2.840.10008.1.2.5"),
    ("dcmcjpls", [], "-xt", "1.2.840.10008.1.2.4.80"),
    ("dcmcjpeg", ["+e1"], "-xs", "1.2.840.10008.1.2.4.70"),
    ("dcmconv", ["+td"], "-xd", "1.2.840.10008.1.2.1.99"),
    ("dcmconv", ["+ti"], "-xi", "1.2.840.10008.1.2"),
])
def test_transfer_syntaxes_stored_as_received(node: NodeProcess, tmp_path: Path, tool: str, args: list[str],
                                              propose: str, ts: str) -> None:
    require_tool(tool)
    info = make_ct_series(tmp_path / "src", n=4, rows=32, cols=32)
    out = tmp_path / "conv"
    out.mkdir()
    for f in info.files:
        subprocess.run([tool, *args, str(f), str(out / f.name)], check=True, capture_output=True, timeout=60)
    r = storescu(out, node.port, extra=[propose])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(acked_files(r.stderr)) == 4
    with _db(node) as c:
        rows = c.execute("SELECT transfer_syntax_uid, path FROM instances WHERE series_instance_uid=?",
                         (info.series_uid,)).fetchall()
    assert len(rows) == 4 and {t for t, _ in rows} == {ts}
    spool = node.config.parent / "data" / "spool"
    for _, rel in rows:
        stored = spool / rel
        ds = pydicom.dcmread(stored)
        assert ds.file_meta.TransferSyntaxUID == ts
        sent = out / [f.name for f, s in zip(info.files, info.sop_uids) if s == ds.SOPInstanceUID][0]
        if ts != "1.2.840.10008.1.2.1.99":  # deflate: compare the inflated content below
            assert _dataset_bytes(stored) == _dataset_bytes(sent)
        assert (ds.pixel_array == pydicom.dcmread(sent).pixel_array).all()


def test_unparseable_dataset_gets_failure_and_no_file(node: NodeProcess, tmp_path: Path) -> None:
    """A valid file meta in front of garbage: the node answers a failure status and stores nothing."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    f = tmp_path / "bad.dcm"
    with open(f, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3" * 10)  # length beyond the end
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_c_store(f)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status and int(status.Status) in (0xC000, 0xA900)
    with _db(node) as c:
        assert c.execute("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (sop,)).fetchone()[0] == 0
    assert not list((node.config.parent / "data" / "spool").rglob(f"{sop}.dcm"))
    assert not list((node.config.parent / "data" / "spool" / ".tmp").iterdir())


@pytest.mark.parametrize("engine", ["fast", "pynetdicom"])
def test_tcp_nodelay_on_accepted_sockets(tmp_path: Path, engine: str) -> None:
    """The SCP sets TCP_NODELAY on the socket it accepted (read back from the real socket)."""
    from dicomnode.config import parse_config
    from dicomnode.net.scp import StorageSCP
    from dicomnode.store.db import SqliteDatabase
    from dicomnode.store.spool import Spool
    from tests.peers import echo

    cfg = parse_config({"node": {"port": 0, "min_free_bytes": 0, "scp_engine": engine},
                        "peers": [{"name": "e", "ae_title": "ECHOSCU", "may_send": True}]})
    db = SqliteDatabase(tmp_path / "s.db")
    scp = StorageSCP(cfg, db, Spool(tmp_path / "spool"))
    scp.start()
    try:
        assert scp.nodelay_ok is None
        assert echo(scp.port)
        assert scp.nodelay_ok is True
    finally:
        scp.stop()
        db.close()


def test_quota_reached_gives_a700_and_no_partial_file(tmp_path: Path) -> None:
    """Over ``node.quota_bytes`` the node answers 0xA700 (out of resources) and keeps no file."""
    info = make_ct_series(tmp_path / "ct", n=10, rows=64, cols=64)
    per_file = info.files[0].stat().st_size
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port, tmp_path / "data",
                            [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")],
                            node_extra=f"quota_bytes = {int(per_file * 3.5)}")
    with NodeProcess.start(cfg, port) as node:
        r = storescu(info.folder, port)
        out = r.stderr + r.stdout
        assert len(acked_files(out)) == 3
        assert "Refused: OutOfResources" in out, out[-1500:]
        files = list((tmp_path / "data" / "spool").rglob("*.dcm"))
        assert len(files) == 3
        assert not list((tmp_path / "data" / "spool" / ".tmp").iterdir())
        assert "refused 0xA700" in node.log.read_text()


def test_operator_commands_echo_send_and_graceful_stop(node: NodeProcess, tmp_path: Path) -> None:
    """``dicomnode echo`` / ``dicomnode send`` against real peers (the node itself and dcmtk storescp)."""
    from tests.peers import DICOMNODE, StoreSCP

    # the node's peers allow ECHOSCU/STORESCU: use a config whose own AE title is STORESCU
    cfg = tmp_path / "sender.toml"
    cfg.write_text(f'[node]\nae_title = "STORESCU"\n[[peers]]\nname = "node"\nae_title = "DICOMNODE"\n'
                   f'host = "127.0.0.1"\nport = {node.port}\n')
    r = subprocess.run([str(DICOMNODE), "echo", "node", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "0x0000" in r.stdout, r.stderr
    info = make_ct_series(tmp_path / "ct", n=12, rows=32, cols=32)
    r = subprocess.run([str(DICOMNODE), "send", str(info.folder), "--to", "node", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "sent 12/12" in r.stdout, r.stdout + r.stderr
    assert wait_for(lambda: _series(node, info.series_uid) is not None
                    and _series(node, info.series_uid)[0] == "complete", 10)
    with StoreSCP.start(tmp_path / "scp-out") as scp:
        r = subprocess.run([str(DICOMNODE), "send", str(info.folder), "--to", f"STORESCP@127.0.0.1:{scp.port}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        received = [p for p in (tmp_path / "scp-out").iterdir() if p.is_file()]
        assert len(received) == 12
        assert {pydicom.dcmread(p).SOPInstanceUID for p in received} == set(info.sop_uids)
    bad = subprocess.run([str(DICOMNODE), "echo", "STRANGER@127.0.0.1:1"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1


def test_serve_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port, tmp_path / "data", [Peer("echo", "ECHOSCU")])
    node = NodeProcess.start(cfg, port)
    node.proc.send_signal(15)
    assert node.proc.wait(20) == 0
    node.stop()
    assert "node stopped" in node.log.read_text()


def test_jpeg2000_and_enhanced_multiframe(node: NodeProcess, tmp_path: Path) -> None:
    """JPEG 2000 (made with pydicom + openjpeg) and an Enhanced CT multi-frame object: stored as
    received; the single multi-frame instance completes its series on release."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEG2000Lossless, generate_uid

    info = make_ct_series(tmp_path / "src", n=3, rows=32, cols=32)
    j2k = tmp_path / "j2k"
    j2k.mkdir()
    for f in info.files:
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(j2k / f.name)
    r = storescu(j2k, node.port, extra=["-xv"])
    assert r.returncode == 0 and len(acked_files(r.stderr)) == 3, r.stderr[-1500:]
    with _db(node) as c:
        rows = c.execute("SELECT transfer_syntax_uid, path FROM instances WHERE series_instance_uid=?",
                         (info.series_uid,)).fetchall()
    assert {t for t, _ in rows} == {str(JPEG2000Lossless)}
    source = dict(zip(info.sop_uids, info.files))
    for _, rel in rows:
        stored = pydicom.dcmread(node.config.parent / "data" / "spool" / rel)
        sent = j2k / source[stored.SOPInstanceUID].name
        assert _dataset_bytes(node.config.parent / "data" / "spool" / rel) == _dataset_bytes(sent)
        assert (stored.pixel_array == pydicom.dcmread(source[stored.SOPInstanceUID]).pixel_array).all()

    # Enhanced CT: one instance, 4 frames, positions per frame
    mf = pydicom.dcmread(info.files[0])
    mf.file_meta.MediaStorageSOPClassUID = mf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    mf.SOPInstanceUID = mf.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mf.SeriesInstanceUID = generate_uid()
    del mf.ImagePositionPatient
    mf.NumberOfFrames = 4
    frames = []
    for k in range(4):
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        fg = Dataset()
        fg.PlanePositionSequence = Sequence([pos])
        frames.append(fg)
    mf.PerFrameFunctionalGroupsSequence = Sequence(frames)
    mf.PixelData = mf.PixelData * 4
    mf_path = tmp_path / "mf" / "enhanced.dcm"
    mf_path.parent.mkdir()
    mf.save_as(mf_path)
    r = storescu(mf_path, node.port)
    assert r.returncode == 0 and len(acked_files(r.stderr)) == 1, r.stderr[-1500:]
    assert wait_for(lambda: _series(node, mf.SeriesInstanceUID)[0] == "complete", 10)
    with _db(node) as c:
        assert c.execute("SELECT frames FROM instances WHERE sop_instance_uid=?",
                         (mf.SOPInstanceUID,)).fetchone()[0] == 4


def test_real_scanner_slices_stored_byte_identical(node: NodeProcess, shared_data: Path) -> None:
    """Three real GE CT slices (dcmqi test data, implicit VR) go in by storescu (proposing implicit
    VR only, so it sends them unconverted) and are kept byte for byte."""
    files = sorted((shared_data / "dcmqi_seg" / "ct-3slice").glob("*.dcm"))
    r = storescu(files, node.port, extra=["-xi"])
    assert r.returncode == 0 and len(acked_files(r.stderr)) == 3, r.stderr[-1500:]
    spool = node.config.parent / "data" / "spool"
    for f in files:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        with _db(node) as c:
            rel = c.execute("SELECT path FROM instances WHERE sop_instance_uid=?", (sop,)).fetchone()[0]
        assert _dataset_bytes(spool / rel) == _dataset_bytes(f)


def test_serve_port_and_data_dir_overrides(tmp_path: Path) -> None:
    """``dicomnode serve --port N --data-dir DIR`` win over the config file."""
    cfg_port, port = free_port(), free_port()
    cfg = write_node_config(tmp_path / "node.toml", cfg_port, tmp_path / "cfg-data",
                            [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")])
    other = tmp_path / "other-data"
    with NodeProcess.start(cfg, port, extra_args=["--port", str(port), "--data-dir", str(other)]):
        info = make_ct_series(tmp_path / "ct", n=3, rows=16, cols=16)
        assert storescu(info.folder, port).returncode == 0
        assert (other / "state.sqlite3").exists() and len(list((other / "spool").rglob("*.dcm"))) == 3
        assert not (tmp_path / "cfg-data").exists()
