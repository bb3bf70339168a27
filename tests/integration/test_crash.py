"""Crash test: SIGKILL the node in the middle of a 300-slice series, restart, nothing acked is lost.

storescu (-v) tells which instances got a success status; after the restart each of them must be
in the database and its file readable with the exact pixel data sent. The series then completes
(released + contiguous, one job) when the whole series is sent again.
"""
from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.peers import (
    NodeProcess,
    Peer,
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


def test_sigkill_mid_series_loses_nothing_acknowledged(tmp_path: Path) -> None:
    require_tool("storescu")
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 16)))
    kill_after = random.Random(seed).randrange(40, 220)
    print(f"\ncrash seed {seed}: SIGKILL after {kill_after} acks")
    info = make_ct_series(tmp_path / "ct", n=300, rows=128, cols=128)
    sop_of = dict(zip(info.files, info.sop_uids))
    port = free_port()
    data = tmp_path / "data"
    cfg = write_node_config(tmp_path / "node.toml", port, data, [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")],
                            quiet_period_s=300, max_wait_s=600)
    node = NodeProcess.start(cfg, port)
    log = tmp_path / "storescu.log"
    try:
        with open(log, "w") as fh:
            scu = subprocess.Popen(["storescu", "-v", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                                    str(port), *map(str, info.files)], stdout=fh, stderr=subprocess.STDOUT,
                                   env=peer_env())
            assert wait_for(lambda: log.read_text().count("Received Store Response (Success)") >= kill_after,
                            120, 0.005), "storescu made no progress"
            node.kill()
            scu.wait(60)
    finally:
        node.stop()
    acked = acked_files(log.read_text())
    assert kill_after <= len(acked) < 300, "the kill did not land mid-series"
    assert scu.returncode != 0

    node = NodeProcess.start(cfg, port)  # restart on the same data
    try:
        db = sqlite3.connect(data / "state.sqlite3")
        rows = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
        missing = [f.name for f in acked if sop_of[f] not in rows]
        assert not missing, f"acknowledged but lost: {missing[:5]}"
        for f in acked:
            stored = pydicom.dcmread(data / "spool" / rows[sop_of[f]])
            assert np.array_equal(stored.pixel_array, pydicom.dcmread(f).pixel_array)
        assert not list((data / "spool" / ".tmp").iterdir()), "a partial temp file survived the restart"
        state = db.execute("SELECT state, instance_count FROM series WHERE series_instance_uid=?",
                           (info.series_uid,)).fetchone()
        assert state[0] == "receiving" and state[1] >= len(acked)

        r = storescu(info.folder, port)  # the sender retries the whole series
        assert r.returncode == 0, r.stderr[-2000:]
        assert wait_for(lambda: db.execute("SELECT state FROM series WHERE series_instance_uid=?",
                                           (info.series_uid,)).fetchone()[0] == "complete", 10)
        st = db.execute("SELECT instance_count, completion_reason FROM series WHERE series_instance_uid=?",
                        (info.series_uid,)).fetchone()
        assert tuple(st) == (300, "released-contiguous")
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 300
        assert len(list((data / "spool").rglob("*.dcm"))) == 300
        db.close()
    finally:
        node.stop()
