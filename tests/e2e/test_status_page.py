"""The status page in a real headless Chromium, on a real node that has processed a real CT series.

``dicomnode serve`` (local Triton, body model) receives the TotalSegmentator example CT by dcmtk
storescu, processes it, and the page rendered by Debian's chromium must show the series (by its
hash key), its state "done" and its stage timings. A screenshot is written to docs/status-page.png.
Nothing on the page or in the JSON may contain patient data or UIDs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ct_dicom import CANARY_ID, CANARY_NAME, nifti_to_dicom
from tests.e2e.node_harness import finished, get_json, node_config, ports, wait_status
from tests.peers import NodeProcess, require_tool, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium(tmp: Path, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run headless chromium with a throw-away profile."""
    exe = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if exe is None:
        pytest.skip("chromium not installed (scripts/setup.sh installs it)")
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def processed_node(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # type: ignore[no-untyped-def]
    require_tool("storescu")
    if not (ROOT / ".venv-triton" / "bin" / "python").exists():
        pytest.skip("local Triton venv missing (.venv-triton; scripts/setup.sh makes it)")
    tmp = tmp_path_factory.mktemp("status")
    series = nifti_to_dicom(shared_data / "totalsegmentator" / "example_ct.nii.gz", tmp / "ct")
    port, web_port, metrics_port = ports()
    cfg = node_config(tmp / "node.toml", port=port, data_dir=tmp / "var", web_port=web_port,
                      metrics_port=metrics_port, token_env="DICOMNODE_TEST_WEB_TOKEN")
    token = "t0k3n-status-test"
    with NodeProcess.start(cfg, port, log=tmp / "node.log", env={"DICOMNODE_TEST_WEB_TOKEN": token},
                           timeout=90) as node:
        out = storescu(series.folder, port)
        assert out.returncode == 0, out.stdout + out.stderr
        status = wait_status(web_port, finished(1), timeout=240, token=token)
        yield tmp, web_port, metrics_port, token, status, series, node


def test_status_json_shows_the_processed_series_without_patient_data(processed_node) -> None:  # type: ignore[no-untyped-def]
    tmp, web_port, metrics_port, token, status, series, node = processed_node
    (s,) = status["series"]
    assert s["state"] == "done", s
    assert s["modality"] == "CT" and s["instances"] == len(series.files)
    stages = dict(s["job"]["stages"])
    assert {"convert", "infer:body", "results", "deliver"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and s["job"]["total_s"] > 0
    assert status["stage_stats"]["infer:body"]["n"] == 1
    text = repr(status)
    for secret in (CANARY_NAME, CANARY_ID, series.series_uid, series.study_uid, "Canary"):
        assert secret not in text
    # the token is required (except for /healthz)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/status", timeout=10)
    assert err.value.code == 401
    assert urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=10).status == 200
    # Prometheus: one job done, its stages observed, database gauges
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as err:  # the metrics need the token too
        urllib.request.urlopen(metrics_url, timeout=10)
    assert err.value.code == 401
    metrics = urllib.request.urlopen(urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {token}"}),
                                     timeout=10).read().decode()
    assert 'dicomnode_jobs_finished_total{state="done"} 1.0' in metrics
    assert 'dicomnode_stage_seconds_count{stage="infer:body"} 1.0' in metrics
    assert 'dicomnode_series{state="done"} 1.0' in metrics
    # results folder copy (no PACS receives results in this config)
    folder = tmp / "var" / "results" / s["series_key"]
    assert (folder / "seg.dcm").is_file() and (folder / "sr.dcm").is_file() and (folder / "summary.json").is_file()
    log = (tmp / "node.log").read_text(errors="replace") + "".join(
        p.read_text(errors="replace") for p in (tmp / "var" / "logs").glob("*.log*"))
    for secret in (CANARY_NAME, CANARY_ID, series.series_uid, series.study_uid):
        assert secret not in log


def test_page_renders_in_headless_chromium(processed_node) -> None:  # type: ignore[no-untyped-def]
    tmp, web_port, _, token, status, series, _ = processed_node
    key = status["series"][0]["series_key"]
    url = f"http://127.0.0.1:{web_port}/?token={token}"
    dom = chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert key in html, html[:3000]
    assert ">done<" in html
    assert "infer:body" in html and "convert" in html
    assert "Stage timings" in html
    for secret in (CANARY_NAME, CANARY_ID, series.series_uid):
        assert secret not in html
    # without the token the page's API call fails and the page says so
    denied = chromium(tmp, "--virtual-time-budget=3000", "--dump-dom", f"http://127.0.0.1:{web_port}/")
    assert key not in denied.stdout
    shot = tmp / "status.png"
    res = chromium(tmp, "--virtual-time-budget=5000", "--window-size=1280,720", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
    docs = ROOT / "docs" / "status-page.png"
    if os.environ.get("DICOMNODE_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, docs)
    assert docs.is_file(), "docs/status-page.png missing (run with DICOMNODE_UPDATE_DOCS=1)"
