"""Fixtures of the reliability and security suite: real nodes (``dicomnode serve`` subprocesses),
a session Triton (gRPC), Orthanc, and the nightly switch.

``DICOMNODE_NIGHTLY=1`` runs the nightly sizes (more crash rounds, full-size load); without it the
CI sizes keep the whole suite within a few minutes on 2 cores.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import pytest

from tests.peers import NodeProcess, Peer, free_port, write_node_config
from tests.triton_fixture import VENV, triton_repo, triton_server  # noqa: F401  (session fixtures)

NIGHTLY = os.environ.get("DICOMNODE_NIGHTLY") == "1"
FINAL = ("done", "quarantined", "failed")


def sized(ci: int, nightly: int) -> int:
    """``nightly`` under DICOMNODE_NIGHTLY=1, else ``ci``."""
    return nightly if NIGHTLY else ci


@dataclass
class NodeUnderTest:
    """A running ``dicomnode serve`` and where to look at it."""

    proc: NodeProcess
    config: Path
    port: int
    data_dir: Path
    web_port: int = 0
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        """The node's stdout + stderr."""
        return self.proc.log

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.proc.poll() is None

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the node's SQLite state (read-only connection; the node may be running)."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'state.sqlite3'}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def series_outcome(self, series_uid: str) -> tuple[str, str]:
        """(series state, reason of its latest job) or ("absent", "")."""
        rows = self.query("SELECT state FROM series WHERE series_instance_uid = ?", (series_uid,))
        if not rows:
            return "absent", ""
        job = self.query("SELECT state, reason FROM jobs WHERE series_instance_uid = ? ORDER BY job_id DESC LIMIT 1",
                         (series_uid,))
        return rows[0][0], (job[0][1] if job else "")

    def instance_uids(self) -> set[str]:
        """SOP instance UIDs the node holds."""
        return {r[0] for r in self.query("SELECT sop_instance_uid FROM instances")}

    def restart(self, timeout: float = 120.0) -> None:
        """Start the same config again (after ``kill()`` or ``stop()``)."""
        self.proc = NodeProcess.start(self.config, self.port, log=self.proc.log, env=self.env, timeout=timeout)


def node_config(tmp: Path, *, senders: tuple[str, ...] = ("STORESCU", "ECHOSCU", "CORPUS"),
                triton: Any = None, pacs: tuple[str, int] | None = None,
                more_results: tuple[tuple[str, str, int], ...] = (), web: bool = False,
                token_env: str = "", quota_bytes: int = 0, quiet_period_s: float = 1.0,
                node_extra: str = "", extra: str = "", workers: int = 1, name: str = "node") -> tuple[Path, int, int, int]:
    """Write ``tmp/<name>.toml``; returns (path, DICOM port, web port, metrics port).

    ``triton``: a started LocalTriton -> a CT/MR pipeline with the ``body`` model over gRPC;
    ``pacs``: (AE, port) of a peer that receives results (SEG + SR) and may send;
    ``more_results``: further (name, AE, port) peers that receive results.
    """
    port, web_port, metrics_port = free_port(), free_port(), free_port()
    peers = [Peer(ae.lower(), ae, 104) for ae in senders]
    if pacs is not None:
        peers.append(Peer("pacs", pacs[0], pacs[1], receives_results=True))
    peers += [Peer(name, ae, p, may_send=False, receives_results=True) for name, ae, p in more_results]
    lines = [extra]
    if web:
        lines += ["[web]", "enabled = true", 'host = "127.0.0.1"', f"port = {web_port}",
                  f"metrics_port = {metrics_port}", f'token_env = "{token_env}"', ""]
    if triton is not None:
        lines += ["[triton]", f'url = "{triton.grpc_url}"', 'protocol = "grpc"', "retries = 1", "timeout_s = 60", "",
                  "[outbox]", "backoff_base_s = 0.5", "backoff_max_s = 2.0", "timeout_s = 10", "",
                  "[[pipelines]]", 'name = "ct-body"', 'modalities = ["CT", "MR"]', 'models = ["body"]', ""]
    node_lines = f"quota_bytes = {quota_bytes}\nworkers = {workers}\n{node_extra}"
    path = write_node_config(tmp / f"{name}.toml", port, tmp / f"{name}-data", peers, quiet_period_s=quiet_period_s,
                             max_wait_s=max(quiet_period_s, 60.0), node_extra=node_lines, extra="\n".join(lines))
    return path, port, web_port, metrics_port


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_node(**node_config kwargs, env=None, timeout=120) -> NodeUnderTest``;
    every node it started is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[NodeUnderTest] = []

    def _start(*, env: dict[str, str] | None = None, timeout: float = 120.0, **kw: Any) -> NodeUnderTest:
        config, port, web_port, metrics_port = node_config(tmp_path, **kw)
        name = kw.get("name", "node")
        proc = NodeProcess.start(config, port, log=tmp_path / f"{name}.out", env=env, timeout=timeout)
        node = NodeUnderTest(proc, config, port, tmp_path / f"{name}-data", web_port, metrics_port, dict(env or {}))
        started.append(node)
        return node

    yield _start
    for node in started:
        node.proc.stop()


