"""Status web page + JSON API (no patient data).

- ``GET /``            a plain HTML page with a little inline JavaScript (no external assets) that
                       renders ``/api/status`` every 2 s;
- ``GET /api/status``  JSON: node, queue depths, series (``series_key`` hashes, modality, state,
                       instance counts, job state, per-stage timings), recent failures with reasons,
                       per-stage timing statistics;
- ``GET /healthz``     "ok" (no token needed; for container health checks).

Series are identified only by :func:`series_key` (a keyed hash); no names, IDs, dates, UIDs or
descriptions are ever served. Failure reasons are the machine-readable first line only (the
traceback stays in the job record). Binds ``web.host`` (127.0.0.1 by default). When the config
names ``web.token_env`` and that variable is set, every request except /healthz needs
``Authorization: Bearer <token>`` (the page passes ``?token=`` from its own URL on to the API).
"""
from __future__ import annotations

import hmac
import json
import logging
import statistics
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dicomnode.config import Config
from dicomnode.ops.logs import series_key

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def _stages(timings_json: str) -> list[list[Any]]:
    try:
        data = json.loads(timings_json or "{}")
    except ValueError:
        return []
    stages = data.get("stages", []) if isinstance(data, dict) else []
    return [[str(n), float(s)] for n, s in stages if isinstance(n, str)]


def _compute(timings_json: str) -> list[list[Any]]:
    try:
        data = json.loads(timings_json or "{}")
    except ValueError:
        return []
    items = data.get("compute", []) if isinstance(data, dict) else []
    return [[str(n), float(s)] for n, s in items if isinstance(n, str)]


def _reason_code(reason: str) -> str:
    return (reason or "").splitlines()[0][:200] if reason else ""


