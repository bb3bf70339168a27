"""A classical (not learned) body/foreground model for CT and MR, built directly as an ONNX graph.

It is the first served ``body`` model until the trained one (issue 5) replaces it. Nothing in it is
trained; it is threshold + morphology, written with ``onnx.helper`` so that it runs in the same
Triton/onnxruntime path as the trained networks. On the normalised input ``x`` (CT: window
[-1024, 1500] HU scaled to [0, 1]; MR: z-score per volume) of shape [N, 1, Z, Y, X]:

1. threshold at ``min + 0.15 * (max - min)`` of each volume (about -650 to -700 HU for CT, below fat
   at -100 and above air at -1000);
2. voxels whose 3x3x3 neighbourhood is exactly constant are not body (padding outside the field of
   view and synthetic constant regions have no noise; tissue always has some);
3. opening with a 3x3x3 cube (erode then dilate, as max-pooling), which removes noise, thin
   cables and most of the table;
4. hole filling per axial slice: a voxel is body when there is body on all four sides of it in its
   slice (cumulative sums along the row and column axes in both directions), which fills the lungs,
   bowel gas and the airways enclosed by the body wall.

The output is probabilities [N, 2, Z, Y, X] (0/1 values: background, body). Build and export with
``python -m inference.classical_body [REPO] [--force]`` (default: the project's triton_models/).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

VERSION = "0.1.0-classical"
THRESHOLD_FRACTION = 0.15
OPSET = 17

MANIFEST: dict[str, Any] = {
    "name": "body",
    "version": VERSION,
    "description": (
        "CLASSICAL body/foreground model (not trained): range threshold, constant-region removal, "
        "3x3x3 opening, per-slice hole filling, as an ONNX graph. Placeholder until the trained "
        "body U-Net replaces it; see docs/models.md."
    ),
    "modalities": ["CT", "MR"],
    "spacing_mm": [3.0, 3.0, 3.0],
    "normalisation": "window",
    "windows": [[-1024.0, 1500.0]],
    "normalisation_by_modality": {"MR": "zscore"},
    "patch": [128, 192, 192],
    "pad_multiple": 1,
    "overlap": 0.25,
    "output_kind": "probabilities",
    "input_name": "INPUT",
    "output_name": "OUTPUT",
    "labels": [
        {
            "value": 1,
            "name": "body",
            "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
            "type": {"value": "38266002", "scheme": "SCT", "meaning": "Entire body as a whole"},
            "color": [177, 122, 101],
        }
    ],
    "extra": {"method": "classical", "threshold_fraction": THRESHOLD_FRACTION},
}


def build_onnx() -> bytes:
    """The serialized ONNX graph (opset 17), input "INPUT" [N,1,Z,Y,X] -> output "OUTPUT" [N,2,Z,Y,X]."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, value: Any, dtype: int = TensorProto.FLOAT) -> onnx.NodeProto:
        vals = value if isinstance(value, list) else [value]
        dims = [len(vals)] if isinstance(value, list) else []
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))

    def pool(inp: str, out: str) -> onnx.NodeProto:
        return helper.make_node("MaxPool", [inp], [out], kernel_shape=[3, 3, 3], pads=[1] * 6, strides=[1, 1, 1])

    nodes = [
        const("one", 1.0), const("frac", THRESHOLD_FRACTION), const("eps", 1e-6), const("zero", 0.0),
        const("ax3", 3, TensorProto.INT64), const("ax4", 4, TensorProto.INT64),
        # 1. range threshold per volume
        helper.make_node("ReduceMin", ["INPUT"], ["mn"], axes=[1, 2, 3, 4], keepdims=1),
        helper.make_node("ReduceMax", ["INPUT"], ["mx"], axes=[1, 2, 3, 4], keepdims=1),
        helper.make_node("Sub", ["mx", "mn"], ["rng"]),
        helper.make_node("Mul", ["rng", "frac"], ["off"]),
        helper.make_node("Add", ["mn", "off"], ["thr"]),
        helper.make_node("Greater", ["INPUT", "thr"], ["above"]),
        # 2. exactly constant neighbourhoods: local max - local min < eps
        pool("INPUT", "lmax"),
        helper.make_node("Neg", ["INPUT"], ["negx"]),
        pool("negx", "nlmin"),
        helper.make_node("Add", ["lmax", "nlmin"], ["lrange"]),
        helper.make_node("Greater", ["lrange", "eps"], ["varies"]),
        helper.make_node("And", ["above", "varies"], ["raw_b"]),
        helper.make_node("Cast", ["raw_b"], ["raw"], to=TensorProto.FLOAT),
        # 3. opening: erosion = 1 - maxpool(1 - m), dilation = maxpool
        helper.make_node("Sub", ["one", "raw"], ["inv"]),
        pool("inv", "inv_d"),
        helper.make_node("Sub", ["one", "inv_d"], ["eroded"]),
        pool("eroded", "opened"),
        # 4. per-slice hole filling: body on all four sides along rows (axis 3) and columns (axis 4)
        helper.make_node("CumSum", ["opened", "ax3"], ["c3f"]),
        helper.make_node("CumSum", ["opened", "ax3"], ["c3r"], reverse=1),
        helper.make_node("CumSum", ["opened", "ax4"], ["c4f"]),
        helper.make_node("CumSum", ["opened", "ax4"], ["c4r"], reverse=1),
        helper.make_node("Min", ["c3f", "c3r", "c4f", "c4r"], ["cmin"]),
        helper.make_node("Greater", ["cmin", "zero"], ["body_b"]),
        helper.make_node("Cast", ["body_b"], ["body"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "body"], ["bg"]),
        helper.make_node("Concat", ["bg", "body"], ["OUTPUT"], axis=1),
    ]
    dims_in = ["N", 1, "Z", "Y", "X"]
    graph = helper.make_graph(
        nodes, "classical_body",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, dims_in)],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", 2, "Z", "Y", "X"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dicomnode")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def export(repo: Path | None = None, *, force: bool = False) -> Path:
    """Write the model into ``repo`` (default: the project's triton_models/) via write_model_dir.

    Refuses (FileExistsError) to replace a ``body`` model that is not the classical one (the
    trained network) unless ``force``.
    """
    import json

    from inference.triton_repo import PROJECT_REPO, write_model_dir

    repo = repo or PROJECT_REPO
    current = repo / "body" / "labels.json"
    if current.exists() and not force:
        method = json.loads(current.read_text()).get("extra", {}).get("method")
        if method != "classical":
            raise FileExistsError(f"{current.parent} holds a trained body model; use --force to replace it")
    return write_model_dir(repo, MANIFEST, build_onnx())


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--force"]
    print(export(Path(args[0]) if args else None, force="--force" in sys.argv))