def text_of_files(paths: list[Path]) -> str:
    """Every file's bytes decoded leniently (NULs and binary included), concatenated."""
    out = []
    for p in paths:
        try:
            out.append(p.read_bytes().decode("utf-8", "replace"))
        except OSError:
            pass
    return "\n".join(out)


def node_logs(node: NodeUnderTest) -> list[Path]:
    """The node's stdout/stderr file and every log file under its data directory (Triton's too)."""
    logs = [node.log]
    logs += [p for p in (node.data_dir / "logs").rglob("*") if p.is_file()] if (node.data_dir / "logs").exists() else []
    return logs


def report(name: str, data: dict[str, Any]) -> None:
    """Print a figure for the run log and, with ``DICOMNODE_REPORT_DIR`` set, write it as
    ``<dir>/<name>.json`` (docs/reliability.md is written from these)."""
    import json

    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    print(f"\n[reliability] {name}: {text}")
    out = os.environ.get("DICOMNODE_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text + "\n", encoding="utf-8")


def storescu_outcomes(files: list[Path], stderr: str) -> list[str]:
    """Per file, what ``storescu -v`` reported: "Success", "Refused: OutOfResources", ... or "not sent"."""
    seen: dict[str, str] = {}
    current = ""
    for line in stderr.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (" in line and current:
            seen[current] = line.split("Received Store Response (", 1)[1].rsplit(")", 1)[0]
            current = ""
    return [seen.get(str(f), "not sent") for f in files]


def tally(outcomes: list[str]) -> dict[str, int]:
    """Counts of each outcome."""
    out: dict[str, int] = {}
    for o in outcomes:
        out[o] = out.get(o, 0) + 1
    return out


class FixedPortTriton:
    """A LocalTriton that can be stopped and started again on the same ports (an outage)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.ports = (free_port(), free_port(), free_port())
        self.server: Any = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def start(self) -> None:
        from dicomnode.infer.server import LocalTriton

        self.server = LocalTriton(self.repo, VENV, *self.ports)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def stubs(self) -> list[psutil.Process]:
        """The python-backend stub processes (one per model instance) of the running server."""
        return [p for p in psutil.Process(self.server.pid).children(recursive=True)
                if "triton_python_backend_stub" in " ".join(p.cmdline())]


@pytest.fixture
def own_triton(triton_repo: Path):  # type: ignore[no-untyped-def]
    """A Triton on fixed free ports that the test starts and stops itself (stopped at teardown)."""
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    t = FixedPortTriton(triton_repo)
    try:
        yield t
    finally:
        t.stop()
