"""End-to-end benchmark: a 300-slice 512x512 abdominal CT sent by storescu until SEG and SR are in Orthanc.

    .venv/bin/python benchmarks/e2e.py [--concurrent 5] [--slices 300] [--models body,anatomy19]

One run, real peers on 127.0.0.1: dcmtk ``storescu`` sends the series to ``dicomnode serve``
(local Triton with the project's models), the node sends SEG + SR to a real Orthanc. The CT is
the TotalSegmentator example CT (../shared/data), resampled to 300 x 512 x 512 and written as
DICOM. Reported stage by stage: storescu transfer, node stages (from the status API), wait for
completion / queue / delivery to Orthanc (the rest), with model compute (``infer:*``) separated
from everything else. Side by side in the same run: the same storescu transfer into dcmtk
``storescp`` (the fastest local receiver) as the ingest baseline. Then N series are sent
concurrently and every one must come back (all instances stored, a SEG and an SR each).

Goals (issue 8): < 30 s total, < 3 s for everything but model compute, N = 5 with no loss.
Published peers for scale: MONAI Deploy's hospital figure 2.5 min for one liver CT, a published
nnU-Net node ~5.5 min.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.uid import generate_uid  # noqa: E402

from tests.ct_dicom import nifti_to_dicom  # noqa: E402
from tests.e2e.node_harness import node_config, ports, wait_status  # noqa: E402
from tests.peers import NodeProcess, Orthanc, StoreSCP, peer_env, storescu  # noqa: E402

CT = ROOT.parent / "shared" / "data" / "totalsegmentator" / "example_ct.nii.gz"
MONAI_DEPLOY_S = 150.0
NNUNET_NODE_S = 330.0


def _results_in_orthanc(pacs: Orthanc, study_uid: str) -> set[str]:
    found = pacs.rest("POST", "/tools/lookup", study_uid.encode())
    studies = [f["ID"] for f in found if f.get("Type") == "Study"]
    if not studies:
        return set()
    return {s["MainDicomTags"].get("Modality", "") for s in pacs.rest("GET", f"/studies/{studies[0]}/series?expand")}


def _wait_results(pacs: Orthanc, study_uids: list[str], timeout: float) -> dict[str, float]:
    """Seconds (monotonic) at which SEG and SR were both in Orthanc, per study."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(study_uids) and time.monotonic() < deadline:
        for uid in study_uids:
            if uid not in done and {"SEG", "SR"} <= _results_in_orthanc(pacs, uid):
                done[uid] = time.monotonic()
        time.sleep(0.05)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--concurrent", type=int, default=5)
    ap.add_argument("--models", default="", help="comma list (default: body,anatomy19 + liver region model "
                                                 "when those models exist, else body)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    if not CT.exists():
        print(f"missing {CT}", file=sys.stderr)
        return 2
    have = {p.parent.name for p in (ROOT / "triton_models").glob("*/labels.json")}
    if args.models:
        models = tuple(args.models.split(","))
    else:
        models = ("body", "anatomy19") if {"anatomy19", "liver"} <= have else ("body",)
    full = "anatomy19" in models
    regions = ("liver", "spleen", "kidneys", "urinary_bladder") if full else ()
    region_models = ("liver:liver",) if full and "liver" in have else ()
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-"))
    figures: dict[str, object] = {"models": list(models), "region_models": list(region_models),
                                  "slices": args.slices, "size": args.size}
    try:
        n = max(1, args.concurrent)
        t = time.perf_counter()
        series = [nifti_to_dicom(CT, work / f"ct{i}", shape_ijk=(args.size, args.size, args.slices),
                                 study_uid=generate_uid()) for i in range(1 + n)]
        mb = sum(f.stat().st_size for f in series[0].files) / 1e6
        print(f"prepared {1 + n} series of {args.slices} x {args.size}^2 ({mb:.0f} MB each) in "
              f"{time.perf_counter() - t:.1f} s; models {','.join(models)} regions {','.join(regions) or '-'}")
        # --- baseline: the same transfer into dcmtk storescp ------------------------------------
        with StoreSCP.start(work / "storescp") as scp:
            t = time.perf_counter()
            out = storescu(series[0].folder, scp.port, called=scp.ae_title, verbose=False)
            storescp_s = time.perf_counter() - t
            assert out.returncode == 0, out.stderr
        port, web_port, metrics_port = ports()
        with Orthanc.start(work / "orthanc") as pacs:
            cfg = node_config(work / "node.toml", port=port, data_dir=work / "var", web_port=web_port,
                              metrics_port=metrics_port, pacs=(pacs.ae_title, "127.0.0.1", pacs.dicom_port),
                              models=models, regions=regions, region_models=region_models,
                              workers=args.workers, quiet_period_s=2.0)
            t = time.perf_counter()
            with NodeProcess.start(cfg, port, log=work / "node.log", timeout=180):
                startup_s = time.perf_counter() - t
                # --- one series, stage by stage ---------------------------------------------------
                s0 = series[0]
                t0 = time.monotonic()
                out = storescu(s0.folder, port, verbose=False)
                sent = time.monotonic()
                assert out.returncode == 0, out.stderr
                arrived = _wait_results(pacs, [s0.study_uid], timeout=600)
                if s0.study_uid not in arrived:
                    print("FAILED: SEG/SR did not arrive in Orthanc; node log tail:\n"
                          + (work / "node.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                total = arrived[s0.study_uid] - t0
                status = wait_status(web_port, lambda s: any(x["state"] == "done" for x in s["series"]), 30)
                job = next(x for x in status["series"] if x["state"] == "done")["job"]
                stages = {k: v for k, v in job["stages"]}
                infer_s = sum(v for k, v in stages.items() if k.startswith("infer:"))
                model_s = float(job.get("model_compute_s", infer_s))  # time inside Triton requests
                send_s = sent - t0
                rest_s = total - send_s - job["total_s"]
                figures.update({"storescu_to_node_s": round(send_s, 3), "storescu_to_storescp_s": round(storescp_s, 3),
                                "node_stages_s": stages, "node_job_s": job["total_s"], "model_compute_s": round(model_s, 3),
                                "infer_stages_s": round(infer_s, 3),
                                "completion_queue_delivery_s": round(rest_s, 3), "total_s": round(total, 3),
                                "non_model_s": round(total - model_s, 3), "node_startup_s": round(startup_s, 2)})
                print(f"\none series ({args.slices} slices): storescu -> node {send_s:.2f} s "
                      f"(storescp baseline {storescp_s:.2f} s, ratio {send_s / storescp_s:.2f})")
                for k, v in stages.items():
                    print(f"  {k:<24} {v:7.3f} s")
                print(f"  {'completion+queue+to PACS':<24} {rest_s:7.3f} s")
                print(f"total {total:.2f} s (goal < 30), model compute (inside Triton requests) {model_s:.2f} s "
                      f"of {infer_s:.2f} s in infer:* stages, everything else {total - model_s:.2f} s (goal < 3)")
                print(f"vs MONAI Deploy 2.5 min: {MONAI_DEPLOY_S / total:.1f}x faster; vs nnU-Net node 5.5 min: "
                      f"{NNUNET_NODE_S / total:.1f}x faster")
                # --- N series concurrently -----------------------------------------------------
                batch = series[1:]
                t0 = time.monotonic()
                procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "DICOMNODE", "+sd", "+r",
                                           "127.0.0.1", str(port), str(s.folder)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env=peer_env())
                         for s in batch]
                rcs = [p.wait(600) for p in procs]
                sent_all = time.monotonic() - t0
                arrived = _wait_results(pacs, [s.study_uid for s in batch], timeout=900)
                status = wait_status(web_port, lambda s: sum(x["state"] == "done" for x in s["series"]) >= 1 + n, 120)
                by_count = sorted(x["instances"] for x in status["series"])
                lost = [s.study_uid for s in batch if s.study_uid not in arrived]
                wall = (max(arrived.values()) - t0) if arrived else float("nan")
                per = sorted(round(v - t0, 1) for v in arrived.values())
                ok = not lost and all(rc == 0 for rc in rcs) and by_count == [args.slices] * (1 + n)
                figures.update({"concurrent": n, "concurrent_sent_s": round(sent_all, 2), "concurrent_wall_s": round(wall, 2),
                                "concurrent_results_at_s": per, "concurrent_lost": len(lost),
                                "instances_per_series": by_count, "concurrent_ok": ok})
                print(f"\n{n} series concurrently: all sent in {sent_all:.1f} s, SEG+SR for {len(arrived)}/{n} in "
                      f"Orthanc after {per} s; instances stored per series {by_count}; "
                      f"{'no loss' if ok else 'LOSS OR FAILURE'}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        print("\n" + json.dumps(figures))
        return 0 if figures.get("concurrent_ok") else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
