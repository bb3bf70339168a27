"""Who may talk to the node: calling-AE and host allow-lists, and DICOM TLS.

:class:`AllowList` decides at association time (A-ASSOCIATE-RJ reasons per PS3.8 9.3.4):
an unknown calling AE is rejected permanent / service-user / "calling AE title not recognized"
(1, 1, 3); a known AE calling from a host it is not configured with gets the same answer (the
standard has no host reason, and telling the caller more would help an attacker).

:func:`server_ssl_context` / :func:`client_ssl_context` build ``ssl.SSLContext`` objects from the
``[tls]`` section; they raise :class:`ConfigError` when files are missing or unreadable.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from functools import lru_cache

from dicomnode.config import Config
from dicomnode.errors import ConfigError

#: (result, source, diagnostic) of A-ASSOCIATE-RJ for a caller that is not allowed.
REJECT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)


@dataclass(frozen=True, slots=True)
class AllowedCaller:
    """One peer allowed to send: its AE title and (when host checks are on) its addresses."""

    ae_title: str
    hosts: frozenset[str]


@dataclass(frozen=True, slots=True)
class AllowList:
    """Calling AEs (and optionally hosts) allowed to associate with the node."""

    callers: tuple[AllowedCaller, ...]
    require_known_callers: bool
    check_host: bool

    @classmethod
    def from_config(cls, cfg: Config) -> "AllowList":
        """Peers with ``may_send = true``; host names are resolved to addresses once, here."""
        callers = tuple(
            AllowedCaller(p.ae_title, frozenset(_addresses(p.host)) if cfg.node.check_caller_host else frozenset())
            for p in cfg.peers if p.may_send
        )
        return cls(callers, cfg.node.require_known_callers, cfg.node.check_caller_host)

    def permits(self, calling_ae: str, host: str) -> bool:
        """True if ``calling_ae`` calling from ``host`` may associate."""
        if not self.require_known_callers:
            return True
        ae = calling_ae.strip()
        for c in self.callers:
            if c.ae_title == ae and (not self.check_host or _norm(host) in c.hosts):
                return True
        return False


def _norm(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


@lru_cache(maxsize=256)
def _addresses(host: str) -> tuple[str, ...]:
    """Every address ``host`` resolves to (the literal itself if it does not resolve)."""
    out = {host}
    try:
        for info in socket.getaddrinfo(host, None):
            out.add(_norm(str(info[4][0])))
    except OSError:
        pass
    return tuple(sorted(out))


def server_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """The SCP's TLS context, or None when ``[tls] enabled = false``.

    TLS 1.2+, server certificate + key from the config; with ``ca_file`` clients must present a
    certificate signed by that CA. Raises ConfigError when a file cannot be loaded.
    """
    t = cfg.tls
    if not t.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg)
    if t.ca_file:
        try:
            ctx.load_verify_locations(cafile=str(cfg.path(t.ca_file)))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"tls.ca_file: cannot load: {exc}"]) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(cfg: Config) -> ssl.SSLContext:
    """A TLS context for sending to peers with ``tls = true`` (verifies them against ``ca_file``
    when set, presents the node's certificate when configured). Raises ConfigError."""
    t = cfg.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    if t.ca_file:
        try:
            ctx.load_verify_locations(cafile=str(cfg.path(t.ca_file)))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"tls.ca_file: cannot load: {exc}"]) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if t.cert_file and t.key_file:
        _load_chain(ctx, cfg)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cfg: Config) -> None:
    t = cfg.tls
    password = cfg.secret(t.key_password_env)
    try:
        ctx.load_cert_chain(str(cfg.path(t.cert_file)), str(cfg.path(t.key_file)), password=password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"tls.cert_file/key_file: cannot load: {exc}"]) from exc


def looks_like_tls(first_byte: bytes) -> bool:
    """True if the first byte of a connection is a TLS handshake record (0x16), not a DICOM PDU."""
    return first_byte[:1] == b"\x16"
