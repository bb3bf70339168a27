"""Evaluate the exported models on the real scans in ../shared/data: ``python -m inference.evaluate``.

Runs each ``triton_models/<name>/1/model.onnx`` with onnxruntime on the whole volume (the same
normalisation the node applies, from labels.json) and prints per-class Dice (and HD95 for body):

* body: example_ct and example_ct_sm (CT) against a reference body mask made from the CT
  (HU > -500, largest component, holes filled per slice: ``realdata.body_mask_ct``) - the file
  ``example_seg_fast_body_seg.nii.gz`` is an organ label map, not a body mask; example_mr (MR)
  against an intensity-threshold mask (plausibility only).
* anatomy19: example_ct against TotalSegmentator's classes mapped to the 19 CTARR anatomies,
  mean over the classes present in the reference; and, as ``synthetic_unseen``, the mean Dice on
  three phantoms no training pool contains (how well the network fits its own training
  distribution - a ceiling for the real figure, not an accuracy claim).
* face_area: real MR heads (chris_t1 held out; brain1/brain2 in its training pool, reported as
  training-set figures) anonymised deface/reface/blur with fixed seeds; Dice vs the altered region.
* liver: the anatomy19 liver channel, and the liver model on a liver crop (reference bounding box +
  10 mm) at 1.5 mm when that model exists.

Options: ``--models a,b`` (default: all present), ``--repo DIR``, ``--json FILE``.
Exit code 0; 2 when ../shared/data is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inference import realdata
from inference.synth import ctarr_target, window_channels, zscore

REPO = Path(__file__).resolve().parent.parent / "triton_models"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def hd95(a: np.ndarray, b: np.ndarray, spacing: float) -> float:
    """95th percentile symmetric surface distance in mm (inf when one mask is empty)."""
    if not a.any() or not b.any():
        return float("inf")
    sa = a & ~ndi.binary_erosion(a); sb = b & ~ndi.binary_erosion(b)
    da = ndi.distance_transform_edt(~sa, sampling=spacing); db = ndi.distance_transform_edt(~sb, sampling=spacing)
    return float(np.percentile(np.concatenate([db[sa], da[sb]]), 95))


class Model:
    """An exported model (ONNX + manifest) run with onnxruntime on whole volumes."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        from dicomnode.infer.models import load_manifest
        self.manifest = load_manifest(folder / "labels.json")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"])

    def normalise(self, img: np.ndarray, modality: str) -> np.ndarray:
        """(C, z, y, x) input as the node prepares it."""
        m = self.manifest
        if m.normalisation_for(modality) == "zscore":
            return zscore(img)
        return window_channels(img, m.windows)

    def logits(self, img: np.ndarray, modality: str = "CT") -> tuple[np.ndarray, float]:
        """(K, z, y, x) logits on the image grid and the seconds onnxruntime took."""
        x = self.normalise(img, modality)
        k = self.manifest.pad_multiple
        pad = [(0, 0)] + [(0, (-s) % k) for s in x.shape[1:]]
        xp = np.pad(x, pad, mode="edge")[None]
        t = time.perf_counter()
        y = self.sess.run(None, {self.manifest.input_name: xp})[0][0]
        dt = time.perf_counter() - t
        return y[:, :x.shape[1], :x.shape[2], :x.shape[3]], dt

    def predict(self, img: np.ndarray, modality: str = "CT") -> tuple[np.ndarray, float]:
        """Label map (argmax, the manifest's post-processing) and seconds. ``img`` is on the
        realdata grid (slices head -> feet, rows anterior -> posterior, columns right -> left),
        which is the orientation of the node's model grid (``dicomnode.infer.tiling.CANONICAL_DIRECTION``,
        what ``to_model_grid`` gives every model), so it is fed as it is. (Until 2026-12-05 it was
        fed reversed, feet -> head, in the belief that this was the node's order.)"""
        from dicomnode.infer.tiling import postprocess  # the node's own (client.segment_native)
        y, dt = self.logits(img, modality)
        return postprocess(np.argmax(y, 0).astype(np.int16), self.manifest), dt


def eval_body(model: Model) -> dict:
    """Body Dice/HD95 on the real CTs and plausibility on the MR."""
    res: dict = {}
    for name in ("example_ct", "example_ct_sm", "example_mr"):
        s = realdata.load_scan(name)
        pred, dt = model.predict(s.image, s.modality)
        if s.modality == "CT":
            ref = realdata.body_mask_ct(s.image)
        else:
            ref = realdata.fill_unlabelled_mr(np.zeros(s.image.shape, np.int16), s.image) > 0
            ref |= s.labels > 0
        p = pred == 1
        res[name] = {"dice": round(dice(p, ref), 4), "hd95_mm": round(hd95(p, ref, 3.0), 2), "seconds": round(dt, 2)}
    return res


