"""Helpers shared by the end-to-end tests and ``benchmarks/e2e.py``: a node config for a real
``dicomnode serve`` with a local Triton, and polling of its JSON status API."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tests.peers import free_port


def node_config(path: Path, *, port: int, data_dir: Path, web_port: int, metrics_port: int,
                senders: tuple[tuple[str, str], ...] = (("storescu", "STORESCU"), ("echo", "ECHOSCU")),
                pacs: tuple[str, str, int] | None = None, models: tuple[str, ...] = ("body",),
                regions: tuple[str, ...] = (), region_models: tuple[str, ...] = (),
                workers: int = 1, quiet_period_s: float = 2.0, token_env: str = "") -> Path:
    """Write a node TOML: local Triton, the given CT pipeline, status page + metrics on the given ports.

    ``senders`` are (peer name, AE) allowed to C-STORE; ``pacs`` is (AE, host, port) of a peer that
    both sends and receives results.
    """
    lines = ["[node]", 'ae_title = "DICOMNODE"', f"port = {port}", f'data_dir = "{data_dir}"',
             'bind_address = "127.0.0.1"', "min_free_bytes = 0", f"workers = {workers}", ""]
    for name, ae in senders:
        lines += ["[[peers]]", f'name = "{name}"', f'ae_title = "{ae}"', 'host = "127.0.0.1"', "port = 104",
                  "may_send = true", ""]
    if pacs is not None:
        lines += ["[[peers]]", 'name = "pacs"', f'ae_title = "{pacs[0]}"', f'host = "{pacs[1]}"', f"port = {pacs[2]}",
                  "may_send = true", "receives_results = true", ""]
    lines += ["[completion]", f"quiet_period_s = {quiet_period_s}", "max_wait_s = 120", "",
              "[triton]", 'url = "local"', "",
              "[web]", "enabled = true", 'host = "127.0.0.1"', f"port = {web_port}", f"metrics_port = {metrics_port}",
              f'token_env = "{token_env}"', "",
              "[results]", 'write_dir = "results"', "",
              "[[pipelines]]", 'name = "ct"', 'modalities = ["CT"]', f"models = {json.dumps(list(models))}",
              f"regions = {json.dumps(list(regions))}", f"region_models = {json.dumps(list(region_models))}", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ports() -> tuple[int, int, int]:
    """(DICOM, web, metrics) free ports."""
    return free_port(), free_port(), free_port()


def get_json(url: str, token: str = "", timeout: float = 10.0) -> Any:
    """GET ``url`` and parse JSON."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_status(web_port: int, pred: Callable[[dict[str, Any]], bool], timeout: float, token: str = "",
                interval: float = 0.25) -> dict[str, Any]:
    """Poll /api/status until ``pred(status)``; returns it, raises TimeoutError with the last status."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = get_json(f"http://127.0.0.1:{web_port}/api/status", token)
            if pred(last):
                return last
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"status condition not reached in {timeout} s; last status: {json.dumps(last)[:3000]}")


def finished(n: int) -> Callable[[dict[str, Any]], bool]:
    """Status predicate: at least ``n`` series in a final state."""
    return lambda s: sum(1 for x in s.get("series", []) if x["state"] in ("done", "quarantined", "failed")) >= n
