"""Triton transport benchmark: the same model on the same volume, side by side in one run.

(a) in-process onnxruntime, (b) the real local Triton server with system shared memory,
(c) Triton over binary HTTP (and (d) gRPC for reference). Goal: (b) within 1.15x of (a) for a 3 mm
abdomen volume (../shared/data/totalsegmentator/example_ct.nii.gz); the transfer overhead of (b)
(its time minus (a)) is printed separately, with Triton's own split of it (server statistics).
Rounds are interleaved (a, b, c, d, a, b, ...) so load from other processes on the 2 shared cores
hits every variant alike; medians are reported. Two models: ``--model`` from triton_models/
(default body, the classical model: little compute) and a small random-weight conv net (three
conv layers, 16 channels: compute per voxel like a light U-Net stage).

A transport-only model (``bench_identity``: output = input twice, the body model's tensor sizes)
measures the transfer cost by itself. A last part decides how volumes are sent: the whole volume in one request vs 64^3 sliding
windows (overlap 0.5), one window per request vs 4 per request (conv net, shared memory).

    .venv/bin/python benchmarks/triton.py [--model body] [--repeats 15] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.infer import tiling  # noqa: E402
from dicomnode.infer.client import InferenceClient  # noqa: E402
from dicomnode.infer.server import LocalTriton  # noqa: E402
from dicomnode.series.convert import load_input  # noqa: E402
from dicomnode.volume import Volume  # noqa: E402
from inference.triton_repo import write_model_dir  # noqa: E402

CT = ROOT.parent / "shared" / "data" / "totalsegmentator" / "example_ct.nii.gz"


def convnet_onnx(k: int = 3, width: int = 16, seed: int = 0) -> bytes:
    """INPUT [N,1,Z,Y,X] -> conv3 -> relu -> conv3 -> relu -> conv1 -> OUTPUT [N,k,Z,Y,X]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    inits = [w("w1", (width, 1, 3, 3, 3)), w("w2", (width, width, 3, 3, 3)), w("w3", (k, width, 1, 1, 1))]
    nodes = [
        helper.make_node("Conv", ["INPUT", "w1"], ["c1"], pads=[1] * 6),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 6),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["OUTPUT"]),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", k, "Z", "Y", "X"])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def identity_onnx() -> bytes:
    """INPUT [N,1,Z,Y,X] -> OUTPUT [N,2,Z,Y,X] = (x, x): no compute, the body model's tensor sizes."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Concat", ["INPUT", "INPUT"], ["OUTPUT"], axis=1)], "identity2",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", 2, "Z", "Y", "X"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def identity_manifest() -> dict[str, Any]:
    """Manifest of the transport-only model (1 channel in, 2 out)."""
    m = convnet_manifest()
    return {**m, "name": "bench_identity", "description": "BENCHMARK ONLY: copies its input twice",
            "labels": m["labels"][:1], "output_kind": "probabilities"}


def convnet_manifest() -> dict[str, Any]:
    """Manifest of the benchmark conv net (3 classes, 3 mm, one CT window)."""
    lab = {"category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
           "type": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}}
    return {
        "name": "bench_convnet", "version": "bench", "description": "BENCHMARK ONLY: random-weight conv net",
        "modalities": ["CT"], "spacing_mm": [3.0, 3.0, 3.0], "normalisation": "window",
        "windows": [[-1024, 1500]], "patch": [128, 128, 128], "pad_multiple": 1, "overlap": 0.5,
        "output_kind": "logits",
        "labels": [{**lab, "value": 1, "name": "a", "color": [1, 2, 3]},
                   {**lab, "value": 2, "name": "b", "color": [4, 5, 6]}],
    }


def median_ms(samples: list[float]) -> float:
    """Median of seconds, in ms."""
    return 1000.0 * statistics.median(samples)


def _server_stats(client: InferenceClient, model: str) -> dict[str, tuple[int, int]]:
    """Triton's cumulative (count, ns) per phase for ``model``."""
    s = client._connect().get_inference_statistics(model)["model_stats"][0]["inference_stats"]
    return {k: (int(v["count"]), int(v["ns"])) for k, v in s.items() if k in
            ("success", "queue", "compute_input", "compute_infer", "compute_output")}


