"""``dicomnode regions locate|learn``: CTARR region boxes on a scan, or learn a new region.

locate INPUT [--labels LABELS.nii.gz] --json
    INPUT is a DICOM series folder or a NIfTI file. Without ``--labels`` the anatomy19 model runs on
    Triton (``[triton]`` of the config). Prints the orientation finding, the transform, every
    region's box in input voxel indices (ordered as the input's array axes: (i, j, k) for NIfTI,
    (slice, row, column) for DICOM) and in LPS mm, the QC report and the seconds spent.
learn --anatomy A1 A2 ... --masks M1 M2 ... --name NAME [--threshold T]
    Paper section 3.4. Anatomy label maps (CTARR ids, or TotalSegmentator ids with --class-map) or
    ``--images`` (anatomy19 via Triton) paired with region masks (non-zero, or --mask-labels ids);
    ``--phantoms N`` adds procedural phantoms whose mask is ``--phantom-classes``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from dicomnode.anatomy.atlas import CLASS_INDEX, N_CLASSES, load_atlas, load_totalseg_class_map, map_totalseg
from dicomnode.volume import Volume


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the command."""
    p.add_argument("--config", help="node config TOML (default: the embedded config/node.toml)")
    p.add_argument("--atlas", help="atlas .npz (default: [anatomy] atlas_file)")
    p.add_argument("--regions-dir", help="regions folder (default: [anatomy] regions_dir)")
    p.add_argument("--triton", help='"host:port" of a running Triton, or "local" (default: [triton] url)')
    sub = p.add_subparsers(dest="action", required=True)
    loc = sub.add_parser("locate", help="register a scan and print every region's box")
    loc.add_argument("input", help="DICOM series folder or NIfTI file")
    loc.add_argument("--labels", help="anatomy label map (NIfTI) instead of running anatomy19 on Triton")
    loc.add_argument("--class-map", help="TotalSegmentator class_maps.json: --labels hold 'total' ids")
    loc.add_argument("--regions", nargs="*", help="only these regions (default: all)")
    loc.add_argument("--json", action="store_true", help="print JSON (the default output is a short summary)")
    lea = sub.add_parser("learn", help="learn a region from labelled scans (paper section 3.4)")
    lea.add_argument("--images", nargs="*", default=[], help="scans (anatomy19 via Triton), paired with --masks")
    lea.add_argument("--anatomy", nargs="*", default=[], help="anatomy label maps, paired with --masks")
    lea.add_argument("--class-map", help="TotalSegmentator class_maps.json for --anatomy and --mask-labels names")
    lea.add_argument("--masks", nargs="*", default=[], help="region masks (NIfTI)")
    lea.add_argument("--mask-labels", nargs="*", default=[], help="label ids or names forming the region (default: non-zero)")
    lea.add_argument("--phantoms", type=int, default=0, help="add N procedural phantoms")
    lea.add_argument("--phantom-seed", type=int, default=1000, help="first phantom seed")
    lea.add_argument("--phantom-classes", nargs="*", default=[], help="CTARR class names forming the region in phantoms")
    lea.add_argument("--name", required=True)
    lea.add_argument("--threshold", type=float, default=0.0)
    lea.add_argument("--margin", type=float, default=10.0, help="margin (mm) added on use")
    lea.add_argument("--out-dir", help="write <out-dir>/<name>.json (default: --regions-dir)")


def _config(args: argparse.Namespace) -> Any:
    from dicomnode.config import PROJECT_ROOT, load_config

    return load_config(args.config or PROJECT_ROOT / "config" / "node.toml")


def _read(path: Path) -> Volume:
    from dicomnode.series.convert import load_input

    return load_input(Path(path))


def _anatomy_labels(path: Path, class_map: str | None) -> Volume:
    v = _read(path)
    if class_map:
        return v.with_array(map_totalseg(v.array, load_totalseg_class_map(Path(class_map))))
    arr = np.asarray(v.array).astype(np.int16)
    return v.with_array(np.where((arr >= 0) & (arr <= N_CLASSES), arr, 0).astype(np.int16))


class _Anatomy19(NamedTuple):
    segment: Callable[[Volume], Volume]
    prepare: Callable[[Volume], Volume]

    def locate(self, volume: Volume, atlas: Any) -> Any:
        """The node's orientation decision (anatomy/turns.py): a TurnFinding. Raises ValueError
        when no turn shows any of the 19 anatomies."""
        from dicomnode.anatomy.turns import orientation_by_turns

        return orientation_by_turns(volume, self.segment, atlas, prepare=self.prepare)


