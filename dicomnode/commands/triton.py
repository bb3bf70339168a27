"""``dicomnode triton [--models DIR] [--http-port N]``: run the local Triton server until stopped.

Creates the server's venv (``.venv-triton``, from deploy/triton-requirements.txt) when missing,
starts the real ``tritonserver`` on 127.0.0.1 with the model repository, waits for
``/v2/health/ready``, prints the URLs and runs until SIGINT/SIGTERM, then stops it cleanly.
Exit codes: 0 stopped on request, 1 the server failed to start or died, 2 usage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.commands.stopsignal import StopSignals
from dicomnode.errors import ConfigError, ModelContractError, TransientError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dicomnode triton``."""
    parser.add_argument("--models", type=Path, help="model repository (default: [triton] models_dir)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: [triton] http_port, 0 = free)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: [triton] grpc_port, 0 = free)")
    parser.add_argument("--venv", type=Path, help="the server's venv (default: [triton] venv_dir)")
    parser.add_argument("--config", type=Path, help="node config (TOML) with a [triton] section")
    parser.add_argument("--log", type=Path, help="server log file (default: a temporary file)")


def run(args: argparse.Namespace) -> int:
    """Start, print the URLs, wait for a signal, stop."""
    from dicomnode.config import PROJECT_ROOT, TritonConfig, load_config
    from dicomnode.infer.server import LocalTriton

    try:
        t = load_config(args.config).triton if args.config else TritonConfig()
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 2

    def res(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else PROJECT_ROOT / p

    server = LocalTriton(
        args.models or res(t.models_dir), args.venv or res(t.venv_dir),
        http_port=t.http_port if args.http_port is None else args.http_port,
        grpc_port=t.grpc_port if args.grpc_port is None else args.grpc_port,
        log_path=args.log,
    )
    stop = StopSignals()
    try:
        server.start()
    except (TransientError, ModelContractError, RuntimeError, OSError) as exc:
        print(f"triton: failed to start: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"triton ready: http://{server.http_url} grpc {server.grpc_url} (pid {server.pid}, "
              f"models {server.models_dir})", flush=True)
        while not stop.wait(1.0):
            if not server.running:
                print(f"triton: server exited: {server.log_tail(1000)}", file=sys.stderr)
                return 1
        print("triton: stopping", flush=True)
        return 0
    finally:
        server.stop()
        stop.close()
