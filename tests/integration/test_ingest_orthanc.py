"""Orthanc (a real PACS) pushes a series to the node through its REST API.

``POST /modalities/dicomnode/store`` makes Orthanc C-STORE the series to the node (as AE
ORTHANC, allowed by ``[[peers]]``); the node holds every instance and completes the series.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from tests.peers import NodeProcess, Orthanc, Peer, free_port, make_ct_series, wait_for, write_node_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_orthanc_pushes_series_to_node(tmp_path: Path, modality: str) -> None:
    port = free_port()
    info = make_ct_series(tmp_path / "ct", n=30, rows=64, cols=64, modality=modality,
                          orientation=(1, 0, 0, 0, 0.8, -0.6) if modality == "MR" else (1, 0, 0, 0, 1, 0))
    with Orthanc.start(tmp_path / "orthanc", {"dicomnode": ("DICOMNODE", "127.0.0.1", port)}) as pacs:
        cfg = write_node_config(tmp_path / "node.toml", port, tmp_path / "data",
                                [Peer("pacs", "ORTHANC", pacs.dicom_port), Peer("echo", "ECHOSCU")],
                                quiet_period_s=30)
        with NodeProcess.start(cfg, port) as node:
            ids = pacs.upload(info.files)
            assert len(ids) == 30
            series_id = pacs.rest("GET", f"/instances/{ids[0]}")["ParentSeries"]
            assert pacs.rest("POST", "/modalities/dicomnode/echo", {}) == {}
            pacs.push("dicomnode", [series_id])
            db = tmp_path / "data" / "state.sqlite3"

            def state() -> tuple | None:
                with sqlite3.connect(db) as c:
                    return c.execute("SELECT state, instance_count, completion_reason, calling_ae FROM series "
                                     "WHERE series_instance_uid=?", (info.series_uid,)).fetchone()

            assert wait_for(lambda: state() is not None and state()[0] == "complete", 15), state()
            st, count, reason, calling = state()  # type: ignore[misc]
            assert (count, reason, calling) == (30, "released-contiguous", "ORTHANC")
            with sqlite3.connect(db) as c:
                paths = [r[0] for r in c.execute("SELECT path FROM instances WHERE series_instance_uid=?",
                                                 (info.series_uid,))]
            sops = set()
            for rel in paths:
                ds = pydicom.dcmread(tmp_path / "data" / "spool" / rel)
                sops.add(ds.SOPInstanceUID)
                assert ds.pixel_array.shape == (64, 64)
            assert sops == set(info.sop_uids)
            status = node.status()
            assert [(s["state"], s["modality"]) for s in status["series"]] == [("complete", modality)]
