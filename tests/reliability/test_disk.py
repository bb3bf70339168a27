"""Out of space: a spool quota reached, and a real full disk (a small tmpfs mounted as the node's data
directory; needs root - the test skips with the reason otherwise).

Either way C-STORE answers 0xA700 (Out of Resources), no partial file is left in the spool, every
instance acknowledged before is present, readable and indexed, and the node takes instances again
once space returns (quota raised / disk space freed), without losing anything.
"""
from __future__ import annotations

import os
import subprocess
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
