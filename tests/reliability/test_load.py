"""Load: 10 dcmtk storescu senders in parallel, each a 200-slice CT series, into one node that
processes them all (``body`` model on a real Triton over gRPC); the node's resident memory is
sampled throughout and must stay bounded.

CI: 256 x 256 slices (10 x 200 x 128 KiB = 262 MB); ``DICOMNODE_NIGHTLY=1``: 512 x 512 (1 GB).
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.peers import make_ct_series, peer_env, wait_for
from tests.reliability.conftest import NIGHTLY, report, sized, storescu_outcomes, tally

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENDERS = 10
SLICES = 200
SIZE = sized(256, 512)
RSS_LIMIT = (4 << 30) if NIGHTLY else (3 << 29)  # 4 GiB nightly, 1.5 GiB in CI


class RssSampler:
    """Peak resident set size of a process (and, separately, of another process tree)."""

    def __init__(self, pid: int, other_pid: int | None = None, interval: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.other = psutil.Process(other_pid) if other_pid else None
        self.interval = interval
        self.peak = self.start = self.proc.memory_info().rss
        self.other_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self, p: psutil.Process) -> int:
        total = 0
        for q in [p, *p.children(recursive=True)]:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                if self.other is not None:
                    self.other_peak = max(self.other_peak, self._tree_rss(self.other))
            except psutil.Error:
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_ten_parallel_senders_all_stored_and_processed_memory_bounded(tmp_path: Path, start_node, triton_server) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    series = [make_ct_series(tmp_path / f"s{i}", n=SLICES, rows=SIZE, cols=SIZE, seed=i) for i in range(SENDERS)]
    gen_s = time.monotonic() - t0
    total_bytes = sum(f.stat().st_size for s in series for f in s.files)
    node = start_node(triton=triton_server, quiet_period_s=2.0)
    with RssSampler(node.proc.proc.pid, triton_server.pid) as rss:
        t0 = time.monotonic()
        procs = [subprocess.Popen(["storescu", "-v", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                                   *map(str, s.files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=peer_env()) for s in series]
        outcomes = []
        for p, s in zip(procs, series):
            _, err = p.communicate(timeout=600)
            outcomes += storescu_outcomes(list(s.files), err)
        ingest_s = time.monotonic() - t0
        assert tally(outcomes) == {"Success": SENDERS * SLICES}, tally(outcomes)

        def states() -> list[str]:
            return [node.series_outcome(s.series_uid)[0] for s in series]
        assert wait_for(lambda: all(st in ("done", "quarantined", "failed") for st in states()), 900, 1.0), states()
        all_done_s = time.monotonic() - t0
    assert states() == ["done"] * SENDERS, [node.series_outcome(s.series_uid) for s in series]
    stored = node.query("SELECT COUNT(*), SUM(size_bytes) FROM instances")[0]
    assert stored[0] == SENDERS * SLICES
    counts = {s.series_uid: node.query("SELECT instance_count FROM series WHERE series_instance_uid=?",
                                       (s.series_uid,))[0][0] for s in series}
    assert set(counts.values()) == {SLICES}
    results = sorted((node.data_dir / "results").glob("*/*.dcm"))
    assert len(results) == 2 * SENDERS, [str(p) for p in results]
    stages = node.query("SELECT timings_json FROM jobs WHERE state='done'")
    report("load", {
        "senders": SENDERS, "slices": SLICES, "size": SIZE, "bytes_sent": total_bytes, "generate_s": round(gen_s, 1),
        "ingest_s": round(ingest_s, 1), "instances_per_s": round(SENDERS * SLICES / ingest_s, 1),
        "all_processed_s": round(all_done_s, 1), "jobs_done": len(stages),
        "node_rss_start_mb": rss.start >> 20, "node_rss_peak_mb": rss.peak >> 20,
        "triton_rss_peak_mb": rss.other_peak >> 20, "rss_limit_mb": RSS_LIMIT >> 20,
    })
    assert rss.peak < RSS_LIMIT, f"node peak RSS {rss.peak >> 20} MiB over {RSS_LIMIT >> 20} MiB"
    assert node.alive()
