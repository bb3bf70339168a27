"""SIGTERM while a series is being processed: the node finishes the job in flight before it exits.

A real ``dicomnode serve`` (local Triton, body model) receives a 200 x 512 x 512 CT by storescu;
as soon as the status API shows the series in ``processing`` the node gets SIGTERM. It must exit
cleanly with the job done and its results written, and a restarted node must not process it again.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.ct_dicom import nifti_to_dicom
from tests.e2e.node_harness import get_json, node_config, ports, wait_status
from tests.peers import NodeProcess, require_tool, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_finishes_the_job_in_flight(tmp_path: Path, shared_data: Path) -> None:
    require_tool("storescu")
    if not (ROOT / ".venv-triton" / "bin" / "python").exists():
        pytest.skip("local Triton venv missing (.venv-triton; scripts/setup.sh makes it)")
    series = nifti_to_dicom(shared_data / "totalsegmentator" / "example_ct.nii.gz", tmp_path / "ct",
                            shape_ijk=(512, 512, 200))
    port, web_port, metrics_port = ports()
    cfg = node_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "var", web_port=web_port,
                      metrics_port=metrics_port)
    node = NodeProcess.start(cfg, port, log=tmp_path / "node.log", timeout=90)
    try:
        assert storescu(series.folder, port, verbose=False).returncode == 0
        wait_status(web_port, lambda s: any(x["state"] == "processing" for x in s["series"]), 60, interval=0.05)
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        rc = node.proc.wait(90)
        stop_s = time.monotonic() - t0
    finally:
        node.stop()
    assert rc == 0, (tmp_path / "node.log").read_text()[-3000:]
    log = (tmp_path / "node.log").read_text()
    assert "done" in log and "node stopped" in log
    results = list((tmp_path / "var" / "results").glob("s-*"))
    assert len(results) == 1 and {p.name for p in results[0].iterdir()} >= {"seg.dcm", "sr.dcm", "summary.json"}
    # restart: the job is done, nothing is reprocessed
    port2, web2, metrics2 = ports()
    cfg2 = node_config(tmp_path / "node2.toml", port=port2, data_dir=tmp_path / "var", web_port=web2,
                       metrics_port=metrics2)
    with NodeProcess.start(cfg2, port2, log=tmp_path / "node2.log", timeout=90):
        status = get_json(f"http://127.0.0.1:{web2}/api/status")
        (s,) = status["series"]
        assert s["state"] == "done" and s["job"]["attempts"] == 1, json.dumps(s)
        time.sleep(1.0)
        assert get_json(f"http://127.0.0.1:{web2}/api/status")["queue"] == {"done": 1}
    print(f"SIGTERM -> exit with the job finished: {stop_s:.1f} s")