@contextlib.contextmanager
def _anatomy_model(cfg: Any, triton_url: str | None = None) -> Iterator["_Anatomy19"]:
    """Yields the anatomy19 model (``segment(volume)`` -> labels on its canonical 3 mm grid, and
    ``prepare(volume)`` -> the volume on that grid); a ``local`` url starts the project's Triton for
    the duration. Raises TransientError or ModelContractError.
    """
    from dicomnode.infer import tiling
    from dicomnode.infer.client import InferenceClient
    from dicomnode.infer.server import LocalTriton

    t = dataclasses.replace(cfg.triton, url=triton_url or cfg.triton.url)
    with contextlib.ExitStack() as stack:
        if t.url == "local":
            server = stack.enter_context(LocalTriton(cfg.resource(t.models_dir), cfg.resource(t.venv_dir),
                                                     t.http_port, t.grpc_port))
            url = server.grpc_url if t.protocol == "grpc" else server.http_url
        else:
            url = t.url
        client = stack.enter_context(InferenceClient.from_config(t, url))
        client.check_contract(["anatomy19"])
        manifest = client.manifest("anatomy19")
        yield _Anatomy19(lambda volume: client.segment_native(volume, "anatomy19").labels,
                         lambda volume: tiling.to_model_grid(volume, manifest))


