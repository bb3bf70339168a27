"""Writing a 19-segment DICOM-SEG for a 512x512x300 CT: the node vs its peers, side by side, one run.

- node:      ``dicomnode.results.seg.build_seg`` + ``save_as``
- highdicom: a plain ``highdicom.seg.Segmentation(...)`` call with default arguments, same label
             map, + ``save_as``
- dcmqi:     ``itkimage2segimage`` (label map NRRD + JSON metadata + the DICOM folder)

Each variant runs in its own fresh process: wall time of the SEG creation + write after a warm-up
on a tiny series (for dcmqi the whole tool run, which includes reading the DICOM folder); peak RSS (VmHWM of the Python process,
which also holds the inputs; for dcmqi the tool's own maxrss). The synthetic CT (300 files, 157 MB) and the label map (19 ellipsoid
"organs" of realistic extent) are written once to a temporary folder first.

    .venv/bin/python benchmarks/seg.py [--slices 300] [--keep DIR]
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
N_SEGMENTS = 19


def make_inputs(folder: Path, slices: int) -> None:
    """Write the CT series (DICOM files) and the label map (npy + NRRD on the CT grid)."""
    import SimpleITK as sitk

    from tests.dicom_synth import make_series, manifest, source_volume, write_series

    shape = (slices, 512, 512)
    src = make_series(shape=shape, spacing=(1.0, 0.78, 0.78), origin=(-200.0, -200.0, -150.0))
    write_series(src, folder / "ct")
    rng = np.random.default_rng(0)
    lab = np.zeros(shape, np.uint8)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for k in range(N_SEGMENTS):  # organ-like extents: 15-40 % of the slices, 40-120 px across
        cz = rng.uniform(0.2, 0.8) * shape[0]
        rz = rng.uniform(0.08, 0.2) * shape[0]
        cy, cx = rng.uniform(140, 370, size=2)
        ry, rx = rng.uniform(20, 60, size=2)
        lab[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = k + 1
    np.save(folder / "labels.npy", lab)
    vol = source_volume(src, array=lab)
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((0.78, 0.78, 1.0))
    img.SetOrigin(tuple(float(v) for v in vol.origin))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(folder / "labels.nrrd"))
    m = manifest(n_labels=N_SEGMENTS)
    meta = {
        "ContentCreatorName": "bench", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "bench", "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "",
        "segmentAttributes": [[{
            "labelID": l.value, "SegmentDescription": l.name, "SegmentLabel": l.name,
            "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": m.name,
            "SegmentedPropertyCategoryCodeSequence": {"CodeValue": l.category.value, "CodingSchemeDesignator": l.category.scheme, "CodeMeaning": l.category.meaning},
            "SegmentedPropertyTypeCodeSequence": {"CodeValue": l.type.value, "CodingSchemeDesignator": l.type.scheme, "CodeMeaning": l.type.meaning},
            "recommendedDisplayRGBValue": list(l.color),
        } for l in m.labels]],
        "ContentLabel": "SEG", "ContentDescription": "bench",
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    nonempty = sum(int(np.any(lab == k + 1, axis=(1, 2)).sum()) for k in range(N_SEGMENTS))
    (folder / "frames.txt").write_text(str(nonempty))


def _headers(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((folder / "ct").glob("*.dcm"))]


def run_variant(name: str, folder: Path) -> None:
    """Child process: build + write one SEG, print JSON {seconds, frames}."""
    if name == "dcmqi":
        t = time.perf_counter()
        res = subprocess.run([str(BIN / "itkimage2segimage"), "--inputImageList", str(folder / "labels.nrrd"),
                              "--inputDICOMDirectory", str(folder / "ct"), "--inputMetadata", str(folder / "meta.json"),
                              "--outputDICOM", str(folder / "dcmqi.dcm"), "--skip"], capture_output=True, text=True)
        dt = time.perf_counter() - t
        if res.returncode != 0:
            raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
        import pydicom

        import resource

        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        frames = int(pydicom.dcmread(folder / "dcmqi.dcm", stop_before_pixels=True).NumberOfFrames)
        print(json.dumps({"seconds": dt, "frames": frames, "peak_rss_mib": peak}))
        return
    headers = _headers(folder)
    lab = np.load(folder / "labels.npy")
    from dicomnode.config import ResultsConfig
    from dicomnode.infer.models import Prediction
    from tests.dicom_synth import make_series, manifest, source_volume

    m = manifest(n_labels=N_SEGMENTS)
    # warm-up on a tiny series: one-time per process costs (imports, highdicom's lazily loaded
    # standard tables, ~1-2 s) are paid once by a long-running node, not per series
    tiny = make_series(shape=(3, 16, 16))
    tiny_lab = np.zeros((3, 16, 16), np.uint8)
    tiny_lab[1, 4:8, 4:8] = 1
    if name == "node":
        from dicomnode.results.seg import build_seg

        build_seg(tiny, [Prediction(source_volume(tiny, array=tiny_lab), m)], ResultsConfig())
        pred = Prediction(source_volume(headers, array=lab), m)
        t = time.perf_counter()
        seg = build_seg(headers, [pred], ResultsConfig())
        seg.save_as(folder / "node.dcm", enforce_file_format=True)
    else:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        algo = hd.AlgorithmIdentificationSequence(name=m.name, family=codes.cid7162.ArtificialIntelligence, version=m.version)
        descs = [hd.seg.SegmentDescription(
            segment_number=l.value, segment_label=l.name,
            segmented_property_category=hd.sr.CodedConcept(l.category.value, l.category.scheme, l.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(l.type.value, l.type.scheme, l.type.meaning),
            algorithm_type="AUTOMATIC", algorithm_identification=algo) for l in m.labels]
        hd.seg.Segmentation(tiny, tiny_lab, "BINARY", descs, hd.UID(), 300, hd.UID(), 1, "bench", "bench", "1", "1")
        t = time.perf_counter()
        seg = hd.seg.Segmentation(headers, lab, "BINARY", descs, hd.UID(), 300, hd.UID(), 1, "bench", "bench", "1", "1")
        seg.save_as(folder / "highdicom.dcm", enforce_file_format=True)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "frames": int(seg.NumberOfFrames), "peak_rss_mib": _vm_hwm_mib()}))


def _vm_hwm_mib() -> float:
    """Peak resident memory of this process (VmHWM; includes loading the inputs, ~0.1 GB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, folder: Path) -> dict:
    """Run one variant in a fresh process; its time and the process's peak RSS (MiB)."""
    proc = subprocess.Popen([sys.executable, __file__, "--variant", name, "--folder", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if proc.wait() != 0:
        raise SystemExit(f"{name} failed: {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--keep", default=None, help="keep inputs/outputs in this folder")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        run_variant(args.variant, Path(args.folder))
        return 0
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segbench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        make_inputs(folder, args.slices)
        print(f"inputs: {args.slices} x 512 x 512 CT, {N_SEGMENTS} segments, "
              f"{(folder / 'frames.txt').read_text()} non-empty frames ({time.perf_counter() - t:.1f} s to make)")
        rows = {name: measure(name, folder) for name in ("node", "highdicom", "dcmqi")}
        fastest_peer = min(rows["highdicom"]["seconds"], rows["dcmqi"]["seconds"])
        print(f"{'variant':<10} {'seconds':>8} {'frames':>7} {'peak RSS MiB':>13} {'vs node':>8}")
        for name, r in rows.items():
            print(f"{name:<10} {r['seconds']:>8.2f} {r['frames']:>7} {r['peak_rss_mib']:>13.0f} "
                  f"{r['seconds'] / rows['node']['seconds']:>7.2f}x")
        print(f"node / fastest peer = {rows['node']['seconds'] / fastest_peer:.2f} "
              f"(goal <= 1.00), node under 2 s: {rows['node']['seconds'] < 2.0}")
        import pydicom

        from dicomnode.results.reading import read_seg

        headers = _headers(folder)
        node = read_seg(pydicom.dcmread(folder / "node.dcm"), headers)
        ref = read_seg(pydicom.dcmread(folder / "highdicom.dcm"), headers)
        same = all(np.array_equal(node.mask(k), ref.mask(k)) for k in range(1, N_SEGMENTS + 1))
        print(f"node SEG masks == highdicom SEG masks (all {N_SEGMENTS} segments): {same}")
        if shutil.which("dciodvfy"):
            res = subprocess.run(["dciodvfy", str(folder / "node.dcm")], capture_output=True, text=True)
            problems = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith(("Error", "Warning"))]
            print(f"dciodvfy on the node's SEG: {len(problems)} errors/warnings")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
