"""The real Triton server (from the nvidia-pytriton wheel): repository, contract, segment over every transport."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomnode.errors import ModelContractError, TransientError
from dicomnode.infer import tiling
from dicomnode.infer.client import InferenceClient
from dicomnode.series.convert import load_input
from tests.conftest import free_port
from tests.triton_fixture import VENV, pointwise_reference, triton_repo, triton_server  # noqa: F401

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DICOMNODE = [sys.executable, "-m", "dicomnode.cli"]
TRANSPORTS = {  # name -> (protocol, shared_memory)
    "http": ("http", "off"),
    "grpc": ("grpc", "off"),
    "shm": ("http", "auto"),
}


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def test_every_model_of_the_repository_loads_and_matches_its_manifest(triton_server, triton_repo) -> None:
    names = sorted(p.parent.name for p in triton_repo.glob("*/labels.json"))
    assert "body" in names and "pointwise3" in names
    for protocol in ("http", "grpc"):
        with InferenceClient(_url(triton_server, protocol), protocol, models_dir=triton_repo) as c:
            assert c.is_ready()
            c.check_contract(names)


def test_segment_command_gives_identical_labels_over_http_grpc_and_shared_memory(
    triton_server, triton_repo, shared_data: Path, tmp_path: Path
) -> None:
    ct = shared_data / "totalsegmentator" / "example_ct.nii.gz"
    outputs = {}
    for name, (protocol, shm) in TRANSPORTS.items():
        out = tmp_path / f"body_{name}.nii.gz"
        proc = subprocess.run(
            [*DICOMNODE, "segment", str(ct), "--model", "body", "--out", str(out),
             "--triton", _url(triton_server, protocol), "--protocol", protocol, "--shared-memory", shm,
             "--models", str(triton_repo)],
            capture_output=True, text=True, timeout=180, cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        assert ("shared memory" in proc.stdout) == (shm == "auto"), proc.stdout
        outputs[name] = nib.load(str(out))
    ref = nib.load(str(ct))
    arrays = {k: np.asarray(v.dataobj) for k, v in outputs.items()}
    for name, img in outputs.items():
        assert img.shape == ref.shape
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
        np.testing.assert_array_equal(arrays[name], arrays["http"])
    body = arrays["http"] > 0
    # plausibility against TotalSegmentator's organ labels: organs lie inside the body
    organs = np.asarray(nib.load(str(shared_data / "totalsegmentator" / "example_seg_fast_force_split.nii.gz")).dataobj) > 0
    assert body[organs].mean() > 0.99
    hu = np.asarray(ref.dataobj)
    assert np.median(hu[~body]) < -900 and -200 < np.median(hu[body]) < 200
    assert 0.4 < body.mean() < 0.85


def test_sliding_window_through_triton_matches_the_voxelwise_reference(triton_server, triton_repo, shared_data: Path) -> None:
    """pointwise3 has a 32x40x48 patch, so example_ct goes as batched overlapping windows."""
    vol = load_input(shared_data / "totalsegmentator" / "example_ct.nii.gz")
    results = {}
    for name, (protocol, shm) in TRANSPORTS.items():
        with InferenceClient(_url(triton_server, protocol), protocol, shm, models_dir=triton_repo, batch=4) as c:
            m = c.manifest("pointwise3")
            assert not tiling.plan_tiles(tiling.canonical_grid(vol, m.spacing_mm)[1], m).whole
            native = c.segment_native(vol, "pointwise3", probabilities=True)
            assert c.uses_shared_memory == (shm == "auto")
            results[name] = native
    grid = tiling.to_model_grid(vol, m)
    ref = pointwise_reference(tiling.normalise(grid.array, m, "CT")[0])
    for name, pred in results.items():
        assert pred.labels.same_grid(grid)
        assert pred.probabilities is not None and pred.probabilities.shape == (3, *grid.shape)
        np.testing.assert_array_equal(pred.labels.array, results["http"].labels.array)
        assert (pred.labels.array == ref).mean() > 0.9999


def test_segment_maps_back_to_a_dicom_series_grid(triton_server, triton_repo, shared_data: Path) -> None:
    series = shared_data / "dcmqi_seg" / "ct-3slice"
    vol = load_input(series)
    with InferenceClient(triton_server.http_url, models_dir=triton_repo) as c:
        pred = c.segment(vol, "body")
    assert pred.labels.same_grid(vol) and pred.labels.source == vol.source
    assert pred.manifest.name == "body" and pred.labels.array.dtype == np.uint8
    body = pred.labels.array == 1
    assert 0.05 < body.mean() < 0.9
    assert np.median(np.asarray(vol.array)[body]) > -300


def test_contract_check_fails_loudly_on_a_manifest_the_server_does_not_serve(triton_server, triton_repo, tmp_path: Path) -> None:
    local = tmp_path / "models"
    shutil.copytree(triton_repo / "body", local / "body")
    raw = (local / "body" / "labels.json").read_text().replace('"version": "', '"version": "9', 1)
    (local / "body" / "labels.json").write_text(raw)
    shutil.copytree(triton_repo / "pointwise3", local / "unknown_model")
    with InferenceClient(triton_server.http_url, models_dir=local) as c:
        with pytest.raises(ModelContractError, match="version") as exc:
            c.check_contract(["body", "unknown_model"])
        assert "unknown_model" in str(exc.value)


def test_unreachable_server_raises_transient_error_after_retries() -> None:
    port = free_port()  # nothing listens there
    with InferenceClient(f"127.0.0.1:{port}", retries=2, backoff_s=0.05, timeout_s=2) as c:
        started = time.monotonic()
        with pytest.raises(TransientError):
            c.infer("body", np.zeros((1, 1, 8, 8, 8), np.float32))
        assert time.monotonic() - started >= 0.05 + 0.1  # two backoffs happened


def test_a_server_that_never_answers_times_out_as_transient() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])  # accept, read nothing, answer nothing
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with InferenceClient(f"127.0.0.1:{sock.getsockname()[1]}", shared_memory="off", retries=1,
                             backoff_s=0.05, timeout_s=1.0) as c:
            started = time.monotonic()
            with pytest.raises(TransientError):
                c.infer("body", np.zeros((1, 1, 8, 8, 8), np.float32))
            assert time.monotonic() - started < 20
    finally:
        stop.set()
        t.join(5)
        for s in conns:
            s.close()
        sock.close()


def test_dicomnode_triton_command_starts_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    from inference.triton_repo import write_model_dir
    from tests.triton_fixture import pointwise_manifest, pointwise_onnx

    repo = tmp_path / "models"
    write_model_dir(repo, pointwise_manifest(), pointwise_onnx(), gpu_dir=None)
    port = free_port()
    proc = subprocess.Popen(
        [*DICOMNODE, "triton", "--models", str(repo), "--http-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith(f"triton ready: http://127.0.0.1:{port}"), line + (proc.stderr.read() if proc.stderr else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        pid = int(line.split("(pid ")[1].split(",")[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the server process is gone too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_shared_memory_falls_back_to_binary_http_when_it_cannot_be_set_up(
    triton_server, triton_repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server on this host that cannot map our region (e.g. in a container): same results over the wire."""
    import tritonclient.utils.shared_memory as shm

    x = np.random.default_rng(5).uniform(0, 1, size=(1, 1, 16, 24, 24)).astype(np.float32)
    with InferenceClient(triton_server.http_url, shared_memory="off", models_dir=triton_repo) as c:
        wire = c.infer("pointwise3", x)

    def refuse(*_a, **_k):
        raise shm.SharedMemoryException("no /dev/shm here")

    monkeypatch.setattr(shm, "create_shared_memory_region", refuse)
    with InferenceClient(triton_server.http_url, shared_memory="auto", models_dir=triton_repo) as c:
        np.testing.assert_array_equal(c.infer("pointwise3", x), wire)
        assert not c.uses_shared_memory
        np.testing.assert_array_equal(c.infer("pointwise3", x), wire)  # stays on the wire