def _axes_of(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    if path.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
        return "nifti (i, j, k)", True
    return "dicom (slice, row, column)", False


def run_locate(args: argparse.Namespace) -> int:
    """Locate every region; print JSON (or a summary)."""
    from dicomnode.anatomy import qc as anatomy_qc
    from dicomnode.anatomy.register import register
    from dicomnode.anatomy.regions import load_regions, region_boxes

    cfg = _config(args)
    atlas = load_atlas(Path(args.atlas) if args.atlas else cfg.resource(cfg.anatomy.atlas_file))
    regions = load_regions(Path(args.regions_dir) if args.regions_dir else cfg.resource(cfg.anatomy.regions_dir))
    if args.regions:
        missing = [r for r in args.regions if r not in regions]
        if missing:
            print(f"error: unknown region(s) {missing}; known: {sorted(regions)}", file=sys.stderr)
            return 2
        regions = {k: regions[k] for k in args.regions}
    src = Path(args.input)
    volume = _read(src)
    if args.labels:
        anatomy = _anatomy_labels(Path(args.labels), args.class_map)
        t1 = time.perf_counter()
        reg = register(anatomy, atlas)
        t_inf, t_reg = 0.0, time.perf_counter() - t1
    else:  # the model on the 8 turns of the scan decides the orientation, as in the node
        with _anatomy_model(cfg, args.triton) as model:
            found = model.locate(volume, atlas)
        anatomy, reg, t_inf, t_reg = found.labels, found.registration, found.seconds_model, found.seconds_fit
    t2 = time.perf_counter()
    axes, reverse = _axes_of(src)
    out_regions: dict[str, Any] = {}
    for name, region in regions.items():
        boxes = region_boxes(volume, reg, region)
        items = []
        for lo, hi in boxes:
            empty = bool(np.any(hi <= lo))
            corners = np.array([[a, b, c] for a in (lo[0], hi[0] - 1) for b in (lo[1], hi[1] - 1) for c in (lo[2], hi[2] - 1)])
            mm = volume.index_to_lps(corners) if not empty else np.zeros((1, 3))
            vlo, vhi = (lo[::-1], hi[::-1]) if reverse else (lo, hi)
            items.append({"lower": [int(v) for v in vlo], "upper": [int(v) for v in vhi], "empty": empty,
                          "lps_mm": {"lower": [round(float(v), 1) for v in mm.min(axis=0)],
                                     "upper": [round(float(v), 1) for v in mm.max(axis=0)]}})
        ne = [b for b in boxes if np.all(b[1] > b[0])]
        union = ({"lower": [int(v) for v in (np.min([b[0] for b in ne], 0)[::-1] if reverse else np.min([b[0] for b in ne], 0))],
                  "upper": [int(v) for v in (np.max([b[1] for b in ne], 0)[::-1] if reverse else np.max([b[1] for b in ne], 0))]}
                 if ne else None)
        out_regions[name] = {"boxes": items, "union": union, "in_image": bool(ne), "margin_mm": region.margin_mm,
                             "atlas_mm": region.array(with_margin=True).round(1).tolist()}
    t_crop = time.perf_counter() - t2
    report = anatomy_qc.check(anatomy, reg, atlas)
    doc = {
        "input": {"path_kind": axes, "shape": list(volume.shape[::-1] if reverse else volume.shape),
                  "spacing_mm": [round(v, 4) for v in (volume.spacing[::-1] if reverse else volume.spacing)],
                  "anatomy_source": "labels" if args.labels else "anatomy19 (Triton)"},
        **reg.to_json(),
        "regions": out_regions,
        "regions_trusted": bool(reg.verified),  # boxes under an unverified orientation assume the header
        "qc": report.to_json(),
        "seconds": {"inference": round(t_inf, 4), "registration": round(t_reg, 4), "cropping": round(t_crop, 4)},
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        o = doc["orientation"]
        print(f"orientation: {o['rotation_quarter_turns'] * 90} deg, z flipped {o['z_flipped']}, verified "
              f"{o['verified']} ({o['reason']})")
        for name, r in out_regions.items():
            print(f"  {name:18s} {r['union']}")
        print(f"qc ok={report.ok} {'; '.join(report.findings)}  seconds {doc['seconds']}")
    return 0


def _mask_from(path: Path, labels: list[str], class_map: str | None) -> Volume:
    v = _read(path)
    arr = np.asarray(v.array)
    if not labels:
        return v.with_array((arr > 0).astype(np.uint8))
    ids = []
    names = load_totalseg_class_map(Path(class_map)) if class_map else {}
    by_name = {n: i for i, n in names.items()}
    for lab in labels:
        ids.append(int(lab) if lab.isdigit() else by_name[lab])
    return v.with_array(np.isin(arr, ids).astype(np.uint8))


def run_learn(args: argparse.Namespace) -> int:
    """Learn a region and write its JSON."""
    from dicomnode.anatomy.regions import learn_region, save_region

    cfg = _config(args)
    atlas = load_atlas(Path(args.atlas) if args.atlas else cfg.resource(cfg.anatomy.atlas_file))
    sources = args.anatomy or args.images
    if len(sources) != len(args.masks):
        print("error: give one --masks file per --anatomy/--images file", file=sys.stderr)
        return 2
    pairs: list[tuple[Volume, Volume]] = []
    with contextlib.ExitStack() as stack:
        model = None if args.anatomy or not sources else stack.enter_context(_anatomy_model(cfg, args.triton))
        registrations: list[Any] | None = None if model is None else []
        for a, m in zip(sources, args.masks):
            if model is None:
                anatomy = _anatomy_labels(Path(a), args.class_map)
            else:  # orientation decided as in the node (turns); the header is kept when undecided
                found = model.locate(_read(Path(a)), atlas)
                anatomy = found.labels
                registrations.append(found.registration)  # type: ignore[union-attr]
            pairs.append((anatomy, _mask_from(Path(m), args.mask_labels, args.class_map)))
    if args.phantoms:
        from dicomnode.commands.atlas import _phantom_maps

        ids = [CLASS_INDEX[c] for c in args.phantom_classes]
        if not ids:
            print("error: --phantoms needs --phantom-classes", file=sys.stderr)
            return 2
        for v in _phantom_maps(args.phantoms, seed0=args.phantom_seed):
            pairs.append((v, v.with_array(np.isin(v.array, ids).astype(np.uint8))))
            if registrations is not None:
                registrations.append(None)  # learn_region registers the phantom itself
    if not pairs:
        print("error: nothing to learn from", file=sys.stderr)
        return 2
    desc = []
    if sources:
        desc.append(f"{len(sources)} labelled scan(s): " + ", ".join(Path(s).name for s in sources))
    if args.phantoms:
        desc.append(f"{args.phantoms} phantoms (seeds {args.phantom_seed}..{args.phantom_seed + args.phantoms - 1}, "
                    f"classes {'+'.join(args.phantom_classes)})")
    region, heat = learn_region(pairs, atlas, args.name, threshold=args.threshold, margin_mm=args.margin,
                                learned_from="; ".join(desc), registrations=registrations)
    out = Path(args.out_dir) if args.out_dir else (Path(args.regions_dir) if args.regions_dir
                                                   else cfg.resource(cfg.anatomy.regions_dir))
    path = save_region(region, out)
    print(json.dumps({"written": str(path), **region.to_json()}, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``locate`` / ``learn``; exit 1 (with the reason on stderr) when the scan is refused."""
    from dicomnode.errors import DicomNodeError

    try:
        return run_locate(args) if args.action == "locate" else run_learn(args)
    except (DicomNodeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
