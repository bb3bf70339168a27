"""DICOM series -> NIfTI, side by side: the node vs SimpleITK's ImageSeriesReader vs dcm2niix.

    .venv/bin/python benchmarks/convert.py [--slices 300] [--size 512] [--repeat 3] [--gz] [--profile]

One run generates a synthetic CT series (int16 stored, RescaleIntercept -1024, Explicit VR Little
Endian, shuffled file order), reads it once to warm the page cache, and converts it ``--repeat`` times
with each tool, interleaved (medians reported), each in its own process (so peak
RSS is that process's own, measured with wait4): the node (``read_series_dir`` + ``write_nifti``),
SimpleITK (``ImageSeriesReader`` + ``WriteImage``) and ``dcm2niix``. All write an uncompressed .nii
(``--gz``: .nii.gz; dcm2niix then uses pigz if installed, else its internal zlib). Prints wall time
(process start to exit, including the interpreter start and imports), CPU time (user + sys: less
sensitive to other load on the machine), the in-process conversion time (what the node pays per
series: its imports are paid once at start-up), peak RSS, ratios, and the node's peak RSS relative to the volume size. ``--profile`` adds a cProfile of
the node's conversion (where the time goes). Last, the node converts the series four times in
the benchmark's own process (the node's real situation: a server whose imports and page faults for
the output array are paid once) and prints the median of the last three.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_series(folder: Path, n: int, size: int) -> int:
    """Write an n-slice size x size CT series (files in shuffled order); returns the volume bytes."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = (((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2) < 1
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    order = list(range(n))
    random.Random(0).shuffle(order)
    for k, i in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Convert", "BENCH", "CT"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-250.0, -250.0, round(-400.0 + 1.25 * i, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.SliceThickness = 1.25
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        img = np.where(body, 1024 + 40 + (i % 50), 0) + rng.integers(0, 30, (size, size))
        ds.PixelData = img.astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{k:05d}.dcm", enforce_file_format=True)
    return n * size * size * 2


def child(tool: str, series: Path, out: Path) -> None:
    """Run one conversion in this process; prints {"convert_s": ...} as the last line."""
    if tool == "node":
        t0 = time.perf_counter()
        from dicomnode.series.convert import read_series_dir, write_nifti

        t1 = time.perf_counter()
        vol = read_series_dir(series)
        t2 = time.perf_counter()
        write_nifti(vol, out)
        t3 = time.perf_counter()
        print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "write_s": t3 - t2, "convert_s": t3 - t1}))
    elif tool == "sitk":
        t0 = time.perf_counter()
        import SimpleITK as sitk

        t1 = time.perf_counter()
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
        img = reader.Execute()
        t2 = time.perf_counter()
        sitk.WriteImage(img, str(out))
        t3 = time.perf_counter()
        print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "write_s": t3 - t2, "convert_s": t3 - t1}))


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    # communicate() reaped the child; its rusage is the max over children so far -> fresh runner per tool
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-1500:]}")
    return wall, 0.0, out


def measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall s, peak RSS MB, CPU s, stdout) of ``cmd``, run through a tiny runner so that wait4
    reports this child's own peak RSS and CPU time."""
    runner = (
        "import os,subprocess,sys,time,json\n"
        "t=time.perf_counter(); p=subprocess.Popen(sys.argv[1:],stdout=subprocess.PIPE,text=True)\n"
        "out=p.stdout.read(); _,status,ru=os.wait4(p.pid,0); wall=time.perf_counter()-t\n"
        "print(out, end=''); print(json.dumps({'wall':wall,'rss_mb':ru.ru_maxrss/1024,'status':status,"
        "'cpu':ru.ru_utime+ru.ru_stime}))\n"
    )
    wall, _, out = run([sys.executable, "-c", runner, *cmd])
    meta = json.loads(out.strip().splitlines()[-1])
    if meta["status"] != 0:
        raise RuntimeError(f"{cmd[0]} exited with status {meta['status']}")
    return meta["wall"], meta["rss_mb"], meta["cpu"], out


