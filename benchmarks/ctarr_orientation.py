"""CTARR orientation check on the real CTs, with reference labels and with the anatomy19 model.

Run:  .venv/bin/python benchmarks/ctarr_orientation.py [--threads 2] [--cache DIR] [--details]

For every real CT of ../shared/data (example_ct, example_ct_sm, cta_aorta) and each of the 8
array rotations/flips under the same header (what a wrong header looks like to the node), the
anatomy segmentation is registered to the atlas and the orientation finding is scored:

- ``correct``: verified, and the correction gives back the original array (axes and content);
- ``cannot tell``: ``verified: false`` (header kept; an honest answer);
- ``WRONG``: verified, but the correction does not restore the original - the failure to avoid.

``best right`` counts the configurations whose best-scoring orientation (``suggested``, reported
even when not verified) was the right one; ``agree`` (details) is the share of the anatomy that
supports a margin-verified orientation (dicomnode/anatomy/agreement.py; verified needs >= 0.6).

Sources: ``reference`` - the reference labels, landmark search (register.py); ``anatomy19`` - the
model's output on the array as stored, landmark search (shown for comparison: the node does not
decide from it); ``anatomy19 turns`` - what the node does: the model run on the 8 turns of the
array, the best atlas fit decides (dicomnode/anatomy/turns.py). The exit code is 1 when the
reference or the turns source makes a wrong verified claim.

Anatomy sources: the reference labels (TotalSegmentator outputs mapped to the 19 classes; cta_aorta
has only T12) and the anatomy19 model from ``triton_models/anatomy19`` run in-process with
onnxruntime exactly as the node prepares it (``tiling.to_model_grid`` at 3 mm on the header's
canonical grid, the manifest's windows, ``tiling.predict_volume``). ``--cache DIR`` keeps the
model outputs (keyed by the model file's size and mtime and the manifest's content) so the rule
can be re-scored quickly.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dicomnode.anatomy.atlas import CLASS_INDEX, load_atlas, load_totalseg_class_map, map_totalseg  # noqa: E402
from dicomnode.anatomy.register import Registration, apply_orientation, register  # noqa: E402
from dicomnode.anatomy.turns import TURN_RATIO  # noqa: E402
from dicomnode.series.convert import read_nifti  # noqa: E402
from dicomnode.volume import Volume  # noqa: E402

TS = ROOT.parent / "shared" / "data" / "totalsegmentator"
MODEL = ROOT / "triton_models" / "anatomy19"
CONFIGS = [(k, f) for k in range(4) for f in (False, True)]


@dataclass(frozen=True)
class Outcome:
    """One configuration scored: ``kind`` is correct | cannot tell | WRONG."""

    k: int
    flip: bool
    kind: str
    found: tuple[int, bool]
    rotation_margin_mm: float
    flip_margin_mm: float
    residual_mm: float
    agreement: float | None
    best_right: bool
    reason: str


def scans() -> list[tuple[str, Volume, Volume]]:
    """(name, CT, reference CTARR labels on the CT grid) for the real CTs."""
    cmap = load_totalseg_class_map(TS / "class_maps.json")
    out = []
    for name, img, seg in (("example_ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
                           ("example_ct_sm", "example_ct_sm.nii.gz", "example_seg.nii.gz")):
        raw = read_nifti(TS / seg, modality="SEG")
        out.append((name, read_nifti(TS / img), raw.with_array(map_totalseg(raw.array, cmap))))
    t12 = read_nifti(TS / "cta_aorta" / "vertebrae_T12.nii.gz", modality="SEG")
    out.append(("cta_aorta", read_nifti(TS / "cta_aorta" / "ct_cropped.nii.gz"),
                t12.with_array((np.asarray(t12.array) > 0).astype(np.int16) * CLASS_INDEX["thoracic_vertebrae"])))
    return out


def rotate(vol: Volume, k: int, flip: bool) -> Volume:
    """The array turned k quarter turns in the axial plane (then flipped along the slices) under the same header."""
    arr = np.rot90(np.asarray(vol.array), k, axes=(1, 2))
    if flip:
        arr = arr[::-1]
    return Volume(np.ascontiguousarray(arr), vol.affine, modality=vol.modality)


def restored(fixed: Volume, orig: Volume) -> bool:
    """The corrected volume holds the original array on the original axes."""
    return (fixed.shape == orig.shape and np.array_equal(fixed.array, orig.array)
            and np.allclose(fixed.affine[:3, :3], orig.affine[:3, :3], atol=1e-6))


def score(moved: Volume, orig: Volume, reg: Registration, k: int, flip: bool) -> Outcome:
    """Score a registration of ``moved`` (= ``orig`` turned by (k, flip)); also whether the best
    configuration (``suggested``, reported even when unverified) was the right one."""
    best = dataclasses.replace(reg, rotation_k=reg.suggested[0], z_flip=reg.suggested[1])
    best_right = restored(apply_orientation(moved, best), orig)
    if not reg.verified:
        kind = "cannot tell"
    else:
        kind = "correct" if restored(apply_orientation(moved, reg), orig) else "WRONG"
    return Outcome(k, flip, kind, (reg.rotation_k, reg.z_flip), reg.rotation_margin_mm, reg.flip_margin_mm,
                   float(reg.residual), reg.agreement, best_right, reg.reason)


class OnnxAnatomy:
    """anatomy19 in-process (onnxruntime), prepared like ``InferenceClient.segment_native``."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime as ort

        from dicomnode.infer.models import load_manifest

        self.manifest = load_manifest(folder / "labels.json")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        onnx = folder / "1" / "model.onnx"
        self.session = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
        st = onnx.stat()  # the whole manifest is in the key: post-processing steps, windows, ...
        self.key = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}:".encode()
                                + (folder / "labels.json").read_bytes()).hexdigest()[:12]
        self.seconds = 0.0
        self.runs = 0
        self.memo: dict[str, np.ndarray] = {}  # model input digest -> labels (the 8 turns of 8 turns repeat)
        self.cache: Path | None = None

    def segment(self, volume: Volume) -> Volume:
        """Labels on the model's 3 mm canonical grid (memoised by the model input's content)."""
        from dicomnode.infer import tiling

        m = self.manifest
        on_grid = tiling.to_model_grid(volume, m)
        x = np.ascontiguousarray(tiling.normalise(on_grid.array, m, volume.modality), np.float32)
        key = hashlib.sha1(x.tobytes() + repr(x.shape).encode() + self.key.encode()).hexdigest()[:20]
        path = self.cache / f"turn_{key}.npy" if self.cache else None
        if key in self.memo:
            labels = self.memo[key]
        elif path is not None and path.exists():
            labels = self.memo[key] = np.load(path)
        else:
            t0 = time.perf_counter()
            labels, _ = tiling.predict_volume(x, m, lambda xb: self.session.run(None, {m.input_name: xb})[0])
            self.seconds += time.perf_counter() - t0
            self.runs += 1
            labels = self.memo[key] = tiling.postprocess(labels, m).astype(np.int16)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, labels)
        return on_grid.with_array(labels)