def test_client_survives_a_server_restart_and_registers_shared_memory_again(tmp_path: Path) -> None:
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    from dicomnode.infer.server import LocalTriton
    from inference.triton_repo import write_model_dir
    from tests.triton_fixture import pointwise_manifest, pointwise_onnx

    repo = tmp_path / "models"
    write_model_dir(repo, pointwise_manifest(), pointwise_onnx(), gpu_dir=None)
    http, grpc = free_port(), free_port()
    x = np.random.default_rng(6).uniform(0, 1, size=(1, 1, 16, 24, 24)).astype(np.float32)
    with LocalTriton(repo, VENV, http, grpc) as srv:
        client = InferenceClient(srv.http_url, models_dir=repo, retries=4, backoff_s=0.5)
        first = client.infer("pointwise3", x)
        assert client.uses_shared_memory
    try:
        with LocalTriton(repo, VENV, http, grpc):  # same ports, fresh server: no registrations
            np.testing.assert_array_equal(client.infer("pointwise3", x), first)
            assert client.uses_shared_memory
    finally:
        client.close()


def test_a_model_that_fails_to_load_is_named_and_the_server_stopped(tmp_path: Path) -> None:
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    from dicomnode.infer.server import LocalTriton
    from inference.triton_repo import write_model_dir
    from tests.triton_fixture import pointwise_manifest, pointwise_onnx

    repo = tmp_path / "models"
    write_model_dir(repo, pointwise_manifest(), pointwise_onnx(), gpu_dir=None)
    write_model_dir(repo, pointwise_manifest(name="broken"), pointwise_onnx(), gpu_dir=None)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    server = LocalTriton(repo, VENV, ready_timeout_s=90)
    with pytest.raises(ModelContractError, match="broken"):
        server.start()
    assert server.pid is None and not server.running


def test_segment_command_starts_its_own_local_server_by_default(triton_repo, shared_data: Path, tmp_path: Path) -> None:
    """No --triton and no config: url = "local", so the command runs a server of its own (MR input)."""
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the Triton server venv {VENV} is absent: run scripts/setup.sh")
    mr = shared_data / "totalsegmentator" / "example_mr_sm.nii.gz"
    out = tmp_path / "body_mr.nii.gz"
    proc = subprocess.run(
        [*DICOMNODE, "segment", str(mr), "--modality", "MR", "--model", "body", "--out", str(out),
         "--models", str(triton_repo)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "shared memory" in proc.stdout
    img, ref = nib.load(str(out)), nib.load(str(mr))
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-4)
    organs = np.asarray(nib.load(str(shared_data / "totalsegmentator" / "example_seg_mr.nii.gz")).dataobj) > 0
    body = np.asarray(img.dataobj) == 1
    assert body[organs].mean() > 0.99 and 0.3 < body.mean() < 0.95
    # a CT-only model refuses MR before any inference
    bad = subprocess.run(
        [*DICOMNODE, "segment", str(mr), "--modality", "MR", "--model", "pointwise3", "--out", str(out),
         "--models", str(triton_repo)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert bad.returncode == 1 and "modality_not_supported" in bad.stderr
