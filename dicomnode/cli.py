"""The ``dicomnode`` command: a thin dispatcher to one module per command in ``dicomnode.commands``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs, so ``dicomnode echo`` does not pay for torch or SimpleITK.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dicomnode.commands.serve", "run the node: Storage SCP, workers, outbox, status page"),
    "status": ("dicomnode.commands.status", "list the series the node holds and their states"),
    "check-config": ("dicomnode.commands.check_config", "validate a config file and name every problem"),
    "echo": ("dicomnode.commands.echo", "C-ECHO a peer"),
    "send": ("dicomnode.commands.send", "C-STORE a folder of DICOM files to a peer"),
    "convert": ("dicomnode.commands.convert", "convert a DICOM series folder to NIfTI + geometry report"),
    "triton": ("dicomnode.commands.triton", "start the local Triton server with the project's models"),
    "segment": ("dicomnode.commands.segment", "run one served model on a series folder or NIfTI file"),
    "atlas": ("dicomnode.commands.atlas", "build the CTARR atlas from label maps"),
    "regions": ("dicomnode.commands.regions", "locate or learn anatomical regions (CTARR)"),
    "outbox": ("dicomnode.commands.outbox", "list, retry or purge queued results"),
    "process": ("dicomnode.commands.process", "run the whole pipeline offline on a series folder"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace | None]:
    """Build the parser; only the chosen command's module is imported."""
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM-native pipeline node")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser, None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or not hasattr(args, "_run"):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