TURNS_SOURCE = "anatomy19 turns"


def _turns(model: OnnxAnatomy, atlas: object, name: str, moved: Volume, k: int, flip: bool,
           log: list[tuple[str, int, bool, float, float]]) -> Registration:
    """The node's decision (turns.py) for ``moved``; its ratios go to ``log``."""
    from dicomnode.anatomy.turns import orientation_by_turns
    from dicomnode.infer import tiling

    found = orientation_by_turns(moved, model.segment, atlas,  # type: ignore[arg-type]
                                 prepare=lambda v: tiling.to_model_grid(v, model.manifest))
    log.append((name, k, flip, found.rotation_ratio, found.flip_ratio))
    return found.registration


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep model outputs in")
    ap.add_argument("--details", action="store_true", help="one line per configuration")
    ap.add_argument("--no-model", action="store_true", help="reference labels only")
    ap.add_argument("--model", type=Path, default=MODEL, help="anatomy19 model folder (default: the shipped one)")
    args = ap.parse_args(argv)
    atlas = load_atlas(ROOT / "config" / "atlas" / "atlas19.npz")
    model = None
    if not args.no_model:
        if (args.model / "1" / "model.onnx").exists():
            model = OnnxAnatomy(args.model, args.threads)
            print(f"anatomy19: {model.manifest.version} ({model.manifest.extra.get('train_steps', '?')} steps), "
                  f"model.onnx key {model.key}")
        else:
            print("anatomy19: no model in triton_models/anatomy19 - reference labels only")
    if model is not None:
        model.cache = args.cache
    rows: list[tuple[str, str, list[Outcome]]] = []
    turn_ratios: list[tuple[str, int, bool, float, float]] = []
    for name, ct, ref in scans():
        sources = [("reference", lambda moved, k, f, r=ref: register(rotate(r, k, f), atlas))]
        if model is not None:
            sources.append(("anatomy19", lambda moved, k, f, n=name: register(model.segment(moved), atlas)))
            sources.append((TURNS_SOURCE, lambda moved, k, f, n=name: _turns(model, atlas, n, moved, k, f, turn_ratios)))
        for src, registration_for in sources:
            outs = []
            for k, flip in CONFIGS:
                moved = rotate(ct, k, flip)
                outs.append(score(moved, ct, registration_for(moved, k, flip), k, flip))
            rows.append((name, src, outs))
    print(f"\n{'scan':14s} {'anatomy from':16s} {'correct':>8s} {'cannot tell':>12s} {'WRONG':>6s} {'best right':>11s}")
    for name, src, outs in rows:
        n = {kind: sum(o.kind == kind for o in outs) for kind in ("correct", "cannot tell", "WRONG")}
        print(f"{name:14s} {src:16s} {n['correct']:>6d}/8 {n['cannot tell']:>10d}/8 {n['WRONG']:>4d}/8 "
              f"{sum(o.best_right for o in outs):>9d}/8")
    if args.details:
        print(f"\n{'scan':14s} {'source':16s} {'k':>2s} {'flip':>5s} {'outcome':12s} {'found':>10s} "
              f"{'rot mm':>7s} {'flip mm':>8s} {'resid':>6s} {'agree':>5s}  reason")
        for name, src, outs in rows:
            for o in outs:
                print(f"{name:14s} {src:16s} {o.k:2d} {str(o.flip):>5s} {o.kind:12s} {str(o.found):>10s} "
                      f"{o.rotation_margin_mm:7.1f} {o.flip_margin_mm:8.1f} {o.residual_mm:6.1f} "
                      f"{'-' if o.agreement is None else f'{o.agreement:.2f}':>5s}  {o.reason}")
    if model is not None:
        print(f"\nmodel inference: {model.runs} runs, {model.seconds:.1f} s (onnxruntime, {args.threads} threads; "
              f"repeated inputs - the turns of turned arrays - come from memory or --cache)")
    if turn_ratios:
        print(f"\nturns: best/next atlas-fit ratios (verified needs >= {TURN_RATIO}): rotation "
              f"min {min(r[3] for r in turn_ratios):.2f}, head-feet min {min(r[4] for r in turn_ratios):.2f}")
        if args.details:
            for n, k, f, rr, fr in turn_ratios:
                print(f"  {n:14s} k={k} flip={str(f):5s} rotation x{rr:.2f} head-feet x{fr:.2f}")
    wrong = sum(o.kind == "WRONG" for _, src, outs in rows for o in outs if src != "anatomy19")
    single = sum(o.kind == "WRONG" for _, src, outs in rows for o in outs if src == "anatomy19")
    print(f"wrong verified claims: {wrong} (reference labels and anatomy19 turns; the node's methods)"
          + (f"; single-pass anatomy19 landmarks, not used by the node: {single}" if model is not None else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
