"""Ingest speed, side by side: storescu -> the node (durability on), -> dcmtk storescp, -> Orthanc.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--size 512] [--repeat 3]
        [--only node,storescp,orthanc[,node-nofsync,node-pynetdicom,node-pynetdicom-nofsync]]

One run generates a synthetic CT series (int16, uncompressed) and sends it with dcmtk storescu
(TCP_NODELAY=1, one association) to each receiver in turn, ``--repeat`` times, interleaved;
prints the median instances/s of each and the ratios node/Orthanc and node/storescp.
The node runs as ``dicomnode serve`` (fdatasync of every file, fsync of its directory, SQLite WAL
commit before the ack); ``node-nofsync`` is the same node with ``node.fsync = false`` (to separate
the network stack from the disk; not a production setting); ``node-pynetdicom[-nofsync]`` use
``node.scp_engine = "pynetdicom"`` instead of the node's own upper layer. Also prints the cost of one durable
525 kB file write (write + fdatasync + rename + directory fsync) measured in the same run.
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


def fsync_cost_ms(work: Path, n: int = 30) -> float:
    """Median ms for one durable 525 kB file (write, fdatasync, rename, directory fsync)."""
    import os

    d = work / "fsync-probe"
    d.mkdir(exist_ok=True)
    data = os.urandom(525_000)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fd = os.open(d / f"{i}.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.fdatasync(fd)
        os.close(fd)
        os.replace(d / f"{i}.tmp", d / f"{i}.dcm")
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


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
        # a fresh series per repeat: every receiver stores new instances each time (no duplicates)
        series = [make_ct_series(work / f"ct{i}", n=args.slices, rows=args.size, cols=args.size, seed=i)
                  for i in range(args.repeat)]
        mb = sum(f.stat().st_size for f in series[0].files) / 1e6
        print(f"series: {args.slices} slices {args.size}x{args.size}, {mb:.0f} MB, {args.repeat} series")
        receivers: dict[str, tuple[int, str, object]] = {}
        try:
            for name in ("node", "node-nofsync", "node-pynetdicom", "node-pynetdicom-nofsync"):
                if name not in which:
                    continue
                port = free_port()
                extra = ["fsync = false"] if name.endswith("-nofsync") else []
                if "pynetdicom" in name:
                    extra.append('scp_engine = "pynetdicom"')
                cfg = write_node_config(work / f"{name}.toml", port, work / f"{name}-data",
                                        [Peer("scu", "STORESCU"), Peer("echo", "ECHOSCU")], quiet_period_s=60,
                                        node_extra="\n".join(extra))
                receivers[name] = (port, "DICOMNODE", NodeProcess.start(cfg, port))
            if "storescp" in which:
                s = StoreSCP.start(work / "storescp-out", extra=("--ignore",) if False else ())
                receivers["storescp"] = (s.port, "STORESCP", s)
            if "orthanc" in which:
                o = Orthanc.start(work / "orthanc")
                receivers["orthanc"] = (o.dicom_port, "ORTHANC", o)
            times: dict[str, list[float]] = {k: [] for k in receivers}
            for i in range(args.repeat):
                for name, (port, aet, _proc) in receivers.items():
                    times[name].append(timed_send(series[i].folder, port, aet))
            rates = {k: args.slices / statistics.median(v) for k, v in times.items()}
            print(f"durable file write on this disk now: {fsync_cost_ms(work):.1f} ms median")
            print(f"{'receiver':24} {'median s':>9} {'inst/s':>8}   runs (s)")
            for k, v in times.items():
                print(f"{k:24} {statistics.median(v):9.2f} {rates[k]:8.0f}   {', '.join(f'{x:.2f}' for x in v)}")
            if "node" in rates and "orthanc" in rates:
                print(f"node / orthanc  = {rates['node'] / rates['orthanc']:.2f}  (goal >= 2)")
            if "node" in rates and "storescp" in rates:
                print(f"node / storescp = {rates['node'] / rates['storescp']:.2f}  (goal >= 0.5)")
            if "node" in receivers:
                st = receivers["node"][2].status()  # type: ignore[attr-defined]
                print("node: " + "; ".join(f"{s['instances']} instances {s['state']} ({s['completion_reason']})"
                                           for s in st["series"]))
        finally:
            for _port, _aet, proc in receivers.values():
                proc.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    subprocess.run  # noqa: B018  (keep import for type checkers)
    sys.exit(main())
