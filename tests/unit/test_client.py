"""InferenceClient logic that needs no server: config, manifests, modality check, error classes.

Everything that talks to Triton is tested against the real server in tests/integration/test_triton.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from dicomnode.config import TritonConfig
from dicomnode.errors import ModelContractError, SeriesError
from dicomnode.infer.client import InferenceClient, _contract_problems, _is_transient
from dicomnode.volume import Volume
from inference.triton_repo import write_model_dir
from tests.conftest import free_port
from tests.triton_fixture import pointwise_manifest, pointwise_onnx


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    write_model_dir(tmp_path, pointwise_manifest(), pointwise_onnx(), gpu_dir=None)
    return tmp_path


def test_from_config_takes_protocol_shm_timeouts_and_models(repo: Path) -> None:
    cfg = dataclasses.replace(TritonConfig(), protocol="grpc", shared_memory="off", timeout_s=7.0, retries=5,
                              models_dir=str(repo))
    c = InferenceClient.from_config(cfg, "127.0.0.1:8001")
    assert (c.protocol, c.want_shm, c.timeout_s, c.retries, c.models_dir) == ("grpc", False, 7.0, 5, repo)
    assert InferenceClient("localhost:8000").want_shm and not InferenceClient("10.1.2.3:8000").want_shm
    assert InferenceClient("http://[::1]:8000").want_shm


def test_manifest_comes_from_models_dir_and_missing_ones_are_contract_errors(repo: Path) -> None:
    c = InferenceClient(f"127.0.0.1:{free_port()}", models_dir=repo)
    assert c.manifest("pointwise3").n_classes == 3
    with pytest.raises(ModelContractError):
        c.manifest("nope")


def test_a_modality_the_model_does_not_take_is_refused_before_any_request(repo: Path) -> None:
    c = InferenceClient(f"127.0.0.1:{free_port()}", models_dir=repo, retries=0)
    mr = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), modality="MR")
    with pytest.raises(SeriesError) as exc:
        c.segment(mr, "pointwise3")
    assert exc.value.reason == "modality_not_supported" and exc.value.kind == "unsupported"


def test_infer_checks_the_input_shape_against_the_manifest(repo: Path) -> None:
    c = InferenceClient(f"127.0.0.1:{free_port()}", models_dir=repo, retries=0)
    with pytest.raises(ValueError, match=r"\[N, 1, Z, Y, X\]"):
        c.infer("pointwise3", np.zeros((1, 3, 4, 4, 4), np.float32))


def test_error_classification() -> None:
    assert _is_transient(InferenceServerException("busy", status="503"))
    assert _is_transient(InferenceServerException("x", status="StatusCode.UNAVAILABLE"))
    assert _is_transient(InferenceServerException("deadline", status="StatusCode.DEADLINE_EXCEEDED"))
    assert _is_transient(ConnectionRefusedError())
    assert not _is_transient(InferenceServerException("Request for unknown model", status="400"))
    assert not _is_transient(ValueError("bad"))


def test_contract_problems_name_every_disagreement(repo: Path) -> None:
    m = InferenceClient("127.0.0.1:1", models_dir=repo).manifest("pointwise3")
    good = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1, 1, -1, -1, -1]}],
            "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": ["-1", "3", "-1", "-1", "-1"]}]}
    cfg = {"parameters": {"manifest_version": {"string_value": m.version}}}
    assert _contract_problems(m, good, cfg) == []
    bad = {"inputs": [{"name": "IMAGE", "datatype": "FP16", "shape": [-1, 3, -1, -1]}],
           "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, 4, -1, -1, -1]}]}
    problems = _contract_problems(m, bad, {"parameters": {"manifest_version": {"string_value": "old"}}})
    text = "; ".join(problems)
    for word in ("IMAGE", "FP16", "rank 4", "4 channels", "served version old"):
        assert word in text, text
