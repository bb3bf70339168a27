"""Ingest speed, side by side: storescu -> the node (durability on), -> dcmtk storescp, -> Orthanc.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--size 512] [--repeat 3] [--only node,storescp,orthanc]

One run generates a synthetic CT series (int16, uncompressed) and sends it with dcmtk storescu
(TCP_NODELAY=1, one association) to each receiver in turn, ``--repeat`` times, interleaved;
prints the median instances/s of each and the ratios node/Orthanc and node/storescp.
The node runs as ``dicomnode serve`` (fsync of every file and directory, SQLite WAL synchronous=FULL).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import (  # noqa: E402
    NodeProcess,
    Orthanc,
    Peer,
    StoreSCP,
    free_port,
    make_ct_series,
    storescu,
    write_node_config,
)


def timed_send(folder: Path, port: int, called: str) -> float:
    """Seconds for one storescu run of the whole folder; raises when any instance failed."""
    t0 = time.perf_counter()
    r = storescu(folder, port, called=called, verbose=False, timeout=900)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {r.stderr[-2000:]}")
    return dt


def main() -> int:
    """Run the benchmark; prints a table and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="node,storescp,orthanc")
    args = ap.parse_args()
    which = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="dn-bench-") as tmp:
        work = Path(tmp)
        info = make_ct_series(work / "ct", n=args.slices, rows=args.size, cols=args.size)
        mb = sum(f.stat().st_size for f in info.files) / 1e6
        print(f"series: {args.slices} slices {args.size}x{args.size}, {mb:.0f} MB")
        receivers: dict[str, tuple[int, str, object]] = {}
        try:
            if "node" in which:
                port = free_port()
                cfg = write_node_config(work / "node.toml", port, work / "node-data",
                                        [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")], quiet_period_s=60)
                receivers["node"] = (port, "DICOMNODE", NodeProcess.start(cfg, port))
            if "storescp" in which:
                s = StoreSCP.start(work / "storescp-out", extra=("--ignore",) if False else ())
                receivers["storescp"] = (s.port, "STORESCP", s)
            if "orthanc" in which:
                o = Orthanc.start(work / "orthanc")
                receivers["orthanc"] = (o.dicom_port, "ORTHANC", o)
            times: dict[str, list[float]] = {k: [] for k in receivers}
            for i in range(args.repeat):
                for name, (port, aet, proc) in receivers.items():
                    if name == "orthanc" and i > 0:  # fresh state each time: delete what was stored
                        proc.rest("DELETE", f"/studies/{proc.rest('GET', '/studies')[0]}")  # type: ignore[attr-defined]
                    times[name].append(timed_send(info.folder, port, aet))
            rates = {k: args.slices / statistics.median(v) for k, v in times.items()}
            print(f"{'receiver':10} {'median s':>9} {'inst/s':>8}   runs (s)")
            for k, v in times.items():
                print(f"{k:10} {statistics.median(v):9.2f} {rates[k]:8.0f}   {', '.join(f'{x:.2f}' for x in v)}")
            if "node" in rates and "orthanc" in rates:
                print(f"node / orthanc  = {rates['node'] / rates['orthanc']:.2f}  (goal >= 2)")
            if "node" in rates and "storescp" in rates:
                print(f"node / storescp = {rates['node'] / rates['storescp']:.2f}  (goal >= 0.5)")
            if "node" in receivers:
                st = receivers["node"][2].status()  # type: ignore[attr-defined]
                s0 = st["series"][0]
                print(f"node: {s0['instances']} instances held, state {s0['state']} ({s0['completion_reason']})")
        finally:
            for _port, _aet, proc in receivers.values():
                proc.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    subprocess.run  # noqa: B018  (keep import for type checkers)
    sys.exit(main())