def present_classes(ref: np.ndarray, min_voxels: int = 10) -> list[int]:
    """The CTARR classes (1..19) with at least ``min_voxels`` voxels in ``ref`` - those scored."""
    return [v for v in range(1, 20) if (ref == v).sum() >= min_voxels]


def eval_anatomy(model: Model) -> dict:
    """Per-class Dice of anatomy19 on example_ct (classes present in the reference), and the mean
    Dice on unseen phantoms (:func:`eval_anatomy_synthetic`)."""
    s = realdata.load_scan("example_ct")
    ref = ctarr_target(np.where(s.labels >= realdata.IGNORE_OFFSET, 0, s.labels))
    pred, dt = model.predict(s.image, "CT")
    names = {l.value: l.name for l in model.manifest.labels}
    present = present_classes(ref)
    per = {names[v]: round(dice(pred == v, ref == v), 4) for v in present}
    absent_fp = {names[v]: int((pred == v).sum()) for v in range(1, 20) if v not in present and (pred == v).sum()}
    return {"example_ct": {"per_class": per, "mean": round(float(np.mean(list(per.values()))), 4),
                           "false_positive_voxels_absent_classes": absent_fp,
                           "reference_voxels_labelled": confusion(pred, ref, names, present), "seconds": round(dt, 2)},
            "synthetic_unseen": eval_anatomy_synthetic(model)}


# below 1000: inference.train's phantom pools use seeds 1000 + step + i, so no run has trained on these
SYNTHETIC_SEEDS = (911, 912, 913)


def eval_anatomy_synthetic(model: Model, seeds: tuple[int, ...] = SYNTHETIC_SEEDS) -> dict:
    """Mean Dice of anatomy19 on unseen phantoms (abdomen field of view, CT synthesised as in
    training, fixed seeds), over the classes present in each."""
    from inference.phantom import generate_phantom
    from inference.synth import ct_from_labels
    per = []
    for seed in seeds:
        lab, _ = generate_phantom(seed, "abdomen", model.manifest.spacing_mm[0])
        pred, _ = model.predict(ct_from_labels(lab, np.random.default_rng(seed)), "CT")
        ref = ctarr_target(lab)
        per.append(float(np.mean([dice(pred == v, ref == v) for v in present_classes(ref)])))
    return {"seeds": list(seeds), "mean_dice": [round(d, 4) for d in per], "mean": round(float(np.mean(per)), 4)}


def confusion(pred: np.ndarray, ref: np.ndarray, names: dict[int, str], classes: list[int],
              top: int = 3) -> dict[str, dict[str, float]]:
    """Per reference class in ``classes``: the share of its voxels given each of the ``top`` most
    frequent predicted labels ("background" included) - where a class's Dice goes."""
    out: dict[str, dict[str, float]] = {}
    for v in classes:
        r = ref == v
        vals, cnt = np.unique(pred[r], return_counts=True)
        order = np.argsort(cnt)[::-1][:top]
        out[names[v]] = {names.get(int(vals[i]), "background"): round(float(cnt[i] / r.sum()), 3) for i in order}
    return out


