"""Who may talk to the node: calling-AE and host allow-lists, DICOM TLS, association/PDU limits.

Real peers: dcmtk echoscu/storescu (+tls with certificates made here by openssl) and pynetdicom.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.peers import (
    NodeProcess,
    Peer,
    acked_files,
    echo,
    free_port,
    make_ct_series,
    peer_env,
    require_tool,
    storescu,
    wait_for,
    write_node_config,
)

pytestmark = pytest.mark.integration


def _echoscu(port: int, calling: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    require_tool("echoscu")
    return subprocess.run(["echoscu", "-v", *extra, "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=peer_env(), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module", params=["fast", "pynetdicom"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with a small association limit and PDU size, with each SCP engine."""
    d = tmp_path_factory.mktemp("sec")
    port = free_port()
    cfg = write_node_config(d / "node.toml", port, d / "data",
                            [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU"),
                             Peer("results-only", "RESULTSONLY", may_send=False)],
                            node_extra=f'max_associations = 2\nmax_pdu = 65536\nscp_engine = "{request.param}"')
    with NodeProcess.start(cfg, port) as n:
        yield n


def test_unknown_calling_ae_is_rejected_with_reason(node: NodeProcess) -> None:
    r = _echoscu(node.port, "STRANGER")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Association Rejected" in out
    assert "Rejected Permanent" in out and "Calling AE Title Not Recognized" in out, out
    # a configured peer that may not send is refused the same way
    r2 = _echoscu(node.port, "RESULTSONLY")
    assert r2.returncode != 0 and "Calling AE Title Not Recognized" in r2.stdout + r2.stderr
    assert _echoscu(node.port, "ECHOSCU").returncode == 0
    assert "STRANGER" not in node.log.read_text()  # the refusal is logged without the AE title


def test_association_limit(node: NodeProcess) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert third.is_rejected  # (2, 3, 2): transient, local limit exceeded
    finally:
        for a in held:
            a.release()
    assert wait_for(lambda: echo(node.port), 10)


def test_oversized_pdu_closes_the_connection(node: NodeProcess) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(b"\x04\x00" + struct.pack(">L", 1_000_000_000) + b"\x00" * 1024)  # announces ~1 GB
    assert wait_for(lambda: not assoc.is_established, 10)
    assert "over the limit" in node.log.read_text()
    assert echo(node.port)  # the node is still serving


def test_host_allow_list(tmp_path: Path) -> None:
    port = free_port()
    for host, allowed in (("127.0.0.9", False), ("127.0.0.1", True), ("localhost", True)):
        cfg = write_node_config(tmp_path / f"node-{host}.toml", port, tmp_path / "data",
                                [Peer("echo", "ECHOSCU", host=host)], node_extra="check_caller_host = true")
        with NodeProcess.start(cfg, port, echo_calling="") as node:
            r = _echoscu(port, "ECHOSCU")
            assert (r.returncode == 0) is allowed, (host, r.stdout + r.stderr)
            if not allowed:
                assert "Calling AE Title Not Recognized" in r.stdout + r.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=dicomnode test CA", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


@pytest.mark.parametrize("engine", ["fast", "pynetdicom"])
def test_tls_required(tmp_path: Path, pki: Path, engine: str) -> None:
    require_tool("storescu")
    port = free_port()
    tls = (f'[tls]\nenabled = true\nrequire = true\ncert_file = "{pki / "server.pem"}"\n'
           f'key_file = "{pki / "server.key"}"\nca_file = "{pki / "ca.pem"}"\n')
    cfg = write_node_config(tmp_path / "node.toml", port, tmp_path / "data",
                            [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")], extra=tls,
                            node_extra=f'scp_engine = "{engine}"')
    info = make_ct_series(tmp_path / "ct", n=5, rows=32, cols=32)
    with NodeProcess.start(cfg, port, echo_calling="") as node:
        tls_args = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
        r = storescu(info.folder, port, extra=tls_args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(acked_files(r.stderr)) == 5
        # plain DICOM is refused when TLS is required
        plain = storescu(info.folder, port)
        assert plain.returncode != 0 and not acked_files(plain.stderr)
        assert not echo(port)
        assert "plain connection refused" in node.log.read_text()
        # TLS without a client certificate signed by our CA is refused too
        anon = _echoscu(port, "ECHOSCU", ("+tla", "-ic"))
        assert anon.returncode != 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # still serving
            s.close()
        time.sleep(0.2)
        r2 = storescu(info.folder, port, extra=tls_args)
        assert r2.returncode == 0


def test_oversized_data_set_aborts_and_stores_nothing(tmp_path: Path) -> None:
    """``node.max_instance_bytes`` bounds the memory one C-STORE may take."""
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port, tmp_path / "data",
                            [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")], node_extra="max_instance_bytes = 100000")
    big = make_ct_series(tmp_path / "big", n=1, rows=256, cols=256)  # 131 kB of pixels
    small = make_ct_series(tmp_path / "small", n=1, rows=64, cols=64)
    with NodeProcess.start(cfg, port) as node:
        r = storescu(big.folder, port)
        assert r.returncode != 0 and not acked_files(r.stderr)
        assert "data set over 100000 bytes" in node.log.read_text()
        assert not list((tmp_path / "data" / "spool").rglob("*.dcm"))
        assert storescu(small.folder, port).returncode == 0  # still serving


def test_idle_connections_do_not_count_as_associations(node: NodeProcess) -> None:
    """More idle TCP connections than ``max_associations`` (2) do not lock a known peer out."""
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(4)]
    try:
        assert echo(node.port)
    finally:
        for s in idle:
            s.close()
