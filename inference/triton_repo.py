"""Export a model into the Triton model repository (``triton_models/``) and its GPU variant (``deploy/``).

How to call it (models helper: after training, with the ONNX exported from torch)::

    from pathlib import Path
    from inference.triton_repo import write_model_dir

    manifest = {
        "name": "anatomy19",                      # folder name and Triton model name
        "version": "1.0.0",                       # model version string (goes into results/SR)
        "description": "3D U-Net, 16 base filters, trained on synthetic CT (see docs/models.md)",
        "modalities": ["CT"],
        "spacing_mm": [3.0, 3.0, 3.0],            # (slice, row, column) of the canonical axial grid
        "normalisation": "window",                # "window": one (low, high) per input channel,
        "windows": [[-500, 1300], [-1024, 150], [-150, 250]],  # clipped, scaled to [0, 1]; "zscore": 1 channel
        # optional: "normalisation_by_modality": {"MR": "zscore"}  (multi-modality models, e.g. body)
        "patch": [96, 128, 128],                  # sliding-window size (Z, Y, X) at spacing_mm
        "pad_multiple": 16,                       # every input dim is padded to a multiple of this
        "overlap": 0.5,                           # sliding-window overlap (fraction of the patch)
        "output_kind": "logits",                  # or "probabilities" (already softmaxed)
        "input_name": "INPUT", "output_name": "OUTPUT",   # Triton tensor names (defaults)
        "labels": [                               # value 0 is background and is NOT listed
            {"value": 1, "name": "liver",
             "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
             "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"},
             "color": [221, 130, 101]},
            ...
        ],
    }
    write_model_dir(Path("triton_models"), manifest, Path("runs/anatomy19/model.onnx"))  # or ONNX bytes

The ONNX graph must have ONE float32 input ``[N, C, Z, Y, X]`` named like ``input_name`` ("INPUT")
and ONE float32 output ``[N, K, Z, Y, X]`` named like ``output_name`` ("OUTPUT") (K = number of
labels + 1, channel 0 background), with N, Z, Y, X dynamic: ``torch.onnx.export(net, x, f,
input_names=["INPUT"], output_names=["OUTPUT"], dynamic_axes={"INPUT": {0: "N", 2: "Z", 3: "Y",
4: "X"}, "OUTPUT": {0: "N", 2: "Z", 3: "Y", 4: "X"}}, opset_version=17)``. C must equal the number of windows
(or 1 for z-score). The file must be < 25 MB.

It writes ``<repo>/<name>/config.pbtxt`` (python backend, KIND_CPU), ``<name>/1/model.py`` (the one
generic onnxruntime model, ``inference/onnx_python_model.py``), ``<name>/1/model.onnx``,
``<name>/labels.json`` (the manifest, read by ``dicomnode.infer.models.load_manifest``) and, when
``repo`` is the project's ``triton_models`` (or ``gpu_dir`` is given), the GPU variant
``deploy/triton-gpu/<name>/config.pbtxt`` (platform onnxruntime_onnx, KIND_GPU, dynamic batching).
Before anything is replaced, the ONNX graph is checked against the manifest and run once on a small
zero volume with onnxruntime; ModelContractError is raised when they disagree, ValueError when the
file is too large. Restart the Triton server to serve the new version.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ModelContractError
from dicomnode.infer.models import ModelManifest, load_manifest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_REPO = PROJECT_ROOT / "triton_models"
PROJECT_GPU_DIR = PROJECT_ROOT / "deploy" / "triton-gpu"
MODEL_PY = Path(__file__).resolve().parent / "onnx_python_model.py"
MAX_ONNX_BYTES = 25 * 1024 * 1024


def cpu_config_text(m: ModelManifest, *, max_batch: int = 0, intra_op_threads: int = 0) -> str:
    """config.pbtxt for the python backend on CPU (the local server and CI)."""
    lead = "" if max_batch > 0 else "-1, "
    batching = "dynamic_batching { max_queue_delay_microseconds: 1000 }\n" if max_batch > 0 else ""
    return (
        f'name: "{m.name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch}\n"
        f'input [ {{ name: "{m.input_name}" data_type: TYPE_FP32 dims: [ {lead}{m.n_channels}, -1, -1, -1 ] }} ]\n'
        f'output [ {{ name: "{m.output_name}" data_type: TYPE_FP32 dims: [ {lead}{m.n_classes}, -1, -1, -1 ] }} ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"{batching}"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f'parameters {{ key: "intra_op_threads" value: {{ string_value: "{intra_op_threads}" }} }}\n'
        f'parameters {{ key: "manifest_version" value: {{ string_value: "{m.version}" }} }}\n'
    )


def gpu_config_text(m: ModelManifest, *, max_batch: int = 4) -> str:
    """config.pbtxt for NVIDIA's container: onnxruntime_onnx on the GPU with dynamic batching.

    The batch dimension is Triton's (``max_batch_size``), so the tensors seen by the client are the
    same ``[N, C, Z, Y, X]`` as on CPU; patches of one shape are batched across requests.
    """
    return (
        f'name: "{m.name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max(1, max_batch)}\n"
        f'input [ {{ name: "{m.input_name}" data_type: TYPE_FP32 dims: [ {m.n_channels}, -1, -1, -1 ] }} ]\n'
        f'output [ {{ name: "{m.output_name}" data_type: TYPE_FP32 dims: [ {m.n_classes}, -1, -1, -1 ] }} ]\n'
        "instance_group [ { count: 1 kind: KIND_GPU } ]\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f'parameters {{ key: "manifest_version" value: {{ string_value: "{m.version}" }} }}\n'
    )


def _onnx_bytes(onnx_bytes_or_path: bytes | str | Path) -> bytes:
    if isinstance(onnx_bytes_or_path, (bytes, bytearray)):
        return bytes(onnx_bytes_or_path)
    return Path(onnx_bytes_or_path).read_bytes()


def check_onnx(m: ModelManifest, data: bytes) -> None:
    """Check an ONNX graph against the manifest and run it once on zeros.

    The graph's input/output names must be the manifest's ``input_name``/``output_name`` (the GPU
    platform ``onnxruntime_onnx`` binds tensors by name); ranks, dtypes, channel counts and dynamic
    batch/spatial axes are checked too. Raises ModelContractError.
    """
    import onnxruntime as ort

    if len(data) >= MAX_ONNX_BYTES:
        raise ValueError(f"{m.name}: ONNX file is {len(data) / 2**20:.1f} MiB, the limit is 25 MiB")
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelContractError(f"{m.name}: onnxruntime cannot load the graph: {exc}") from exc
    ins, outs = sess.get_inputs(), sess.get_outputs()
    if len(ins) != 1 or len(outs) != 1:
        raise ModelContractError(f"{m.name}: the graph must have one input and one output")
    for what, t, ch, want in (
        ("input", ins[0], m.n_channels, m.input_name), ("output", outs[0], m.n_classes, m.output_name)
    ):
        if t.name != want:
            raise ModelContractError(f"{m.name}: ONNX {what} is named {t.name!r}, the manifest says {want!r}")
        if t.type != "tensor(float)" or len(t.shape) != 5:
            raise ModelContractError(f"{m.name}: {what} must be float32 rank 5, is {t.type} {t.shape}")
        if isinstance(t.shape[1], int) and t.shape[1] != ch:
            raise ModelContractError(f"{m.name}: {what} has {t.shape[1]} channels, the manifest says {ch}")
        fixed = [d for d in (t.shape[0], *t.shape[2:]) if isinstance(d, int) and d > 1]
        if fixed:
            raise ModelContractError(f"{m.name}: {what} batch/spatial axes must be dynamic, got {t.shape}")
    side = max(16, int(m.pad_multiple))
    x = np.zeros((1, m.n_channels, side, side, side), np.float32)
    try:
        y = sess.run(None, {ins[0].name: x})[0]
    except Exception as exc:
        raise ModelContractError(f"{m.name}: the graph fails on a {side}^3 volume: {exc}") from exc
    if y.shape != (1, m.n_classes, side, side, side) or y.dtype != np.float32:
        raise ModelContractError(f"{m.name}: output {y.dtype} {y.shape} for input {x.shape}")


def write_model_dir(
    repo: Path,
    manifest: dict[str, Any],
    onnx_bytes_or_path: bytes | str | Path,
    *,
    max_batch: int = 0,
    intra_op_threads: int = 0,
    gpu_dir: Path | None | str = "auto",
) -> Path:
    """Write (or replace) ``<repo>/<manifest['name']>``; returns that folder. See the module docstring.

    ``max_batch`` > 0 gives the CPU config Triton batching (``max_batch_size``) instead of an
    explicit batch dimension; ``gpu_dir="auto"`` writes the GPU config under ``deploy/triton-gpu``
    only when ``repo`` is the project's ``triton_models``; ``None`` never writes it.
    Raises ModelContractError (manifest or graph wrong) or ValueError (ONNX >= 25 MiB).
    """
    repo = Path(repo)
    name = str(manifest["name"])
    if not name or "/" in name or name.startswith("."):
        raise ModelContractError(f"invalid model name {name!r}")
    data = _onnx_bytes(onnx_bytes_or_path)
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=repo))
    try:
        (tmp / "labels.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        m = load_manifest(tmp / "labels.json")  # the node's own reader: raises ModelContractError
        if m.name != name:
            raise ModelContractError("manifest name mismatch")
        check_onnx(m, data)
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(data)
        shutil.copy2(MODEL_PY, tmp / "1" / "model.py")
        (tmp / "config.pbtxt").write_text(
            cpu_config_text(m, max_batch=max_batch, intra_op_threads=intra_op_threads), encoding="utf-8"
        )
        dst = repo / name
        if dst.exists():
            old = repo / f".{name}-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if gpu_dir == "auto":
        gpu_dir = PROJECT_GPU_DIR if repo.resolve() == PROJECT_REPO.resolve() else None
    if gpu_dir is not None:
        gdir = Path(gpu_dir) / name
        gdir.mkdir(parents=True, exist_ok=True)
        (gdir / "config.pbtxt").write_text(gpu_config_text(m), encoding="utf-8")
    return repo / name


def make_gpu_repo(src_repo: Path, dst_repo: Path) -> list[str]:
    """Assemble a model repository for NVIDIA's GPU container from ``src_repo`` (e.g. triton_models).

    Each model gets the GPU config (generated from its manifest), ``1/model.onnx`` and
    ``labels.json``; no python code. Returns the model names. Raises ModelContractError.
    """
    names = []
    for labels in sorted(Path(src_repo).glob("*/labels.json")):
        m = load_manifest(labels)
        d = Path(dst_repo) / m.name
        (d / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(labels.parent / "1" / "model.onnx", d / "1" / "model.onnx")
        shutil.copy2(labels, d / "labels.json")
        (d / "config.pbtxt").write_text(gpu_config_text(m), encoding="utf-8")
        names.append(m.name)
    return names


if __name__ == "__main__":  # python -m inference.triton_repo DST: build a GPU repository
    import sys

    if len(sys.argv) != 2:
        print("usage: python -m inference.triton_repo GPU_REPO_DIR", file=sys.stderr)
        sys.exit(2)
    print("\n".join(make_gpu_repo(PROJECT_REPO, Path(sys.argv[1]))))
