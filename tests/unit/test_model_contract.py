"""Every model in triton_models/ agrees with its manifest, its ONNX graph and its GPU variant."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from dicomnode.errors import ModelContractError
from dicomnode.infer.models import load_manifest
from inference.triton_repo import MODEL_PY, check_onnx, write_model_dir
from tests.triton_fixture import pointwise_manifest, pointwise_onnx

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "triton_models"
GPU = ROOT / "deploy" / "triton-gpu"
MODELS = sorted(p.parent.name for p in REPO.glob("*/config.pbtxt"))
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dims(cfg: model_config_pb2.ModelConfig, t: model_config_pb2.ModelInput) -> list[int]:
    """Tensor shape as the client sees it: [N, C, Z, Y, X] (Triton's batch dim added when max_batch_size > 0)."""
    return ([-1] if cfg.max_batch_size > 0 else []) + list(t.dims)


def test_the_repository_has_the_body_model() -> None:
    assert "body" in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_cpu_config_agrees_with_manifest_and_onnx(name: str) -> None:
    d = REPO / name
    cfg = _config(d / "config.pbtxt")
    m = load_manifest(d / "labels.json")
    assert cfg.name == name == m.name
    assert cfg.backend == "python" and not cfg.platform
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert len(cfg.input) == 1 and len(cfg.output) == 1
    i, o = cfg.input[0], cfg.output[0]
    assert (i.name, i.data_type) == (m.input_name, FP32)
    assert (o.name, o.data_type) == (m.output_name, FP32)
    assert _dims(cfg, i) == [-1, m.n_channels, -1, -1, -1]
    assert _dims(cfg, o) == [-1, m.n_classes, -1, -1, -1]
    assert cfg.parameters["manifest_version"].string_value == m.version
    assert int(cfg.parameters["intra_op_threads"].string_value) >= 0
    # the one generic model.py, byte for byte
    assert (d / "1" / "model.py").read_bytes() == MODEL_PY.read_bytes()
    onnx_path = d / "1" / "model.onnx"
    assert onnx_path.stat().st_size < 25 * 1024 * 1024
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name for t in graph.initializer}
    ins = [t for t in graph.input if t.name not in inits]
    assert [t.name for t in ins] == [m.input_name] and [t.name for t in graph.output] == [m.output_name]
    for t, ch in ((ins[0], m.n_channels), (graph.output[0], m.n_classes)):
        assert t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = t.type.tensor_type.shape.dim
        assert len(dims) == 5
        assert dims[1].dim_value == ch
        assert all(not dd.HasField("dim_value") for k, dd in enumerate(dims) if k != 1), "N, Z, Y, X must be dynamic"
    check_onnx(m, onnx_path.read_bytes())  # also runs it once on zeros


@pytest.mark.parametrize("name", MODELS)
def test_manifest_labels_have_codes_and_colours(name: str) -> None:
    m = load_manifest(REPO / name / "labels.json")
    assert m.version and m.description and m.modalities
    assert m.spacing_mm and all(s > 0 for s in m.spacing_mm)
    for lab in m.labels:
        assert lab.category.scheme == "SCT" and lab.category.value.isdigit()
        assert lab.type.scheme == "SCT" and lab.type.value.isdigit() and lab.type.meaning
        assert len(lab.color) == 3 and all(0 <= c <= 255 for c in lab.color)
    assert len({lab.name for lab in m.labels}) == len(m.labels)


@pytest.mark.parametrize("name", MODELS)
def test_gpu_variant_agrees(name: str) -> None:
    m = load_manifest(REPO / name / "labels.json")
    cfg = _config(GPU / name / "config.pbtxt")
    assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and not cfg.backend
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert cfg.max_batch_size >= 1 and cfg.HasField("dynamic_batching")
    assert (cfg.input[0].name, cfg.output[0].name) == (m.input_name, m.output_name)
    assert _dims(cfg, cfg.input[0]) == [-1, m.n_channels, -1, -1, -1]
    assert _dims(cfg, cfg.output[0]) == [-1, m.n_classes, -1, -1, -1]
    assert cfg.parameters["manifest_version"].string_value == m.version


def test_write_model_dir_round_trip(tmp_path: Path) -> None:
    d = write_model_dir(tmp_path, pointwise_manifest(), pointwise_onnx(), gpu_dir=tmp_path / "gpu")
    m = load_manifest(d / "labels.json")
    assert m.n_classes == 3 and m.output_kind == "logits" and m.pad_multiple == 8
    cfg = _config(d / "config.pbtxt")
    assert _dims(cfg, cfg.output[0]) == [-1, 3, -1, -1, -1]
    assert _config(tmp_path / "gpu" / "pointwise3" / "config.pbtxt").platform == "onnxruntime_onnx"
    assert not list(tmp_path.glob(".*")), "no temporary folders left behind"


def test_write_model_dir_refuses_disagreements(tmp_path: Path) -> None:
    man = pointwise_manifest()
    bad_labels = {**man, "labels": man["labels"][:1]}  # 2 classes declared, graph gives 3
    with pytest.raises(ModelContractError, match="channels"):
        write_model_dir(tmp_path, bad_labels, pointwise_onnx(), gpu_dir=None)
    with pytest.raises(ModelContractError, match="named"):
        write_model_dir(tmp_path, {**man, "input_name": "IMAGE"}, pointwise_onnx(), gpu_dir=None)
    with pytest.raises(ModelContractError, match="channels"):
        write_model_dir(tmp_path, {**man, "windows": [[-1024, 1500], [-150, 250]]}, pointwise_onnx(), gpu_dir=None)
    with pytest.raises(ModelContractError):
        write_model_dir(tmp_path, {**man, "normalisation": "minmax"}, pointwise_onnx(), gpu_dir=None)
    with pytest.raises(ModelContractError):
        write_model_dir(tmp_path, {k: v for k, v in man.items() if k != "spacing_mm"}, pointwise_onnx(), gpu_dir=None)
    assert not (tmp_path / "pointwise3").exists()


def test_write_model_dir_refuses_large_files(tmp_path: Path) -> None:
    big = onnx.load_from_string(pointwise_onnx())
    big.graph.initializer.append(
        onnx.numpy_helper.from_array(np.zeros(7 * 1024 * 1024, np.float32), name="padding")
    )
    with pytest.raises(ValueError, match="25 MiB"):
        write_model_dir(tmp_path, pointwise_manifest(), big.SerializeToString(), gpu_dir=None)


def test_manifest_json_is_what_load_manifest_reads() -> None:
    for name in MODELS:
        raw = json.loads((REPO / name / "labels.json").read_text())
        m = load_manifest(REPO / name / "labels.json")
        assert [lab["name"] for lab in raw["labels"]] == [lab.name for lab in m.labels]
