"""``dicomnode process SERIES_DIR --out OUT_DIR [--config FILE]``: the node's pipeline, offline.

Runs exactly :func:`dicomnode.pipeline.run_series` on one series folder (with a progress bar on
stderr), using the configured Triton (a local server is started and stopped when
``triton.url = "local"``), and writes into OUT_DIR:

- ``seg.dcm`` - the DICOM-SEG, ``sr.dcm`` - the region report (or, for a quarantined series, the SR
  stating why, where ``results.sr_on_quarantine``);
- ``summary.json`` - state, reason, pipeline, orientation, regions with boxes, per-segment volumes,
  QC and per-stage seconds (no patient data).

Exit codes: 0 done, 3 quarantined, 4 transient failure (try again), 1 internal failure or
invalid config, 2 the inference server could not start / a model contract is broken.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dicomnode.config import PROJECT_ROOT, load_config
from dicomnode.errors import ConfigError, ModelContractError, SeriesError, TransientError

EXIT = {"done": 0, "quarantined": 3, "retry": 4, "failed": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("series_dir", type=Path, help="folder with the DICOM files of one series")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "config" / "node.toml",
                   help="TOML config (default: the embedded config/node.toml)")
    p.add_argument("--triton-url", default=None, help='override triton.url ("local" or host:port)')
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _job(series_uid: str, study_uid: str) -> object:
    from dicomnode.store.records import Job

    now = time.time()
    return Job(job_id=0, series_instance_uid=series_uid, study_instance_uid=study_uid, generation=1,
               state="processing", attempts=1, created_at=now, claimed_at=now, finished_at=None,
               worker="process", reason="", timings_json="{}")


def run(args: argparse.Namespace) -> int:
    """Process one folder; see the module docstring for outputs and exit codes."""
    import dataclasses

    from tqdm import tqdm

    from dicomnode.app import init_logging
    from dicomnode.node_services import DirectorySource, FolderSink, InferenceService, build_context, write_results
    from dicomnode.pipeline import run_series
    from dicomnode.series.convert import read_headers, series_files

    try:
        cfg = load_config(args.config)
        if args.triton_url:
            cfg = dataclasses.replace(cfg, triton=dataclasses.replace(cfg.triton, url=args.triton_url))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    init_logging(cfg, to_file=False)
    try:
        files = series_files(args.series_dir)
        first = read_headers(files[:1])[0] if files else None
    except SeriesError as exc:
        print(f"error: {args.series_dir}: {exc}", file=sys.stderr)
        return 1
    if first is None:
        print(f"error: {args.series_dir}: no files", file=sys.stderr)
        return 1
    job = _job(str(first.get("SeriesInstanceUID", "")), str(first.get("StudyInstanceUID", "")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(desc="dicomnode", unit="stage", file=sys.stderr, disable=args.no_progress, leave=True)
    inference = InferenceService(cfg)
    started = time.perf_counter()
    try:
        bar.set_postfix_str("starting inference")
        import threading

        from dicomnode.warmup import warm_up

        threading.Thread(target=warm_up, args=(cfg.results,), daemon=True).start()  # while Triton starts
        try:
            inference.start()
        except ModelContractError as exc:
            print(f"error: model contract: {exc}", file=sys.stderr)
            return 2
        except (TransientError, OSError, RuntimeError) as exc:
            print(f"error: inference server not available: {exc}", file=sys.stderr)
            return 2
        startup_s = time.perf_counter() - started

        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        sink = FolderSink(out)
        ctx = build_context(cfg, inference, DirectorySource(files), sink, progress=progress)
        outcome = run_series(job, ctx)  # type: ignore[arg-type]
    finally:
        bar.close()
        inference.stop()
    extra = {
        "state": outcome.state,
        "reason": outcome.reason,
        "stages_s": {name: round(s, 4) for name, s in outcome.timings},
        "total_s": round(outcome.total_s, 4),
        "inference_startup_s": round(startup_s, 3),
        "files": sorted(p.name for p in sink.written),
    }
    if outcome.state == "failed":
        extra["traceback"] = outcome.detail
    write_results(out, [], outcome.summary, extra)
    print(json.dumps({"state": outcome.state, "reason": outcome.reason, "total_s": extra["total_s"],
                      "out": str(out)}), file=sys.stderr)
    return EXIT.get(outcome.state, 1)
