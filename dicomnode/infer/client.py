"""The inference client: any Triton server (the local one or a GPU deployment), HTTP or gRPC.

``InferenceClient(url)`` talks to Triton with ``tritonclient``. When the server is on this host
(127.0.0.1 / localhost / ::1) and ``shared_memory="auto"``, tensors travel through POSIX system
shared memory (registered with the server once, reused between requests); if registering fails
(e.g. a containerised server with its own /dev/shm) it falls back to binary HTTP/gRPC. gRPC runs
with unlimited message sizes. Timeouts, refused connections and 5xx/UNAVAILABLE answers are
retried ``retries`` times with exponential backoff, then raised as ``TransientError``; a model the
server does not know or rejects requests for raises ``ModelContractError``.

Manifests (``labels.json``) are read from ``models_dir`` (the node's copy of the repository,
default the project's ``triton_models/``), never from the server, so ``check_contract`` can compare
what the node expects with what the server serves.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from dicomnode.errors import ModelContractError, SeriesError, TransientError
from dicomnode.infer import tiling
from dicomnode.infer.models import ModelManifest, Prediction, load_manifest
from dicomnode.volume import Volume, resample

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
T = TypeVar("T")
_counter = itertools.count()

_TRANSIENT_STATUS = {
    "500", "502", "503", "504", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED", "StatusCode.CANCELLED",
}


def _host_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[: rest.index("]") + 1]
    return rest.rsplit(":", 1)[0]


def _is_transient(exc: BaseException) -> bool:
    """True for failures that may go away: network errors, timeouts, 5xx, gRPC UNAVAILABLE."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status())
        msg = str(exc.message() or "").lower()
        if "shared memory region" in msg and "register" not in msg:  # stale registration (server restarted)
            return True
        if "stub process" in msg and "not healthy" in msg:  # the model's backend process died (e.g. OOM
            return True  # kill): gRPC says INTERNAL, HTTP 500; it works again once Triton is restarted
        if "has no available versions" in msg:  # known model, not loaded yet: a (re)starting server
            return True
        return status in _TRANSIENT_STATUS or status == "None" or "timed out" in msg or "timeout" in msg
    try:
        import gevent

        if isinstance(exc, gevent.Timeout):
            return True
    except ImportError:  # pragma: no cover - tritonclient[http] brings gevent
        pass
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


class _Shm:
    """One system shared-memory region (input or output), grown on demand and registered with Triton."""

    def __init__(self, role: str) -> None:
        self.name = f"dicomnode_{os.getpid()}_{next(_counter)}_{role}"
        self.handle: Any = None
        self.size = 0
        self.registered = False

    def ensure(self, client: Any, nbytes: int) -> None:
        import tritonclient.utils.shared_memory as shm

        if self.handle is not None and nbytes <= self.size and self.registered:
            return
        if self.handle is None or nbytes > self.size:
            self.release(client)
            size = max(nbytes, 1 << 20)
            self.handle = shm.create_shared_memory_region(self.name, "/" + self.name, size, create_only=True)
            self.size = size
        try:  # a registration left over from before a reconnect
            client.unregister_system_shared_memory(self.name)
        except Exception:
            pass
        client.register_system_shared_memory(self.name, "/" + self.name, self.size)
        self.registered = True

    def release(self, client: Any) -> None:
        import tritonclient.utils.shared_memory as shm

        if self.registered and client is not None:
            try:
                client.unregister_system_shared_memory(self.name)
            except Exception:  # server gone: nothing left to unregister
                pass
        self.registered = False
        if self.handle is not None:
            try:
                shm.destroy_shared_memory_region(self.handle)
            except Exception:
                pass
        self.handle, self.size = None, 0