def main() -> int:
    """Generate, convert with each tool once, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="conversions per tool (interleaved; medians)")
    ap.add_argument("--gz", action="store_true", help="write .nii.gz instead of .nii")
    ap.add_argument("--profile", action="store_true", help="also cProfile the node's conversion")
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "SERIES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    ext = ".nii.gz" if args.gz else ".nii"
    with tempfile.TemporaryDirectory(prefix="dn-convbench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        vol_bytes = make_series(work / "ct", args.slices, args.size)
        files_mb = sum(f.stat().st_size for f in (work / "ct").iterdir()) / 1e6
        print(f"series: {args.slices} slices {args.size}x{args.size}, {files_mb:.0f} MB of files, "
              f"volume {vol_bytes / 2**20:.0f} MiB int16 (generated in {time.perf_counter() - t0:.1f} s)")
        for f in (work / "ct").iterdir():
            f.read_bytes()  # same page-cache state for every tool
        samples: dict[str, list[tuple[float, float | None, float, float]]] = {}
        me = [sys.executable, str(Path(__file__).resolve()), "--child"]
        tools = ["node", "sitk"] + (["dcm2niix"] if shutil.which("dcm2niix") else [])
        if "dcm2niix" not in tools:
            print("dcm2niix not installed: skipped")
        for rep in range(args.repeat):
            for tool in tools:
                out = work / f"{tool}{rep}{ext}"
                if tool == "dcm2niix":
                    d = work / f"d2n{rep}"
                    d.mkdir()
                    cmd = ["dcm2niix", "-z", "y" if args.gz else "n", "-b", "n", "-f", "ref", "-o", str(d),
                           str(work / "ct")]
                    wall, rss, cpu, _ = measured(cmd)
                    samples.setdefault(tool, []).append((wall, None, rss, cpu))
                else:
                    wall, rss, cpu, text = measured([*me, tool, str(work / "ct"), str(out)])
                    info = json.loads(text.strip().splitlines()[-2])
                    samples.setdefault(tool, []).append((wall, info["convert_s"], rss, cpu))
                out.unlink(missing_ok=True)
        rows = {
            tool: (statistics.median(s[0] for s in ss),
                   statistics.median(s[1] for s in ss) if ss[0][1] is not None else None,
                   max(s[2] for s in ss),
                   statistics.median(s[3] for s in ss))
            for tool, ss in samples.items()
        }
        print(f"(medians of {args.repeat} interleaved runs; peak RSS = max)")
        print(f"\n{'tool':<10} {'wall s':>8} {'CPU s':>7} {'in-process s':>13} {'peak RSS MB':>12}")
        for tool, (wall, conv, rss, cpu) in rows.items():
            conv_s = f"{conv:13.2f}" if conv is not None else f"{'-':>13}"
            print(f"{tool:<10} {wall:8.2f} {cpu:7.2f} {conv_s} {rss:12.0f}")
        if "node" in rows:
            node_wall, node_conv, node_rss, node_cpu = rows["node"]
            for other in ("dcm2niix", "sitk"):
                if other in rows:
                    o_wall, _, _, o_cpu = rows[other]
                    print(f"node / {other}: wall {node_wall / o_wall:.2f}, CPU {node_cpu / o_cpu:.2f}, "
                          f"node in-process / {other} wall {node_conv / o_wall:.2f}")
            print(f"node peak RSS / volume size: {node_rss * 2**20 / vol_bytes:.2f} (goal < 2.5)")
            # the node converts inside a running server: imports and first-touch page faults are paid once
            from dicomnode.series.convert import read_series_dir, write_nifti

            warm = []
            for rep in range(4):
                t0 = time.perf_counter()
                write_nifti(read_series_dir(work / "ct"), work / f"warm{ext}")
                warm.append(time.perf_counter() - t0)
            node_warm = statistics.median(warm[1:])
            print(f"node in a running process (median of 3 after one warm-up): {node_warm:.2f} s", end="")
            if "dcm2niix" in rows:
                print(f"; / dcm2niix wall {node_warm / rows['dcm2niix'][0]:.2f}")
            else:
                print()
        if args.profile:
            import cProfile
            import pstats

            from dicomnode.series.convert import read_series_dir, write_nifti

            prof = cProfile.Profile()
            prof.enable()
            write_nifti(read_series_dir(work / "ct"), work / f"prof{ext}")
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
