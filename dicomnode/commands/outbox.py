"""``dicomnode outbox list|retry|purge --config FILE``: operate the durable result outbox.

- ``list [--state S] [--destination D] [--json]``: entries (id, destination, kind, state,
  attempts, next attempt, last error) with series named by their keyed hash, never by UID;
- ``retry [--id N ...] [--destination D] [--pending]``: dead entries (and with ``--pending`` also
  those waiting in backoff) become due now; a running node's sender picks them up;
- ``purge [--state sent|dead] [--older-than-days N]``: delete entries (and their files).

Exit codes: 0 done, 1 config error, 2 nothing matched (retry/purge).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from dicomnode.config import load_config, with_overrides
from dicomnode.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("action", choices=("list", "retry", "purge"))
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--data-dir", default=None, help="data directory (overrides node.data_dir)")
    p.add_argument("--state", action="append", choices=("pending", "sent", "dead"),
                   help="only entries in this state (repeatable); purge default: sent")
    p.add_argument("--destination", default=None, help="only entries for this peer name")
    p.add_argument("--id", type=int, action="append", dest="ids", help="retry: only this entry id (repeatable)")
    p.add_argument("--pending", action="store_true", help="retry: also pending entries waiting in backoff")
    p.add_argument("--older-than-days", type=float, default=0.0, help="purge: untouched for this long")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="list: print JSON")


def _row(e: object) -> dict[str, object]:
    from dicomnode.ops.logs import series_key

    return {
        "id": e.id, "destination": e.destination, "kind": e.kind, "series": series_key(e.series_instance_uid),  # type: ignore[attr-defined]
        "state": e.state, "attempts": e.attempts, "next_attempt_at": round(e.next_attempt_at, 3),  # type: ignore[attr-defined]
        "created_at": round(e.created_at, 3), "sent_at": None if e.sent_at is None else round(e.sent_at, 3),  # type: ignore[attr-defined]
        "last_error": e.last_error,  # type: ignore[attr-defined]
    }


def run(args: argparse.Namespace) -> int:
    """Run one outbox action; see the module docstring for exit codes."""
    try:
        cfg = with_overrides(load_config(args.config), data_dir=args.data_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    from dicomnode.ops.logs import load_or_create_key, set_hash_key
    from dicomnode.store.outbox import DEAD, PENDING, SENT, Outbox

    secret = cfg.secret(cfg.logging.hash_key_env)
    set_hash_key(secret.encode() if secret else load_or_create_key(cfg.data_dir / "log-hash.key"))
    outbox = Outbox.open(cfg)
    try:
        if args.action == "list":
            rows = [_row(e) for e in outbox.list(tuple(args.state or ()), args.destination, args.limit)]
            if args.json:
                print(json.dumps({"entries": rows, "counts": outbox.counts()}, indent=2))
            else:
                now = time.time()
                print(f"{'id':>6} {'destination':<14} {'kind':<6} {'state':<8} {'tries':>5} {'next in':>9}  last error")
                for r in rows:
                    wait = max(0.0, float(r["next_attempt_at"]) - now) if r["state"] == PENDING else 0.0  # type: ignore[arg-type]
                    print(f"{r['id']:>6} {str(r['destination'])[:14]:<14} {str(r['kind'])[:6]:<6} {r['state']:<8} "
                          f"{r['attempts']:>5} {wait:>8.0f}s  {r['last_error']}")
                print(" ".join(f"{k}={v}" for k, v in outbox.counts().items()))
            return 0
        if args.action == "retry":
            states = tuple(args.state or ((DEAD, PENDING) if args.pending else (DEAD,)))
            n = outbox.retry(args.ids, destination=args.destination, states=states)
            print(f"{n} entr{'y' if n == 1 else 'ies'} due now")
            return 0 if n else 2
        states = tuple(args.state or (SENT,))
        n = outbox.purge(states, args.older_than_days * 86400.0)
        print(f"{n} entr{'y' if n == 1 else 'ies'} purged")
        return 0 if n else 2
    finally:
        outbox.close()
