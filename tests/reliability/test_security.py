"""Security beyond what tests/integration/test_security_scp.py covers (AE/host allow-lists with the
reject reason, association limit, oversized PDU, TLS required with storescu +tls, plain and
anonymous-TLS refused):

- every socket the node listens on (DICOM, status page, metrics) is bound to 127.0.0.1 by default;
  with ``web.token_env`` set, the status page, the JSON API and the metrics all need the token;
- secrets come only from environment variables named in the config: the TLS key password
  (``tls.key_password_env``), the web token; no config key holds a secret value, and no module
  but config.py reads a variable by name; the secrets never reach a log;
- TLS: a client certificate from another CA is refused (mutual TLS), the right one accepted;
- idle connections (a slow-loris peer) are dropped after ``network_timeout_s`` and an unknown
  caller's association flood leaves the node serving.
"""
from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from dicomnode import config as config_module
from tests.peers import ROOT, NodeProcess, echo, make_ct_series, require_tool, storescu, wait_for
from tests.reliability.conftest import node_config, node_logs, report, text_of_files, storescu_outcomes

pytestmark = [pytest.mark.integration]

TOKEN_ENV = "DICOMNODE_REL_SEC_TOKEN"
TOKEN = "sec-tok-8e2f41c9"
KEY_PW_ENV = "DICOMNODE_REL_KEY_PASSWORD"
KEY_PW = "kpw-3b7d0c55"


def get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_defaults_bind_loopback_and_no_config_key_holds_a_secret() -> None:
    cfg = config_module.Config()
    assert cfg.node.bind_address == "127.0.0.1" and cfg.web.host == "127.0.0.1"
    shipped = config_module.load_config(ROOT / "config" / "node.toml")
    assert shipped.node.bind_address == "127.0.0.1" and shipped.web.host == "127.0.0.1"
    secretish = re.compile(r"pass|token|secret|key|credential", re.I)
    checked = 0
    for name, tp in typing.get_type_hints(config_module.Config).items():
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp  # [[peers]], [[pipelines]]
        if not dataclasses.is_dataclass(tp):
            continue
        for f in dataclasses.fields(tp):
            checked += 1
            if secretish.search(f.name):
                assert f.name.endswith(("_env", "_file")), f"{name}.{f.name} would hold a secret in the file"
    assert checked > 50


def test_only_config_reads_environment_variables_by_name() -> None:
    pattern = re.compile(r"os\.environ\s*(\[|\.get\()|os\.getenv\(|environ\.get\(")
    offenders = []
    for path in (ROOT / "dicomnode").rglob("*.py"):
        if path.name == "config.py" and path.parent.name == "dicomnode":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == [], offenders


def test_every_listening_socket_is_loopback_and_the_token_guards_page_api_and_metrics(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(web=True, token_env=TOKEN_ENV, env={TOKEN_ENV: TOKEN})
    socks = listening(node.proc.proc.pid)
    assert {p for _, p in socks} >= {node.port, node.web_port, node.metrics_port}, socks
    assert {a for a, _ in socks} == {"127.0.0.1"}, socks
    base = f"http://127.0.0.1:{node.web_port}"
    metrics = f"http://127.0.0.1:{node.metrics_port}/metrics"
    codes = {
        "page_no_token": get(base + "/"), "api_no_token": get(base + "/api/status"),
        "api_wrong_token": get(base + "/api/status", "nope"), "api_token": get(base + "/api/status", TOKEN),
        "page_query_token": get(base + f"/?token={TOKEN}"), "healthz": get(base + "/healthz"),
        "metrics_no_token": get(metrics), "metrics_wrong_token": get(metrics, "nope"), "metrics_token": get(metrics, TOKEN),
    }
    report("security_web", codes)
    assert codes["page_no_token"] == codes["api_no_token"] == codes["api_wrong_token"] == 401, codes
    assert codes["api_token"] == codes["page_query_token"] == codes["healthz"] == 200, codes
    assert codes["metrics_no_token"] == codes["metrics_wrong_token"] == 401, codes
    assert codes["metrics_token"] == 200, codes
    node.proc.stop()
    assert TOKEN not in text_of_files(node_logs(node))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CAs; a server certificate with a password-protected key; a client certificate from
    each CA (only the first CA is trusted by the node)."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=dicomnode {ca}", cwd=d)
    for name, ca, protect in (("server", "ca", True), ("client", "ca", False), ("rogue", "rogue-ca", False)):
        pw = ["-pass", f"pass:{KEY_PW}", "-aes256"] if protect else []
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", *pw, "-out", f"{name}.key", cwd=d)
        _openssl("req", "-new", "-key", f"{name}.key", *(["-passin", f"pass:{KEY_PW}"] if protect else []),
                 "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
                 cwd=d)
    return d


