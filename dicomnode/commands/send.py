"""``dicomnode send DIR --to PEER [--config FILE]``: C-STORE a folder of DICOM files to a peer.

Files are sent as stored (no decoding, no transcoding): one presentation context per SOP class and
transfer syntax found. TCP_NODELAY is on. Prints a summary; exit 1 if any instance failed.
"""
from __future__ import annotations

import argparse
import re
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import ConfigError

PEER_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send: the called AE, host, port, our calling AE and an optional TLS context."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "DICOMNODE"
    ssl_context: ssl.SSLContext | None = None


def resolve_peer(peer: str, config: str | None) -> Target:
    """A peer name from the config's ``[[peers]]`` or ``AE@host:port``.

    Raises ValueError for an unknown name, ConfigError for an invalid config file.
    """
    cfg = None
    if config:
        from dicomnode.config import load_config

        cfg = load_config(config)
    calling = cfg.node.ae_title if cfg else "DICOMNODE"
    m = PEER_RE.match(peer)
    if m:
        return Target(m["ae"], m["host"], int(m["port"]), calling)
    if cfg is None:
        raise ValueError(f"{peer!r}: give AE@host:port, or --config with a peer of that name")
    try:
        p = cfg.peer(peer)
    except KeyError:
        raise ValueError(f"{peer!r}: no such peer in the config") from None
    ctx = None
    if p.tls:
        from dicomnode.net.security import client_ssl_context

        ctx = client_ssl_context(cfg)
    return Target(p.ae_title, p.host, p.port, calling, ctx)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("dir", help="folder (searched recursively) or a single file")
    p.add_argument("--to", required=True, help="peer name from the config, or AE@host:port")
    p.add_argument("--config", default=None, help="TOML config file (peer names, our AE title, TLS)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")


def run(args: argparse.Namespace) -> int:
    """Send every DICOM file; exit 0 when all succeeded, 1 otherwise."""
    from pydicom import dcmread
    from pynetdicom import AE, _config, evt

    from dicomnode.net.dimse import set_nodelay
    from dicomnode.ops.logs import quiet_third_party

    quiet_third_party()
    try:
        target = resolve_peer(args.to, args.config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    root = Path(args.dir)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    items: list[tuple[Path, str, str]] = []
    skipped = 0
    for f in files:
        try:
            meta = dcmread(f, stop_before_pixels=True, specific_tags=[]).file_meta
            items.append((f, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception:
            skipped += 1
    if not items:
        print(f"error: no DICOM Part-10 files under {root}", file=sys.stderr)
        return 1
    contexts = sorted({(c, t) for _, c, t in items})
    if len(contexts) > 128:
        print("error: more than 128 SOP class / transfer syntax pairs; send in parts", file=sys.stderr)
        return 1
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes from the file as they are
    ae = AE(ae_title=target.calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = args.timeout
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    kwargs = {"tls_args": (target.ssl_context, None)} if target.ssl_context else {}
    t0 = time.perf_counter()
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, max_pdu=0,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)], **kwargs)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        print(f"error: association with {target.ae_title}@{target.host}:{target.port} failed ({why})",
              file=sys.stderr)
        return 1
    ok = failed = 0
    try:
        for f, _sop, _ts in items:
            status = assoc.send_c_store(f)
            if status and int(status.Status) in (0x0000, 0xB000, 0xB006, 0xB007):
                ok += 1
            else:
                failed += 1
                code = f"0x{int(status.Status):04X}" if status else "no response"
                print(f"failed: {f.name}: {code}", file=sys.stderr)
                if not assoc.is_established:
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    dt = time.perf_counter() - t0
    failed += len(items) - ok - failed
    print(f"sent {ok}/{len(items)} instance(s) in {dt:.2f} s ({ok / dt if dt else 0:.0f}/s), "
          f"{failed} failed, {skipped} non-DICOM file(s) skipped")
    return 0 if failed == 0 else 1
