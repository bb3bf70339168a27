"""``dicomnode segment INPUT --model NAME --out LABELS.nii.gz``: one served model on one volume.

INPUT is a DICOM series folder or a NIfTI file. The label map is written on the input's grid.
The server is ``--triton URL`` (``host:port``), else the config's ``[triton] url``; ``local`` (the
default) starts the project's own Triton server for the duration of the command.
Exit codes: 0 written, 1 refused input or inference failure, 2 usage/config.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from dicomnode.errors import ConfigError, ModelContractError, SeriesError, TransientError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dicomnode segment``."""
    parser.add_argument("input", type=Path, help="DICOM series folder or .nii/.nii.gz file")
    parser.add_argument("--model", required=True, help="served model name, e.g. body")
    parser.add_argument("--out", required=True, type=Path, help="label map to write (.nii or .nii.gz)")
    parser.add_argument("--config", type=Path, help="node config (TOML): [triton] and [geometry]")
    parser.add_argument("--triton", help='"host:port" of a running server, or "local" (default: config)')
    parser.add_argument("--protocol", choices=("http", "grpc"), help="override [triton] protocol")
    parser.add_argument("--shared-memory", choices=("auto", "off"), help="override [triton] shared_memory")
    parser.add_argument("--models", type=Path, help="model repository / manifests (default: [triton] models_dir)")
    parser.add_argument("--modality", default="CT", choices=("CT", "MR"), help="modality of a NIfTI input")


def run(args: argparse.Namespace) -> int:
    """Segment and write; returns the exit code. Never prints patient data."""
    import dataclasses

    from dicomnode.config import PROJECT_ROOT, GeometryConfig, TritonConfig, load_config
    from dicomnode.infer.client import InferenceClient
    from dicomnode.infer.models import load_manifest
    from dicomnode.infer.server import LocalTriton
    from dicomnode.series.convert import load_input, write_nifti

    name = args.out.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        print("--out must end in .nii or .nii.gz", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config) if args.config else None
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 2
    t = cfg.triton if cfg else TritonConfig()
    t = dataclasses.replace(
        t, url=args.triton or t.url, protocol=args.protocol or t.protocol,
        shared_memory=args.shared_memory or t.shared_memory,
        models_dir=str(args.models.resolve()) if args.models else t.models_dir,
    )
    policy = cfg.geometry if cfg else GeometryConfig()

    def res(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else PROJECT_ROOT / p

    try:
        manifest = load_manifest(res(t.models_dir) / args.model / "labels.json")
    except ModelContractError as exc:
        print(f"unknown or invalid model: {exc}", file=sys.stderr)
        return 2
    try:
        volume = load_input(args.input, policy, modality=args.modality)
        if volume.modality not in manifest.modalities:  # refused before any server starts
            raise SeriesError("modality_not_supported", kind="unsupported",
                              detail=f"{args.model} takes {'/'.join(manifest.modalities)}, not {volume.modality}")
    except SeriesError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    try:
        with contextlib.ExitStack() as stack:
            if t.url == "local":
                server = stack.enter_context(LocalTriton(res(t.models_dir), res(t.venv_dir), t.http_port, t.grpc_port))
                url = server.grpc_url if t.protocol == "grpc" else server.http_url
            else:
                url = t.url
            client = stack.enter_context(InferenceClient.from_config(t, url))
            client.check_contract([args.model])
            started = time.monotonic()
            pred = client.segment(volume, args.model)
            elapsed = time.monotonic() - started
            shm = client.uses_shared_memory
    except (TransientError, ModelContractError, SeriesError) as exc:
        print(f"inference failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    write_nifti(pred.labels, args.out)
    counts = np.bincount(np.asarray(pred.labels.array).ravel(), minlength=pred.manifest.n_classes)
    found = ", ".join(f"{l.name}={int(counts[l.value])}" for l in pred.manifest.labels if counts[l.value])
    print(f"wrote {args.out} {pred.labels.shape} model {pred.manifest.name} {pred.manifest.version} "
          f"in {elapsed:.2f} s ({t.protocol}{' + shared memory' if shm else ''}); voxels: {found or 'none'}")
    return 0
