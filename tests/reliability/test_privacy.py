"""Privacy: a canary patient sent through every path must not show up anywhere but DICOM files.

The canary (tests/reliability/corpus.py ``CANARY``: name, ID, birth date, accession, institution,
descriptions, and every UID under a recognisable root) goes through ingest (dcmtk storescu),
processing (real Triton), quarantine (a series with a gap), the whole malformed-input corpus, and
the outbox failing in both ways (a PACS that is down -> retries; a PACS that refuses -> dead
letter). Then every log file, the node's stdout/stderr, the Prometheus metrics, the status page,
the JSON API, ``dicomnode status --json``, ``dicomnode outbox list --json``, every job reason and
every outbox error in the database are searched for each canary value.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.peers import DICOMNODE, free_port, storescu, wait_for
from tests.reliability.conftest import FINAL, node_logs, report, text_of_files
from tests.reliability.corpus import CANARY, build_corpus, canary_uid, ct_dataset, encode, part10, send_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN_ENV = "DICOMNODE_REL_WEB_TOKEN"
TOKEN = "rel-token-5d1c"


def canary_series(folder: Path, n: int = 10, skip: tuple[int, ...] = ()) -> tuple[str, list[Path]]:
    """A canary CT series written with pydicom (``skip`` leaves gaps)."""
    study, series = canary_uid(1), canary_uid(2)
    files = []
    for k in range(n):
        if k in skip:
            continue
        ds = ct_dataset(study, series, canary_uid(3), k)
        files.append(part10(folder / f"{k:03d}.dcm", encode(ds), sop_class=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID)))
    return series, files


class RefusingPacs:
    """A PACS that answers every C-STORE with 0xA900 (pynetdicom): the outbox dead-letters."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.port = free_port()
        ae = AE(ae_title="REFUSER")
        for sop in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.5.1.4.1.1.88.34",
                    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"):
            ae.add_supported_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.seen = 0

        def refuse(event: Any) -> int:
            self.seen += 1
            return 0xA900

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])

    def stop(self) -> None:
        self.server.shutdown()


def http(url: str, token: str = "") -> tuple[int, str]:
    """(status, body) of a GET."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def cli(node: Any, *args: str) -> str:
    """stdout + stderr of a dicomnode command against the node's config."""
    out = subprocess.run([str(DICOMNODE), *args, "--config", str(node.config)], capture_output=True, text=True,
                         timeout=120, cwd=str(node.config.parent))
    return out.stdout + out.stderr


def test_canary_patient_never_leaves_dicom_files(tmp_path: Path, start_node, triton_server) -> None:  # type: ignore[no-untyped-def]
    refuser = RefusingPacs()
    dead_port = free_port()  # nothing listens: the outbox retries
    try:
        node = start_node(triton=triton_server, web=True, token_env=TOKEN_ENV, env={TOKEN_ENV: TOKEN},
                          pacs=("DEADPACS", dead_port), more_results=(("refuser", "REFUSER", refuser.port),))
        # ingest + processing + outbox failures (dcmtk storescu, the path a PACS takes)
        good_uid, good_files = canary_series(tmp_path / "good", n=12)
        out = storescu(good_files, node.port)
        assert out.returncode == 0, out.stderr[-2000:]
        # quarantine: a series with a gap
        gap_uid, gap_files = canary_series(tmp_path / "gap", n=8, skip=(3, 4))
        assert all(r.acknowledged for r in send_raw(node.port, gap_files, calling="STORESCU"))
        # bad input: the whole corpus (refusals, quarantines, an over-long UID the DIMSE decoder rejects)
        cases = build_corpus(tmp_path / "corpus")
        for case in cases:
            send_raw(node.port, case.files)
        # an unknown caller (refused at association) and a peer that sends a canary AE title
        assert not send_raw(node.port, good_files[:1], calling="ZZCANARY")[0].acknowledged

        assert wait_for(lambda: node.series_outcome(good_uid)[0] in FINAL and node.series_outcome(gap_uid)[0] in FINAL,
                        120, 0.5)
        assert node.series_outcome(good_uid)[0] == "done", node.series_outcome(good_uid)
        assert node.series_outcome(gap_uid)[0] == "quarantined", node.series_outcome(gap_uid)
        # both outbox failure modes happened: retries against the dead PACS, dead letters from the refuser
        assert wait_for(lambda: node.query("SELECT COUNT(*) FROM outbox WHERE destination='refuser' AND state='dead'")[0][0] >= 2
                        and node.query("SELECT COUNT(*) FROM outbox WHERE destination='pacs' AND attempts >= 2")[0][0] >= 2,
                        60, 0.5), node.query("SELECT destination, state, attempts, last_error FROM outbox")
        assert refuser.seen >= 2

        sources: dict[str, str] = {}
        for p in node_logs(node):
            sources[f"log:{p.name}"] = text_of_files([p])
        base = f"http://127.0.0.1:{node.web_port}"
        for path in ("/", "/api/status", "/healthz", "/nonexistent"):
            sources[f"web:{path}"] = http(base + path, TOKEN)[1]
        sources["web:unauthorised"] = http(base + "/api/status")[1]
        sources["metrics"] = http(f"http://127.0.0.1:{node.metrics_port}/metrics", TOKEN)[1]
        sources["metrics:unauthorised"] = http(f"http://127.0.0.1:{node.metrics_port}/metrics")[1]
        sources["cli:status"] = cli(node, "status", "--json")
        sources["cli:outbox"] = cli(node, "outbox", "list", "--json")
        sources["db:job_reasons"] = "\n".join(r[0] for r in node.query("SELECT reason FROM jobs"))
        sources["db:outbox_errors"] = "\n".join(r[0] for r in node.query("SELECT last_error FROM outbox"))
        sources["db:calling_ae"] = "\n".join(r[0] for r in node.query("SELECT DISTINCT calling_ae FROM series"))
    finally:
        refuser.stop()

    assert "dicomnode_jobs" in sources["metrics"] and "series_key" in sources["web:/api/status"]
    assert json.loads(sources["web:/api/status"])["series"], "the status API shows the series (by key)"
    leaks = {name: [n for n in CANARY.needles() if n in text] for name, text in sources.items()}
    leaks = {k: v for k, v in leaks.items() if v}
    report("privacy", {"sources_checked": sorted(sources), "bytes_checked": sum(len(t) for t in sources.values()),
                       "needles": len(CANARY.needles()), "leaks": leaks})
    assert not leaks, leaks


def test_third_party_errors_are_logged_without_their_text(tmp_path: Path) -> None:
    """A pynetdicom error quoting a received UID reaches the log file without the UID (subprocess:
    ``setup_logging`` replaces the root handlers)."""
    log = tmp_path / "x.log"
    code = (
        "import logging, pathlib, sys\n"
        "from dicomnode.ops.logs import setup_logging\n"
        f"setup_logging(pathlib.Path({str(log)!r}))\n"
        "try:\n"
        f"    raise ValueError('Invalid UID value {CANARY.uid_root}.1')\n"
        "except ValueError:\n"
        f"    logging.getLogger('pynetdicom.dimse').exception('Invalid value {CANARY.uid_root}.2')\n"
        "logging.getLogger('dicomnode.x').warning('own line kept')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = log.read_text() + out.stderr
    assert CANARY.uid_root not in text
    assert "pynetdicom.dimse" in text and "ValueError" in text and "own line kept" in text