def test_tls_key_password_comes_from_the_named_variable_and_foreign_client_certs_are_refused(tmp_path: Path, pki: Path) -> None:
    require_tool("storescu")
    tls = (f'[tls]\nenabled = true\nrequire = true\ncert_file = "{pki / "server.pem"}"\n'
           f'key_file = "{pki / "server.key"}"\nca_file = "{pki / "ca.pem"}"\nkey_password_env = "{KEY_PW_ENV}"\n')
    config, port, _, _ = node_config(tmp_path, extra=tls, name="tls")
    # without the variable the encrypted key cannot be loaded: the node refuses to start, says why
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "dicomnode"), "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tls" in (out.stdout + out.stderr).lower()
    info = make_ct_series(tmp_path / "ct", n=4, rows=32, cols=32)
    log = tmp_path / "tls.out"
    with NodeProcess.start(config, port, log=log, env={KEY_PW_ENV: KEY_PW}, echo_calling="") as node:
        ok = storescu(info.folder, port, extra=["+tls", str(pki / "client.key"), str(pki / "client.pem"),
                                                 "+cf", str(pki / "ca.pem")])
        rogue = storescu(info.folder, port, extra=["+tls", str(pki / "rogue.key"), str(pki / "rogue.pem"),
                                                    "+cf", str(pki / "ca.pem")])
        plain = storescu(info.folder, port)
        results = {"trusted_client": storescu_outcomes(list(info.files), ok.stderr),
                   "foreign_ca_client": storescu_outcomes(list(info.files), rogue.stderr),
                   "plain": storescu_outcomes(list(info.files), plain.stderr)}
        assert node.proc.poll() is None
    report("security_tls", {k: sorted(set(v)) for k, v in results.items()})
    assert set(results["trusted_client"]) == {"Success"}, ok.stderr[-1500:]
    assert "Success" not in results["foreign_ca_client"] and rogue.returncode != 0
    assert "Success" not in results["plain"]
    logs = log.read_text() + out.stdout + out.stderr + text_of_files(sorted((tmp_path / "tls-data" / "logs").glob("*")))
    assert KEY_PW not in logs


def test_idle_connections_are_dropped_and_an_association_flood_leaves_the_node_serving(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(node_extra="network_timeout_s = 2.0\nmax_associations = 4")
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(30)]
    t0 = time.monotonic()

    def closed(s: socket.socket) -> bool:
        """True once the node has ended the connection (an A-ABORT, then EOF)."""
        try:
            while data := s.recv(4096):
                del data
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    for s in idle:
        s.settimeout(0.05)
    assert wait_for(lambda: all(closed(s) for s in idle), 30, 0.2), "idle connections were not dropped"
    dropped_after = time.monotonic() - t0
    for s in idle:
        s.close()
    assert echo(node.port)
    # 200 associations from an unknown caller in a row: each rejected, the node keeps serving
    from pynetdicom import AE

    ae = AE(ae_title="FLOODER")
    ae.add_requested_context("1.2.840.10008.1.1")
    rejected = established = 0
    for _ in range(200):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        rejected += int(assoc.is_rejected)  # the rest: aborted/dropped under the flood, never let in
        if assoc.is_established:
            established += 1
            assoc.release()
    assert established == 0 and rejected >= 150, (established, rejected)
    assert echo(node.port) and node.alive()
    info = make_ct_series(tmp_path / "ct", n=5, rows=32, cols=32)
    assert set(storescu_outcomes(list(info.files), storescu(info.folder, node.port).stderr)) == {"Success"}
    report("security_flood", {"idle_connections": len(idle), "dropped_after_s": round(dropped_after, 1),
                              "flood_associations": 200, "rejected_with_reason": rejected, "let_in": established})


def test_idle_connections_do_not_lock_out_known_peers(start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(node_extra="network_timeout_s = 10.0\nmax_associations = 4")
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(6)]
    try:
        assert echo(node.port)
    finally:
        for s in idle:
            s.close()