def status_snapshot(cfg: Config, db: Any, pool: Any = None, outbox: Any = None, *, limit: int = 200) -> dict[str, Any]:
    """The JSON document of ``/api/status`` (counts, states, hashes and timings only)."""
    now = time.time()
    series = db.list_series(limit=limit)
    jobs = db.list_jobs(limit=5000)
    latest: dict[str, Any] = {}
    for j in jobs:  # newest first
        latest.setdefault(j.series_instance_uid, j)
    queue: dict[str, int] = {}
    for j in jobs:
        queue[j.state] = queue.get(j.state, 0) + 1
    series_out = []
    for s in series:
        job = latest.get(s.series_instance_uid)
        stages = _stages(job.timings_json) if job else []
        series_out.append({
            "series_key": series_key(s.series_instance_uid),
            "modality": s.modality,
            "state": s.state,
            "instances": s.instance_count,
            "megabytes": round(s.bytes / 1e6, 1),
            "age_s": round(now - s.last_received_at, 1),
            "completion": s.completion_reason,
            "job": None if job is None else {
                "id": job.job_id, "state": job.state, "attempts": job.attempts,
                "reason": _reason_code(job.reason), "stages": stages,
                "total_s": round(sum(t for _, t in stages), 3),
                "model_compute_s": round(sum(t for _, t in _compute(job.timings_json)), 3),
            },
        })
    failures = [
        {"series_key": series_key(j.series_instance_uid), "job": j.job_id, "state": j.state,
         "reason": _reason_code(j.reason), "ago_s": round(now - (j.finished_at or now), 1)}
        for j in jobs if j.state in ("failed", "quarantined") or (j.state == "queued" and j.reason)
    ][:50]
    per_stage: dict[str, list[float]] = {}
    for j in jobs:
        if j.state == "done":
            for name, secs in _stages(j.timings_json):
                per_stage.setdefault(name, []).append(secs)
    stage_stats = {
        name: {"n": len(v), "mean_s": round(statistics.fmean(v), 3), "median_s": round(statistics.median(v), 3),
               "max_s": round(max(v), 3)}
        for name, v in per_stage.items()
    }
    return {
        "node": {"ae_title": cfg.node.ae_title, "port": cfg.node.port, "version": VERSION,
                 "workers": cfg.node.workers, "in_flight": pool.in_flight() if pool is not None else 0,
                 "uptime_s": round(now - pool.started_at, 1) if pool is not None and pool.started_at else None,
                 "triton": "local" if cfg.triton.url == "local" else "remote"},
        "queue": queue,
        "outbox": outbox.counts() if outbox is not None else {},
        "series_states": _count(s.state for s in series),
        "series": series_out,
        "recent_failures": failures,
        "stage_stats": stage_stats,
        "generated_at": now,
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicomnode status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eee} td:first-child{white-space:nowrap} .num{text-align:right;font-variant-numeric:tabular-nums}
.done{color:#1a7f37;font-weight:600} .failed,.quarantined{color:#b42318;font-weight:600}
.processing,.queued,.complete{color:#9a6700;font-weight:600} .receiving{color:#555}
.bar{display:inline-block;height:.8em;background:#4a78c2;margin-right:.3em;vertical-align:middle}
#meta{color:#555} .pill{display:inline-block;border-radius:1em;background:#e8eefc;padding:0 .6em;margin-right:.4em}
</style></head><body>
<h1>dicomnode</h1><div id="meta">loading&hellip;</div>
<h2>Queue</h2><div id="queue"></div><h2>Outbox</h2><div id="outbox"></div>
<h2>Series</h2><table id="series"><thead><tr><th>series</th><th>modality</th><th>state</th>
<th class="num">instances</th><th class="num">MB</th><th>job</th><th class="num">total s</th><th class="num">model s</th><th>stages (s)</th></tr></thead><tbody></tbody></table>
<h2>Stage timings (done jobs)</h2><table id="stages"><thead><tr><th>stage</th><th class="num">n</th>
<th class="num">mean s</th><th class="num">median s</th><th class="num">max s</th></tr></thead><tbody></tbody></table>
<h2>Recent failures</h2><table id="failures"><thead><tr><th>series</th><th>job</th><th>state</th><th>reason</th>
<th class="num">ago s</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
function el(tag, text, cls){const e=document.createElement(tag); if(text!==undefined) e.textContent=String(text); if(cls) e.className=cls; return e;}
function row(cells){const tr=document.createElement("tr"); for(const c of cells){tr.appendChild(c);} return tr;}
function fill(id, rows){const tb=document.querySelector("#"+id+" tbody"); tb.replaceChildren(...rows);
  if(!rows.length){const td=el("td","none"); td.colSpan=9; tb.appendChild(row([td]));}}
function stagesCell(stages){const td=el("td"); for(const [n,s] of stages){const sp=el("span","","pill");
  const b=el("span","","bar"); b.style.width=Math.max(2,Math.min(120,s*8))+"px"; sp.appendChild(b);
  sp.appendChild(document.createTextNode(n+" "+s.toFixed(2))); td.appendChild(sp);} return td;}
async function refresh(){
  try{
    const r = await fetch("/api/status", {headers: token ? {"Authorization": "Bearer "+token} : {}});
    if(!r.ok){document.getElementById("meta").textContent="status: HTTP "+r.status; return;}
    const s = await r.json();
    const n = s.node;
    document.getElementById("meta").textContent = "AE "+n.ae_title+" port "+n.port+" | version "+n.version+
      " | workers "+n.workers+" ("+n.in_flight+" busy) | Triton "+n.triton+" | updated "+new Date(s.generated_at*1000).toLocaleTimeString();
    const q = document.getElementById("queue"); q.replaceChildren();
    for(const [k,v] of Object.entries(s.queue)){q.appendChild(el("span", k+": "+v, "pill"));}
    if(!Object.keys(s.queue).length) q.textContent="empty";
    const o = document.getElementById("outbox"); o.replaceChildren();
    for(const [k,v] of Object.entries(s.outbox)){o.appendChild(el("span", k+": "+v, "pill"));}
    if(!Object.keys(s.outbox).length) o.textContent="no results queued";
    fill("series", s.series.map(x => row([el("td",x.series_key), el("td",x.modality), el("td",x.state,x.state),
      el("td",x.instances,"num"), el("td",x.megabytes,"num"),
      el("td", x.job ? (x.job.state+(x.job.reason?" ("+x.job.reason+")":"")) : "-", x.job ? x.job.state : ""),
      el("td", x.job ? x.job.total_s.toFixed(2) : "", "num"), el("td", x.job ? x.job.model_compute_s.toFixed(2) : "", "num"), stagesCell(x.job ? x.job.stages : [])])));
    fill("stages", Object.entries(s.stage_stats).map(([k,v]) => row([el("td",k), el("td",v.n,"num"),
      el("td",v.mean_s.toFixed(3),"num"), el("td",v.median_s.toFixed(3),"num"), el("td",v.max_s.toFixed(3),"num")])));
    fill("failures", s.recent_failures.map(f => row([el("td",f.series_key), el("td",f.job), el("td",f.state,f.state),
      el("td",f.reason), el("td",f.ago_s,"num")])));
  }catch(e){document.getElementById("meta").textContent="status: "+e;}
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


class StatusServer:
    """The status page and JSON API on ``web.host:web.port`` in a background thread."""

    def __init__(self, cfg: Config, db: Any, pool: Any = None, outbox: Any = None, *, port: int | None = None) -> None:
        self.cfg = cfg
        self.db = db
        self.pool = pool
        self.outbox = outbox
        self.token = cfg.secret(cfg.web.token_env) or ""
        self._port = cfg.web.port if port is None else port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the page."""
        return f"http://{self.cfg.web.host}:{self.port}"

    def start(self) -> "StatusServer":
        """Bind and serve; raises OSError when the port cannot be bound."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "dicomnode"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - never log paths/queries
                return

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy",
                                 "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                 "connect-src 'self'")
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self, query: dict[str, list[str]]) -> bool:
                if not server.token:
                    return True
                header = self.headers.get("Authorization", "")
                given = header[7:] if header.startswith("Bearer ") else (query.get("token") or [""])[0]
                return hmac.compare_digest(given.encode(), server.token.encode())

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                parts = urlsplit(self.path)
                if parts.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")
                    return
                if not self._authorised(parse_qs(parts.query)):
                    self._send(HTTPStatus.UNAUTHORIZED, b"unauthorised\n", "text/plain; charset=utf-8")
                    return
                if parts.path in ("/", "/index.html"):
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif parts.path == "/api/status":
                    try:
                        doc = status_snapshot(server.cfg, server.db, server.pool, server.outbox)
                    except Exception:  # noqa: BLE001 - report, do not crash the page server
                        log.exception("status snapshot failed")
                        self._send(500, b'{"error": "status unavailable"}', "application/json")
                        return
                    self._send(200, json.dumps(doc).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

        self._httpd = ThreadingHTTPServer((self.cfg.web.host, self._port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status-web", daemon=True)
        self._thread.start()
        log.info("status page on http://%s:%d/", self.cfg.web.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