def eval_liver(model: Model) -> dict:
    """Liver model on a crop around the reference liver (+10 mm) resampled to its spacing."""
    s = realdata.load_scan("example_ct")
    liver = s.labels == realdata.L["liver"]
    idx = np.argwhere(liver)
    lo = np.maximum(idx.min(0) - 4, 0); hi = np.minimum(idx.max(0) + 5, liver.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    f = 3.0 / model.manifest.spacing_mm[0]
    img = ndi.zoom(s.image[sl], f, order=1)
    pred, dt = model.predict(img, "CT")
    p = ndi.zoom((pred == 1).astype(np.uint8), [a / b for a, b in zip(liver[sl].shape, pred.shape)], order=0) > 0
    return {"example_ct": {"dice": round(dice(p, liver[sl]), 4), "seconds": round(dt, 2), "crop_shape": list(img.shape)}}


FACE_HELD_OUT = ("chris_t1.nii.gz",)
FACE_TRAINING = ("brain1_image.nrrd", "brain2_image.nrrd")  # in face_area's training pool (inference.face.FacePool)


def _native_head(name: str, spacing: float) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """A real MR head read once: (image on an isotropic canonical grid at its finest voxel size - the
    acquisition resolution; thick-slice heads are interpolated along z to it -, that grid's affine,
    its voxel size mm, the original image resampled straight to ``spacing`` mm as the node does)."""
    from inference.face import resample_head, resample_head_grid
    img, A = realdata.load_image(realdata.DATA / "mr_heads" / name)
    iso = float(np.linalg.norm(np.asarray(A, float)[:3, :3], axis=0).min())
    arr, aff = resample_head_grid(img, A, iso)
    return arr, aff, iso, resample_head(img, A, spacing)


def eval_face_area(model: Model) -> dict:
    """Dice of the predicted anonymised area vs the altered region, per mode (fixed seeds) and mean.

    Each real MR head is anonymised as a defacing tool does it, at its acquisition resolution
    (inference.face: head mask, face region with the default depth/brow, deface/reface/blur), then
    resampled to the model grid as the node does; the truth is the altered region resampled the
    same way. ``dice_3mm`` is the earlier, easier protocol (anonymised on the 3 mm grid itself:
    razor-sharp cuts). chris_t1 is held out, brain1/brain2 are training-set scans.
    ``intact_predicted_voxels``: voxels labelled altered on the head before anonymisation (should be ~0).
    """
    from inference import face
    res: dict = {}
    sp = model.manifest.spacing_mm[0]
    for name in FACE_HELD_OUT + FACE_TRAINING:
        native, a_iso, iso, img3 = _native_head(name, sp)
        region_n = face.face_region(face.head_mask(native), iso)
        img = face.resample_head(native, a_iso, sp)
        region = face.resample_head(region_n.astype(np.float32), a_iso, sp) > 0.5
        region3 = face.face_region(face.head_mask(img3), sp)
        per, per3, secs = {}, {}, 0.0
        for i, mode in enumerate(face.MODES):
            anon = face.resample_head(face.anonymise(native, region_n, np.random.default_rng(1000 + i), mode, iso), a_iso, sp)
            pred, dt = model.predict(anon, "MR")
            per[mode] = round(dice(pred == 1, region), 4)
            pred3, dt3 = model.predict(face.anonymise(img3, region3, np.random.default_rng(1000 + i), mode), "MR")
            per3[mode] = round(dice(pred3 == 1, region3), 4)
            secs += dt + dt3
        intact, dt = model.predict(img, "MR")  # nothing altered: every predicted voxel is a false positive
        secs += dt
        res[name.split(".")[0]] = {"split": "held_out" if name in FACE_HELD_OUT else "training_set",
                                   "dice": per, "mean": round(float(np.mean(list(per.values()))), 4),
                                   "dice_3mm": per3, "mean_3mm": round(float(np.mean(list(per3.values()))), 4),
                                   "region_voxels": int(region.sum()), "intact_predicted_voxels": int((intact == 1).sum()),
                                   "shape": list(img.shape), "native_spacing_mm": round(iso, 3),
                                   "seconds": round(secs, 2)}
    held = [res[n.split(".")[0]]["mean"] for n in FACE_HELD_OUT]
    train = [res[n.split(".")[0]]["mean"] for n in FACE_TRAINING]
    res["held_out_mean"] = round(float(np.mean(held)), 4)
    res["training_set_mean"] = round(float(np.mean(train)), 4)
    return res


EVALS = {"body": eval_body, "anatomy19": eval_anatomy, "liver": eval_liver, "face_area": eval_face_area}


def main(argv: list[str] | None = None) -> int:
    """CLI; see module docstring."""
    ap = argparse.ArgumentParser(prog="python -m inference.evaluate")
    ap.add_argument("--models", default="")
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if not realdata.TS.exists():
        print(f"shared data not found at {realdata.DATA}", file=sys.stderr)
        return 2
    names = [n for n in (a.models.split(",") if a.models else EVALS) if (a.repo / n / "1" / "model.onnx").exists()]
    out: dict = {}
    for n in names:
        model = Model(a.repo / n, a.threads)
        if model.manifest.extra.get("method") == "classical":
            print(f"{n}: classical placeholder (not trained)")
        out[n] = {"version": model.manifest.version, **EVALS[n](model)}
        if n == "anatomy19":
            out[n]["liver_channel_dice"] = out[n]["example_ct"]["per_class"].get("liver")
        print(f"== {n} {model.manifest.version}")
        print(json.dumps(out[n], indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
