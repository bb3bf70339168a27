"""Out of space: a spool quota reached, and a real full disk (a small tmpfs mounted as the node's data
directory; needs root - the test skips with the reason otherwise).

Either way C-STORE answers 0xA700 (Out of Resources), no partial file is left in the spool, every
instance acknowledged before is present, readable and indexed, and the node takes instances again
once space returns (quota raised / disk space freed), without losing anything.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.peers import NodeProcess, make_ct_series, storescu, wait_for
from tests.reliability.conftest import NodeUnderTest, node_config, report, storescu_outcomes, tally

pytestmark = [pytest.mark.integration]

OUT_OF_RESOURCES = "Refused: OutOfResources"  # dcmtk's name for 0xA700


def send(node: NodeUnderTest, files: list[Path]) -> list[str]:
    """dcmtk storescu (one association, ``--no-halt``): per file the status storescu reported."""
    r = storescu(files, node.port, extra=("--no-halt",), timeout=300)
    return storescu_outcomes(files, r.stderr)


def check_spool(node: NodeUnderTest, acked: list[str]) -> int:
    """No partial files; every acknowledged SOP instance indexed and readable. Returns file count."""
    spool = node.data_dir / "spool"
    assert list((spool / ".tmp").glob("*")) == [], "partial files left in the spool"
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    missing = [u for u in acked if u not in rows]
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"
    for uid in acked:
        ds = pydicom.dcmread(spool / rows[uid])
        assert ds.SOPInstanceUID == uid and len(ds.PixelData) == ds.Rows * ds.Columns * 2
    files = [p for p in spool.rglob("*.dcm") if ".tmp" not in p.parts]
    assert len(files) == len(rows), "spool files and database rows disagree"
    return len(files)


def test_quota_reached_answers_a700_and_resumes_when_raised(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    series = make_ct_series(tmp_path / "ct", n=30, rows=64, cols=64)
    per_file = series.files[0].stat().st_size
    quota = per_file * 12 + per_file // 2  # room for ~12 instances
    node = start_node(quota_bytes=quota, name="quota")
    results = send(node, list(series.files))
    acked = [uid for uid, r in zip(series.sop_uids, results) if r == "Success"]
    refused = [r for r in results if r != "Success"]
    assert 8 <= len(acked) <= 13, tally(results)
    assert refused and all(r == OUT_OF_RESOURCES for r in refused), tally(results)
    check_spool(node, acked)
    assert node.alive()

    # space returns: the operator raises the quota; the node takes the rest, nothing lost
    node.proc.stop()
    text = node.config.read_text().replace(f"quota_bytes = {quota}", f"quota_bytes = {quota * 4}")
    node.config.write_text(text)
    node.restart()
    again = send(node, [f for f, r in zip(series.files, results) if r != "Success"])
    assert set(again) == {"Success"}, tally(again)
    assert check_spool(node, list(series.sop_uids)) == len(series.files)
    assert wait_for(lambda: node.series_outcome(series.series_uid)[0] == "complete", 20, 0.2)
    report("quota", {"quota_bytes": quota, "first_pass": tally(results), "after_raise": tally(again)})


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 6 MiB tmpfs at tmp_path/disk (unmounted afterwards); skips when mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_disk_full_answers_a700_without_partial_files_and_resumes(tmp_path: Path, small_disk: Path) -> None:  # type: ignore[no-untyped-def]
    series = make_ct_series(tmp_path / "ct", n=60, rows=256, cols=256)  # ~131 KB each, 7.9 MB in all
    # the data directory (spool, SQLite, logs) lives on the small disk
    config, port, _, _ = node_config(tmp_path, name="full")
    config.write_text(config.read_text().replace(f'data_dir = "{tmp_path / "full-data"}"', f'data_dir = "{small_disk / "var"}"'))
    proc = NodeProcess.start(config, port, log=tmp_path / "full.out")
    node = NodeUnderTest(proc, config, port, small_disk / "var")
    try:
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * (3 << 20))  # freed later: "space returns"
        results = send(node, list(series.files))
        acked = [uid for uid, r in zip(series.sop_uids, results) if r == "Success"]
        refused = [r for r in results if r != "Success"]
        assert acked and refused, tally(results)
        assert all(r == OUT_OF_RESOURCES for r in refused), tally(results)
        assert node.alive()
        check_spool(node, acked)
        free_when_full = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize

        ballast.unlink()  # space returns; the running node resumes without a restart
        rest = [f for f, r in zip(series.files, results) if r != "Success"]
        rest_uids = [u for u, r in zip(series.sop_uids, results) if r != "Success"]
        again = send(node, rest[:15])
        assert set(again) == {"Success"}, tally(again)
        check_spool(node, acked + rest_uids[:15])
        report("disk_full", {"tmpfs_bytes": 6 << 20, "first_pass": tally(results), "free_bytes_when_full": free_when_full,
                             "after_freeing_3MiB": tally(again)})
    finally:
        node.proc.stop()


def test_disk_full_while_a_job_is_due_it_waits_and_completes(tmp_path: Path, small_disk: Path,
                                                             own_triton) -> None:  # type: ignore[no-untyped-def]
    """The disk fills up after ingest while the job waits for Triton; Triton comes back on a full
    disk (nothing can be claimed, written or recorded): the job must not fail or get stuck in
    ``processing``, and completes with SEG + SR once space returns."""
    from tests.reliability.conftest import FINAL

    config, port, _, _ = node_config(tmp_path, name="busy", triton=own_triton)
    config.write_text(config.read_text().replace(f'data_dir = "{tmp_path / "busy-data"}"',
                                                 f'data_dir = "{small_disk / "var"}"'))
    proc = NodeProcess.start(config, port, log=tmp_path / "busy.out")  # Triton still down: jobs wait
    node = NodeUnderTest(proc, config, port, small_disk / "var")
    try:
        series = make_ct_series(tmp_path / "ct", n=12, rows=128, cols=128)
        assert set(send(node, list(series.files))) == {"Success"}
        assert wait_for(lambda: node.series_outcome(series.series_uid)[1].startswith("transient"), 60, 0.2)
        ballast = small_disk / "ballast"
        with open(ballast, "wb") as fh:  # fill the disk to the last block
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        own_triton.start()
        time.sleep(8)  # several attempts on a full disk
        full_state, full_reason = node.series_outcome(series.series_uid)
        assert node.alive()
        assert full_state not in ("done", "failed", "quarantined"), (full_state, full_reason[:300])
        ballast.unlink()  # space returns
        assert wait_for(lambda: node.series_outcome(series.series_uid)[0] in FINAL, 120, 0.5), \
            node.series_outcome(series.series_uid)
        state, reason = node.series_outcome(series.series_uid)
        assert state == "done", (state, reason[:500])
        assert sorted(p.name for p in (node.data_dir / "results").glob("*/*.dcm")) == ["seg.dcm", "sr.dcm"]
        report("disk_full_processing", {"series_state_while_full": full_state,
                                        "job_reason_while_full": full_reason.splitlines()[0][:160] if full_reason else "",
                                        "final": state})
    finally:
        node.proc.stop()


def test_outbox_on_a_full_disk_raises_transient_and_leaves_no_partial_file(tmp_path: Path, small_disk: Path) -> None:
    """Queuing a result on a full disk is a TransientError (the job is retried) and leaves no temp file."""
    import numpy as np
    from pydicom.dataset import Dataset

    from dicomnode.errors import TransientError
    from dicomnode.store.outbox import Outbox, SqliteOutboxStore

    outbox = Outbox(SqliteOutboxStore(tmp_path / "outbox.sqlite3"), small_disk / "outbox")
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.4", "1.2.3"
    ds.PixelData = np.zeros(8 << 20, np.uint8).tobytes()  # 8 MiB on a 6 MiB disk
    ds["PixelData"].VR = "OB"
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    with pytest.raises(TransientError):
        outbox.enqueue(ds, "pacs", kind="seg")
    assert [p.name for p in (small_disk / "outbox").iterdir()] == []
    outbox.close()
