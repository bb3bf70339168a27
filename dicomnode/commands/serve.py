"""``dicomnode serve --config FILE [--port N] [--data-dir DIR]``: run the node until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import logging
import sys

from dicomnode.commands.stopsignal import StopSignals
from dicomnode.config import load_config, with_overrides
from dicomnode.errors import ConfigError, ModelContractError

LOG = logging.getLogger("dicomnode.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--port", type=int, default=None, help="DICOM port (overrides node.port)")
    p.add_argument("--data-dir", default=None, help="data directory (overrides node.data_dir)")


def run(args: argparse.Namespace) -> int:
    """Start the node, wait for SIGTERM/SIGINT, stop it gracefully. Exit 0, 1 on a config error,
    2 when the node cannot start (port in use, unusable data directory)."""
    try:
        cfg = with_overrides(load_config(args.config), port=args.port, data_dir=args.data_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    from dicomnode.app import Node, init_logging

    init_logging(cfg)
    stop = StopSignals()
    try:
        node = Node(cfg)
        node.start()
    except (OSError, ConfigError, ModelContractError) as exc:
        LOG.error("node cannot start: %s", exc)
        return 2
    LOG.info("node %s running (data in %s)", cfg.node.ae_title, cfg.data_dir)
    while not stop.wait(1.0):
        pass
    LOG.info("signal %d: stopping", stop.received)
    node.stop()
    stop.close()
    LOG.info("node stopped")
    return 0