class InferenceClient:
    """Segmentation through Triton; see the module docstring. Use as a context manager or ``close()``."""

    def __init__(
        self,
        url: str,
        protocol: Literal["http", "grpc"] = "http",
        shared_memory: Literal["auto", "off"] = "auto",
        timeout_s: float = 120.0,
        retries: int = 3,
        models_dir: Path | None = None,
        *,
        batch: int = 1,
        backoff_s: float = 0.5,
    ) -> None:
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        self.url = url.split("://", 1)[-1]
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.batch = max(1, int(batch))
        self.models_dir = Path(models_dir) if models_dir is not None else PROJECT_ROOT / "triton_models"
        self.want_shm = shared_memory == "auto" and _host_of(self.url) in LOCAL_HOSTS
        self._shm_ok: bool | None = None  # None: not tried yet
        self._shm_in, self._shm_out = _Shm("in"), _Shm("out")
        self._manifests: dict[str, ModelManifest] = {}
        self._client: Any = None
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, triton_cfg: Any, url: str) -> "InferenceClient":
        """A client for ``url`` with the protocol, shared memory, timeout, retries and models of a TritonConfig."""
        models = Path(triton_cfg.models_dir)
        return cls(
            url, protocol=triton_cfg.protocol, shared_memory=triton_cfg.shared_memory,
            timeout_s=triton_cfg.timeout_s, retries=triton_cfg.retries,
            models_dir=models if models.is_absolute() else PROJECT_ROOT / models,
        )

    # ---- connection ------------------------------------------------------------------------
    @property
    def uses_shared_memory(self) -> bool:
        """True once system shared memory has been registered with the server successfully."""
        return bool(self._shm_ok)

    def _connect(self) -> Any:
        if self._client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as tg

                self._client = tg.InferenceServerClient(
                    self.url, channel_args=[("grpc.max_send_message_length", -1),
                                            ("grpc.max_receive_message_length", -1)],
                )
            else:
                import tritonclient.http as th

                self._client = th.InferenceServerClient(
                    self.url, connection_timeout=min(self.timeout_s, 10.0), network_timeout=self.timeout_s,
                )
        return self._client

    def _reset(self) -> None:
        """Drop the connection (and the server-side shm registrations) after a transient failure."""
        self._shm_in.registered = self._shm_out.registered = False
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
        self._client = None

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` with retries; TransientError after the last one, ModelContractError on 4xx."""
        from tritonclient.utils import InferenceServerException

        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                return fn(self._connect())
            except InferenceServerException as exc:
                if not _is_transient(exc):
                    raise ModelContractError(f"{what}: {exc.message()} (status {exc.status()})") from exc
                last = exc
            except (ModelContractError, ValueError):
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                last = exc
            self._reset()
            if attempt < self.retries:
                delay = self.backoff_s * (2 ** attempt)
                log.warning("%s failed (%s), retry %d/%d in %.1f s", what, type(last).__name__,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise TransientError(f"inference server {self.url} unavailable for {what}: {type(last).__name__}: {last}")

    def close(self) -> None:
        """Unregister and free shared memory, close the connection."""
        with self._lock:
            for region in (self._shm_in, self._shm_out):
                region.release(self._client)
            self._reset()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:  # regions in /dev/shm must not outlive the client
        try:
            self.close()
        except Exception:
            pass

    # ---- server ----------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server answers ready (no retries)."""
        try:
            return bool(self._connect().is_server_ready(**self._infer_kwargs()))
        except Exception:
            self._reset()
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll until the server is ready; raises TransientError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            time.sleep(0.5)
        raise TransientError(f"inference server {self.url} not ready after {timeout_s:.0f} s")

    def manifest(self, model: str) -> ModelManifest:
        """The manifest of ``model`` from ``models_dir``; raises ModelContractError when absent or bad."""
        if model not in self._manifests:
            self._manifests[model] = load_manifest(self.models_dir / model / "labels.json")
        return self._manifests[model]

    def check_contract(self, models: Sequence[str]) -> None:
        """Compare each served model's metadata and config with its manifest.

        Checks: model ready, one FP32 input/output with the manifest's names, rank 5 ``[N, C, Z, Y,
        X]``, C = number of windows, K = labels + 1, and the config's ``manifest_version`` parameter
        (when present) equal to the manifest's version. Raises ModelContractError naming every
        problem, TransientError when the server cannot be reached.
        """
        problems: list[str] = []
        for name in models:
            try:
                m = self.manifest(name)
            except ModelContractError as exc:
                problems.append(str(exc))
                continue
            try:
                kw = self._infer_kwargs()
                meta = self._call(f"metadata of {name}", lambda c: _as_dict(c.get_model_metadata(name, **kw)))
                cfg = self._call(f"config of {name}", lambda c: _as_dict(c.get_model_config(name, **kw)))
            except ModelContractError as exc:
                problems.append(f"{name}: not served ({exc})")
                continue
            cfg = cfg.get("config", cfg)
            problems += [f"{name}: {p}" for p in _contract_problems(m, meta, cfg)]
        if problems:
            raise ModelContractError("; ".join(problems))

    # ---- inference -------------------------------------------------------------------------
    def infer(self, model: str, x: np.ndarray, *, copy: bool = True) -> np.ndarray:
        """One request: ``x`` float32 [N, C, Z, Y, X] -> the model's output [N, K, Z, Y, X].

        ``copy=False`` may return a read-only view of the shared-memory output region, valid only
        until the next request (tiling consumes each output before sending the next).
        """
        m = self.manifest(model)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 5 or x.shape[1] != m.n_channels:
            raise ValueError(f"{model} takes [N, {m.n_channels}, Z, Y, X], got {x.shape}")
        out_shape = (x.shape[0], m.n_classes, *x.shape[2:])
        with self._lock:
            if self.want_shm and self._shm_ok is not False:
                try:
                    return self._call(f"infer {model}", lambda c: self._infer_shm(c, m, x, out_shape, copy))
                except _ShmUnavailable as exc:
                    log.warning("system shared memory unavailable (%s); using binary %s", exc, self.protocol)
                    self._shm_ok = False
            return self._call(f"infer {model}", lambda c: self._infer_wire(c, m, x))

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        return mod

    def _infer_kwargs(self) -> dict[str, Any]:
        """gRPC calls take a per-call deadline; HTTP has its network timeout on the connection."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _infer_wire(self, client: Any, m: ModelManifest, x: np.ndarray) -> np.ndarray:
        mod = self._module()
        inp = mod.InferInput(m.input_name, list(x.shape), "FP32")
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            out = mod.InferRequestedOutput(m.output_name, binary_data=True)
        else:
            inp.set_data_from_numpy(x)
            out = mod.InferRequestedOutput(m.output_name)
        res = client.infer(m.name, [inp], outputs=[out], **self._infer_kwargs())
        y = res.as_numpy(m.output_name)
        if y is None:
            raise ModelContractError(f"{m.name}: no output {m.output_name!r} in the response")
        return y

    def _infer_shm(
        self, client: Any, m: ModelManifest, x: np.ndarray, out_shape: tuple[int, ...], copy: bool
    ) -> np.ndarray:
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        mod = self._module()
        out_bytes = int(np.prod(out_shape)) * 4
        try:
            self._shm_in.ensure(client, x.nbytes)
            self._shm_out.ensure(client, out_bytes)
        except InferenceServerException as exc:
            if _is_transient(exc):
                raise
            self._shm_in.release(client)
            self._shm_out.release(client)
            raise _ShmUnavailable(str(exc.message())) from exc
        except (OSError, shm.SharedMemoryException) as exc:
            raise _ShmUnavailable(str(exc)) from exc
        self._shm_ok = True
        shm.set_shared_memory_region(self._shm_in.handle, [x])
        inp = mod.InferInput(m.input_name, list(x.shape), "FP32")
        inp.set_shared_memory(self._shm_in.name, x.nbytes)
        out = mod.InferRequestedOutput(m.output_name)
        out.set_shared_memory(self._shm_out.name, out_bytes)
        client.infer(m.name, [inp], outputs=[out], **self._infer_kwargs())
        y = shm.get_contents_as_numpy(self._shm_out.handle, np.float32, out_shape)
        if copy:
            return np.array(y, copy=True)
        y.flags.writeable = False
        return y

    def _predict_fn(self, model: str) -> tiling.PredictFn:
        return lambda xb: self.infer(model, xb, copy=False)

    def segment_native(self, volume: Volume, model: str, *, probabilities: bool = False) -> Prediction:
        """Labels on the model's canonical grid at its spacing (not mapped back).

        ``probabilities=True`` also returns the [K, Z, Y, X] probabilities on that grid. Raises
        TransientError, ModelContractError, or SeriesError("modality_not_supported", kind=
        "unsupported") when the manifest does not list the volume's modality.
        """
        m = self.manifest(model)
        if m.modalities and volume.modality not in m.modalities:
            raise SeriesError("modality_not_supported", kind="unsupported",
                              detail=f"{model} takes {'/'.join(m.modalities)}, not {volume.modality}")
        on_grid = tiling.to_model_grid(volume, m)
        x = tiling.normalise(on_grid.array, m, volume.modality)
        labels, probs = tiling.predict_volume(
            x, m, self._predict_fn(model), batch=self.batch, want_probabilities=probabilities
        )
        labels = tiling.postprocess(labels, m)
        return Prediction(labels=on_grid.with_array(labels), manifest=m, probabilities=probs if probabilities else None)

    def segment(self, volume: Volume, model: str) -> Prediction:
        """Labels on exactly ``volume``'s grid (same affine, shape and provenance).

        Resample to the model spacing on the canonical grid, normalise per manifest, whole volume or
        Gaussian-weighted sliding windows, argmax, nearest-neighbour back onto ``volume``'s grid.
        Raises TransientError (server unavailable), ModelContractError or SeriesError (modality).
        """
        native = self.segment_native(volume, model)
        lab = native.labels
        back = tiling.exact_regrid(np.asarray(lab.array), lab.affine, volume.affine, volume.shape, 0)
        if back is None:
            back = resample(lab, volume.affine, volume.shape, order=0, cval=0).array
        return Prediction(labels=volume.with_array(np.ascontiguousarray(back)), manifest=native.manifest)


class _ShmUnavailable(Exception):
    """System shared memory cannot be used with this server (fall back to the wire)."""


def _as_dict(obj: Any) -> dict[str, Any]:
    """HTTP answers are dicts already; gRPC answers are protobuf messages."""
    if isinstance(obj, dict):
        return obj
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(obj, preserving_proto_field_name=True)


def _contract_problems(m: ModelManifest, meta: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for what, tensors, name, ch in (
        ("input", meta.get("inputs", []), m.input_name, m.n_channels),
        ("output", meta.get("outputs", []), m.output_name, m.n_classes),
    ):
        if len(tensors) != 1:
            problems.append(f"{len(tensors)} {what}s served, the manifest has one")
            continue
        t = tensors[0]
        shape = [int(s) for s in t.get("shape", [])]
        if t.get("name") != name:
            problems.append(f"{what} named {t.get('name')!r}, manifest says {name!r}")
        if t.get("datatype") != "FP32":
            problems.append(f"{what} datatype {t.get('datatype')}, manifest needs FP32")
        if len(shape) != 5:
            problems.append(f"{what} rank {len(shape)}, needs 5 [N, C, Z, Y, X]")
        elif shape[1] not in (ch, -1):
            problems.append(f"{what} has {shape[1]} channels, manifest says {ch}")
    served = cfg.get("parameters", {}).get("manifest_version", {}).get("string_value")
    if served is not None and served != m.version:
        problems.append(f"served version {served}, manifest version {m.version}")
    return problems