def transport(model: str, repo: Path, vol: Volume, clients: dict[str, InferenceClient], repeats: int) -> dict[str, Any]:
    """Part 1 + 2 for one model: one whole-volume request per variant, then client.segment()."""
    import onnxruntime as ort

    c0 = clients["b_triton_shm"]
    m = c0.manifest(model)
    grid = tiling.to_model_grid(vol, m)
    x = tiling.normalise(grid.array, m, vol.modality)
    # padded as the node pads it (a U-Net's sizes must be multiples of pad_multiple)
    x = np.ascontiguousarray(tiling.pad_channels(x, tiling.plan_tiles(tuple(x.shape[1:]), m).padded)[None])  # type: ignore[arg-type]
    sess = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {m.input_name: x})[0]
    for name, c in clients.items():  # warm-up + the same numbers everywhere
        assert np.array_equal(c.infer(model, x), ref), name
    assert c0.uses_shared_memory
    out_mib = ref.nbytes / 2**20
    print(f"\n== {model}: input {x.shape} {x.nbytes / 2**20:.1f} MiB, output {out_mib:.1f} MiB")
    times: dict[str, list[float]] = {"a_inprocess_onnxruntime": [], **{k: [] for k in clients}}
    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    split_ns = dict.fromkeys(phases, 0)
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {m.input_name: x})
        times["a_inprocess_onnxruntime"].append(time.perf_counter() - t)
        for name, c in clients.items():
            before = _server_stats(c0, model) if name == "b_triton_shm" else None
            t = time.perf_counter()
            c.infer(model, x, copy=False)
            times[name].append(time.perf_counter() - t)
            if before is not None:
                after = _server_stats(c0, model)
                for k in phases:
                    split_ns[k] += after[k][1] - before[k][1]
    a = median_ms(times["a_inprocess_onnxruntime"])
    print("(1) one whole-volume request (median ms, ratio to in-process; best of the rounds):")
    for name, s in times.items():
        print(f"  {name:26s} {median_ms(s):8.1f} ms  {median_ms(s) / a:5.2f}x   (best {1000 * min(s):7.1f} ms)")
    b = median_ms(times["b_triton_shm"])
    overhead = b - a
    split = {k: v / repeats / 1e6 for k, v in split_ns.items()}
    print(f"  transfer + serving overhead of (b): {overhead:.1f} ms -> (b) is {b / a:.2f}x of (a), "
          f"{'within' if b <= 1.15 * a else 'NOT within'} the 1.15x goal")
    print("  Triton's own timing of the (b) requests (mean ms; compute_infer = python backend + onnxruntime): "
          + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    seg: dict[str, list[float]] = {k: [] for k in clients}
    for _ in range(max(3, repeats // 3)):
        for name, c in clients.items():
            t = time.perf_counter()
            c.segment(vol, model)
            seg[name].append(time.perf_counter() - t)
    print("(2) client.segment() end to end (grid, normalise, infer, argmax, map back), median ms:")
    for name, s in seg.items():
        print(f"  {name:26s} {median_ms(s):8.1f} ms")
    return {"input_shape": list(x.shape), "output_mib": out_mib,
            "infer_ms": {k: median_ms(v) for k, v in times.items()}, "shm_overhead_ms": overhead,
            "best_ms": {k: 1000 * min(v) for k, v in times.items()},
            "ratio_b_to_a": b / a, "triton_split_ms": split,
            "segment_ms": {k: median_ms(v) for k, v in seg.items()}}


def tiling_choice(client: InferenceClient, vol: Volume) -> dict[str, float]:
    """Part 3: whole volume vs 64^3 windows, 1 or 4 windows per request (conv net, shared memory)."""
    cm = client.manifest("bench_convnet")
    grid = tiling.to_model_grid(vol, cm)
    xc = tiling.normalise(grid.array, cm, "CT")
    out: dict[str, float] = {}
    print("\n(3) bench_convnet, shared memory: whole volume vs sliding windows (median of 3):")
    for label, patch, batch in (("whole volume, 1 request", (128, 128, 128), 1),
                                ("64^3 windows, 1 per request", (64, 64, 64), 1),
                                ("64^3 windows, 4 per request", (64, 64, 64), 4)):
        mm = cm.__class__(**{**{f: getattr(cm, f) for f in cm.__slots__}, "patch": patch})
        plan = tiling.plan_tiles(grid.shape, mm)

        def fn(xb: np.ndarray) -> np.ndarray:
            return client.infer("bench_convnet", xb, copy=False)

        tiling.predict_volume(xc, mm, fn, batch=batch)  # warm-up
        s = []
        for _ in range(3):
            t = time.perf_counter()
            tiling.predict_volume(xc, mm, fn, batch=batch)
            s.append(time.perf_counter() - t)
        out[label] = median_ms(s)
        print(f"  {label:30s} {out[label]:8.1f} ms  ({len(plan.starts)} windows)")
    return out


def main() -> int:
    """Run all parts; prints the tables (and writes --json)."""
    ap = argparse.ArgumentParser(description="Triton transport benchmark")
    ap.add_argument("--model", default="body", help="model of triton_models/ for the transport comparison")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not CT.exists():
        print(f"missing {CT}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    try:
        repo = tmp / "models"
        shutil.copytree(ROOT / "triton_models" / args.model, repo / args.model)
        write_model_dir(repo, convnet_manifest(), convnet_onnx(), gpu_dir=None)
        write_model_dir(repo, identity_manifest(), identity_onnx(), gpu_dir=None)
        vol = load_input(CT)
        print(f"volume {vol.shape} at {tuple(round(s, 2) for s in vol.spacing)} mm; {args.repeats} interleaved rounds")
        results: dict[str, Any] = {"volume": list(vol.shape), "models": {}}
        with LocalTriton(repo, ROOT / ".venv-triton") as srv:
            clients = {
                "b_triton_shm": InferenceClient(srv.http_url, "http", "auto", models_dir=repo),
                "c_triton_http": InferenceClient(srv.http_url, "http", "off", models_dir=repo),
                "d_triton_grpc": InferenceClient(srv.grpc_url, "grpc", "off", models_dir=repo),
            }
            for model in ("bench_identity", args.model, "bench_convnet"):
                results["models"][model] = transport(model, repo, vol, clients, args.repeats)
            results["tiling_ms"] = tiling_choice(clients["b_triton_shm"], vol)
            for c in clients.values():
                c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
