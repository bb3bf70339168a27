"""A real Triton server for the whole test session, and small test models.

Use from any test module (unit tests must not start servers)::

    from tests.triton_fixture import triton_repo, triton_server  # noqa: F401  (pytest fixtures)

    def test_x(triton_server):
        client = InferenceClient(triton_server.http_url, models_dir=triton_server.models_dir)

``triton_repo`` is a session copy of the project's ``triton_models/`` plus the test model
``pointwise3`` (see :func:`pointwise_manifest`); ``triton_server`` is a started ``LocalTriton``
serving it on free ports, stopped by PID at the end of the session. Skips with a reason when the
server venv (``.venv-triton``, made by scripts/setup.sh) is absent.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-triton"

# pointwise3: logits_k = -(x - c_k)^2 on the window-normalised CT value x; argmax = nearest centre.
POINTWISE_CENTRES = (0.0, 0.35, 0.9)  # air, soft tissue, bone (window [-1024, 1500])


def pointwise_manifest(patch: tuple[int, int, int] = (32, 40, 48), name: str = "pointwise3") -> dict[str, Any]:
    """Manifest of a 3-class voxelwise model (no spatial context, so tiling cannot change it)."""
    def lab(v: int, n: str, code: str, meaning: str, color: list[int]) -> dict[str, Any]:
        return {"value": v, "name": n, "color": color,
                "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
                "type": {"value": code, "scheme": "SCT", "meaning": meaning}}

    return {
        "name": name, "version": "test-1", "description": "TEST ONLY: nearest-centre voxel classifier",
        "modalities": ["CT"], "spacing_mm": [3.0, 3.0, 3.0], "normalisation": "window",
        "windows": [[-1024.0, 1500.0]], "patch": list(patch), "pad_multiple": 8, "overlap": 0.5,
        "output_kind": "logits",
        "labels": [lab(1, "soft_tissue", "85756007", "Tissue", [200, 120, 100]),
                   lab(2, "bone", "272673000", "Bone", [240, 240, 200])],
    }


def pointwise_onnx(centres: tuple[float, ...] = POINTWISE_CENTRES) -> bytes:
    """ONNX graph INPUT [N,1,Z,Y,X] -> OUTPUT [N,K,Z,Y,X] = -(x - c_k)^2."""
    from onnx import TensorProto, helper

    k = len(centres)
    c = helper.make_tensor("c", TensorProto.FLOAT, [1, k, 1, 1, 1], list(centres))
    nodes = [
        helper.make_node("Constant", [], ["centres"], value=c),
        helper.make_node("Sub", ["INPUT", "centres"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Neg", ["d2"], ["OUTPUT"]),
    ]
    graph = helper.make_graph(
        nodes, "pointwise",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", k, "Z", "Y", "X"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def pointwise_reference(x: np.ndarray, centres: tuple[float, ...] = POINTWISE_CENTRES) -> np.ndarray:
    """What pointwise3 must give: argmax_k -(x - c_k)^2 on a normalised array."""
    d = np.stack([-(x - np.float32(c)) ** 2 for c in centres])
    return np.argmax(d, axis=0).astype(np.uint8)


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of triton_models/ plus the test model pointwise3."""
    from inference.triton_repo import write_model_dir

    repo = tmp_path_factory.mktemp("triton_repo") / "models"
    shutil.copytree(ROOT / "triton_models", repo, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    write_model_dir(repo, pointwise_manifest(), pointwise_onnx(), gpu_dir=None)
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_repo: Path) -> Iterator[Any]:
    """A started LocalTriton serving ``triton_repo``; stopped by PID after the session."""
    from dicomnode.infer.server import LocalTriton

    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    server = LocalTriton(triton_repo, VENV)
    server.start()
    try:
        yield server
    finally:
        server.stop()
