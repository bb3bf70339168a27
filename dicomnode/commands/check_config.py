"""``dicomnode check-config FILE``: validate a config file and name every problem."""
from __future__ import annotations

import argparse
import sys

from dicomnode.config import load_config
from dicomnode.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("file", help="TOML config file")


def run(args: argparse.Namespace) -> int:
    """Print OK or every problem; exit 0 when valid, 1 otherwise."""
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(cfg.peers)} peer(s), {len(cfg.pipelines)} pipeline(s))")
    return 0
