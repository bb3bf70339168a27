"""``dicomnode echo PEER [--config FILE]``: C-ECHO a peer (a name from ``[[peers]]`` or AE@host:port)."""
from __future__ import annotations

import argparse
import sys
import time

from dicomnode.commands.send import resolve_peer
from dicomnode.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("peer", help="peer name from the config, or AE@host:port")
    p.add_argument("--config", default=None, help="TOML config file (for peer names, our AE title, TLS)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the peer answers C-ECHO with success, 1 otherwise."""
    from pynetdicom import AE, evt

    from dicomnode.net.dimse import VERIFICATION, set_nodelay
    from dicomnode.ops.logs import quiet_third_party

    quiet_third_party()
    try:
        target = resolve_peer(args.peer, args.config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ae = AE(ae_title=target.calling_ae)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = args.timeout
    t0 = time.perf_counter()
    kwargs = {"tls_args": (target.ssl_context, None)} if target.ssl_context else {}
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)], **kwargs)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        print(f"echo {target.ae_title}@{target.host}:{target.port}: association failed ({why})", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and int(status.Status) == 0
    code = f"0x{int(status.Status):04X}" if status else "no response"
    print(f"echo {target.ae_title}@{target.host}:{target.port}: {code} in {time.perf_counter() - t0:.3f} s")
    return 0 if ok else 1
