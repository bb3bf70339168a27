"""The ONE generic Triton python-backend model: runs ``<version>/model.onnx`` with onnxruntime.

``inference.triton_repo.write_model_dir`` copies this file to ``<model>/1/model.py`` for every
model. It is executed by Triton's python backend stub (in the server's own venv), not imported by
the node. Input and output names come from the model's ``config.pbtxt``; config parameters:

- ``intra_op_threads`` (int, 0 = onnxruntime's default: one per core)
- ``inter_op_threads`` (int, 0 = default)
- ``allow_spinning`` ("1" default, "0": idle onnxruntime threads sleep instead of spinning)

Every request is one ``[N, C, Z, Y, X]`` float32 tensor; requests are run one after the other
(CPU has nothing to gain from concatenating differently shaped volumes).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the python backend


def _param(config: dict[str, Any], key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


class TritonPythonModel:
    """onnxruntime behind Triton's python backend."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(_param(config, "intra_op_threads", "0"))
        opts.inter_op_num_threads = int(_param(config, "inter_op_threads", "0"))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle onnxruntime threads spin by default; beside tritonserver on few cores that steals CPU
        opts.add_session_config_entry("session.intra_op.allow_spinning", _param(config, "allow_spinning", "1"))
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.onnx_input = self.session.get_inputs()[0].name
        self.onnx_output = self.session.get_outputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                if x.dtype != np.float32:
                    x = x.astype(np.float32)
                y = self.session.run([self.onnx_output], {self.onnx_input: x})[0]
                out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(y, dtype=np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:  # reported to the client as an inference error, never crashes the stub
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses

    def finalize(self) -> None:
        self.session = None
