"""``dicomnode status --config FILE [--json]``: the series the node holds and their states.

Series are named by their keyed hash (as in the logs), never by UID; no patient data is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from dicomnode.config import load_config, with_overrides
from dicomnode.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--data-dir", default=None, help="data directory (overrides node.data_dir)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, default=1000, help="at most this many series (most recent first)")


def collect(cfg: object, limit: int = 1000) -> dict[str, object]:
    """The status document: series (key, modality, instances, state, job) and counts by state."""
    from dicomnode.ops.logs import load_or_create_key, series_key, set_hash_key
    from dicomnode.store.db import SqliteDatabase, sqlite_path

    path = sqlite_path(cfg)  # type: ignore[arg-type]
    if not path.exists():  # the node never ran here: nothing to show, nothing to create
        return {"series": [], "counts": {}, "jobs": {}, "generated_at": round(time.time(), 3)}
    secret = cfg.secret(cfg.logging.hash_key_env)  # type: ignore[attr-defined]
    set_hash_key(secret.encode() if secret else load_or_create_key(cfg.data_dir / "log-hash.key"))  # type: ignore[attr-defined]
    db = SqliteDatabase(path)
    try:
        series = db.list_series(limit)
        jobs = Counter(j.state for j in db.list_jobs(limit=100000))
        out = []
        for s in series:
            job = db.job_for_series(s.series_instance_uid)
            out.append({
                "series": series_key(s.series_instance_uid),
                "modality": s.modality,
                "instances": s.instance_count,
                "bytes": s.bytes,
                "state": s.state,
                "completion_reason": s.completion_reason,
                "generation": s.generation,
                "first_received_at": round(s.first_received_at, 3),
                "last_received_at": round(s.last_received_at, 3),
                "released_at": None if s.released_at is None else round(s.released_at, 3),
                "completed_at": None if s.completed_at is None else round(s.completed_at, 3),
                "job": None if job is None else {"id": job.job_id, "state": job.state, "attempts": job.attempts,
                                                 "reason": job.reason},
            })
        return {"series": out, "counts": dict(Counter(s.state for s in series)), "jobs": dict(jobs),
                "generated_at": round(time.time(), 3)}
    finally:
        db.close()


def run(args: argparse.Namespace) -> int:
    """Print the status; exit 0, or 1 on a config error."""
    try:
        cfg = with_overrides(load_config(args.config), data_dir=args.data_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    doc = collect(cfg, args.limit)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{'series':20} {'mod':4} {'inst':>6} {'state':12} {'job':>6}")
    for s in doc["series"]:  # type: ignore[union-attr]
        job = s["job"]["id"] if s["job"] else "-"
        print(f"{s['series']:20} {s['modality']:4} {s['instances']:>6} {s['state']:12} {job:>6}")
    print("counts:", ", ".join(f"{k}={v}" for k, v in sorted(doc["counts"].items())) or "none")  # type: ignore[union-attr]
    return 0
