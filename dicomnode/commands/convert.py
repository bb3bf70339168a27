"""``dicomnode convert SERIES_DIR OUT.nii.gz [--report OUT.json]``: a series folder as NIfTI + geometry report.

Exit codes: 0 written, 1 the series was refused (the reason is printed and, with --report, written
as ``{"error": {...}}``), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dicomnode.errors import ConfigError, SeriesError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dicomnode convert``."""
    parser.add_argument("series_dir", type=Path, help="folder with the DICOM files of one series")
    parser.add_argument("output", type=Path, help="NIfTI file to write (.nii or .nii.gz)")
    parser.add_argument("--report", type=Path, help="write the geometry report (JSON) here")
    parser.add_argument("--config", type=Path, help="node config (TOML) whose [geometry] policies apply")
    parser.add_argument("--canonical", action="store_true",
                        help="write the volume reoriented to axial patient axes (as the models see it)")
    parser.add_argument("--multiple-stacks", choices=("largest", "refuse"),
                        help="override the [geometry] multiple_stacks policy")


def run(args: argparse.Namespace) -> int:
    """Convert; returns the exit code. Never prints patient data."""
    import dataclasses

    from dicomnode.config import GeometryConfig, load_config
    from dicomnode.series.convert import read_series_dir, write_nifti
    from dicomnode.series.geometry import to_canonical

    try:
        policy = load_config(args.config).geometry if args.config else GeometryConfig()
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 2
    if args.multiple_stacks:
        policy = dataclasses.replace(policy, multiple_stacks=args.multiple_stacks)
    name = args.output.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        print("output must end in .nii or .nii.gz", file=sys.stderr)
        return 2
    try:
        volume = read_series_dir(args.series_dir, policy)
    except SeriesError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        if args.report:
            err = {"reason": exc.reason, "kind": exc.kind, "detail": exc.detail}
            args.report.write_text(json.dumps({"error": err}, indent=2) + "\n")
        return 1
    if args.canonical:
        volume, _ = to_canonical(volume)
    write_nifti(volume, args.output)
    report = {
        "shape": list(volume.shape),
        "dtype": str(volume.array.dtype),
        "modality": volume.modality,
        "affine_lps": volume.affine.tolist(),
        "geometry": volume.geometry.to_json(),
    }
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    g = volume.geometry
    print(f"wrote {args.output} {volume.shape} {g.acquisition_plane} spacing "
          f"{tuple(round(s, 4) for s in g.spacing)} actions {list(g.actions)}")
    return 0
