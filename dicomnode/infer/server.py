"""The local Triton Inference Server: a real ``tritonserver`` from the ``nvidia-pytriton`` wheel, on CPU.

``LocalTriton(models_dir, venv_dir)`` creates the server's own virtual environment from
``deploy/triton-requirements.txt`` when it is missing (nvidia-pytriton pins numpy<2, so it is kept
apart from the node's), assembles a server folder next to it (the ``tritonserver`` tree of the wheel
plus the python backend stub for the venv's Python, see FIELD_NOTES.md), starts the server bound to
127.0.0.1 on free (or given) HTTP, gRPC and metrics ports, waits for ``/v2/health/ready`` and stops
it by PID. It is a context manager::

    with LocalTriton(Path("triton_models"), Path(".venv-triton")) as srv:
        client = InferenceClient(srv.http_url)

Only the python backend exists in the wheel: every model is a python-backend ``model.py`` running
``model.onnx`` with onnxruntime (see ``inference/triton_repo.py``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from dicomnode.errors import ModelContractError, TransientError

if TYPE_CHECKING:
    from dicomnode.config import Config

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
REQUIREMENTS = PROJECT_ROOT / "deploy" / "triton-requirements.txt"
SERVER_DIRNAME = "dicomnode-tritonserver"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: all sockets are held open together while picking
    (picking one at a time can hand out the same port twice - seen: HTTP and gRPC on one port)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def ensure_venv(venv_dir: Path, requirements: Path = REQUIREMENTS) -> None:
    """Create the server venv from ``requirements`` when missing or out of date.

    The stamp file is the same one ``scripts/setup.sh`` writes (first 16 hex digits of the
    requirements' SHA-256), so both agree on when a reinstall is due. Raises RuntimeError when
    pip fails.
    """
    import hashlib

    want = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    stamp = venv_dir / ".dicomnode-installed"
    if _venv_python(venv_dir).exists() and stamp.exists() and stamp.read_text().strip() == want:
        return
    if not _venv_python(venv_dir).exists():
        log.info("creating the Triton server venv in %s", venv_dir)
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    log.info("installing the Triton server into %s (nvidia-pytriton, onnxruntime)", venv_dir)
    proc = subprocess.run(
        [str(_venv_python(venv_dir)), "-m", "pip", "install", "-q", "-r", str(requirements)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip install into {venv_dir} failed: {proc.stderr[-2000:]}")
    stamp.write_text(want + "\n")


def _venv_facts(venv_dir: Path) -> tuple[Path, str, str, str]:
    """(site-packages, python 'X.Y', LIBDIR of the venv's base interpreter, nvidia-pytriton version)."""
    code = (
        "import sys, sysconfig, json, importlib.metadata as md;"
        "print(json.dumps([sysconfig.get_paths()['purelib'], '%d.%d' % sys.version_info[:2],"
        " sysconfig.get_config_var('LIBDIR') or '', md.version('nvidia-pytriton')]))"
    )
    out = subprocess.run([str(_venv_python(venv_dir)), "-c", code], capture_output=True, text=True, check=True)
    sp, ver, libdir, pytriton = json.loads(out.stdout)
    return Path(sp), ver, libdir, pytriton


def ensure_server_tree(venv_dir: Path) -> tuple[Path, dict[str, str]]:
    """Assemble ``<venv>/dicomnode-tritonserver-<pytriton>-py<X.Y>``; return it and the environment to run it in.

    Copies the wheel's ``pytriton/tritonserver`` tree once per nvidia-pytriton/Python version and
    puts the python backend stub for the venv's Python into ``backends/python/``. Raises
    RuntimeError when the wheel lacks either.
    """
    sp, ver, libdir, pytriton = _venv_facts(venv_dir)
    src = sp / "pytriton" / "tritonserver"
    stub = src / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not (src / "bin" / "tritonserver").exists() or not stub.exists():
        raise RuntimeError(f"nvidia-pytriton in {venv_dir} has no tritonserver or no stub for Python {ver}")
    dst = venv_dir / f"{SERVER_DIRNAME}-{pytriton}-py{ver}"  # a new folder per version: never
    marker = dst / ".complete"  # replaced under a running server
    stamp = f"python {ver} nvidia-pytriton {pytriton}\n"
    if not marker.exists():
        if dst.exists():
            shutil.rmtree(dst)
        tmp = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=venv_dir))
        shutil.copytree(src, tmp / "t", ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, tmp / "t" / "backends" / "python" / "triton_python_backend_stub")
        (tmp / "t" / ".complete").write_text(stamp)
        try:
            os.replace(tmp / "t", dst)
        except OSError:
            if not marker.exists():  # not a concurrent start that finished first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_"))}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(sp / "nvidia_pytriton.libs"), libdir) if p)
    env["PATH"] = str(venv_dir.resolve() / "bin") + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env["VIRTUAL_ENV"] = str(venv_dir.resolve())
    return dst, env


class LocalTriton:
    """A real Triton server process on 127.0.0.1 serving ``models_dir`` (context manager).

    Ports 0 pick free ports. ``start()`` raises TransientError when the server does not become
    ready within ``ready_timeout_s`` and ModelContractError when a model failed to load (with the
    server's reason); in both cases the process is stopped first. ``stop()`` is idempotent.
    """

    def __init__(
        self,
        models_dir: Path | str,
        venv_dir: Path | str,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        *,
        log_path: Path | str | None = None,
        ready_timeout_s: float = 120.0,
        log_verbose: int = 0,
    ) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.venv_dir = Path(venv_dir).resolve()
        taken = {http_port, grpc_port, metrics_port} - {0}
        spare = iter(p for p in _free_ports(6) if p not in taken)
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.ready_timeout_s = ready_timeout_s
        self.log_verbose = log_verbose
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- addresses ------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """``127.0.0.1:<http port>`` (tritonclient form, no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:<grpc port>``."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "LocalTriton":
        """Create the venv/server folder if needed, start the server, wait until it is ready."""
        if self._proc is not None:
            return self
        if not self.models_dir.is_dir():
            raise ModelContractError(f"model repository {self.models_dir} does not exist")
        ensure_venv(self.venv_dir)
        server_dir, env = ensure_server_tree(self.venv_dir)
        cmd = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.models_dir}",
            f"--backend-directory={server_dir / 'backends'}",
            f"--cache-directory={server_dir / 'caches'}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--strict-readiness=true", "--exit-on-error=false", "--exit-timeout-secs=8",
            f"--log-verbose={self.log_verbose}",
            # python backend <-> stub transfers: start big enough for a 3 mm volume, grow in large steps
            "--backend-config=python,shm-default-byte-size=33554432",
            "--backend-config=python,shm-growth-byte-size=67108864",
        ]
        # the server dies with the thread that started it, even on SIGKILL of the node (else a
        # killed node leaves an orphaned server holding its ports and ~0.5-1 GB): util-linux setpriv
        # sets PR_SET_PDEATHSIG and execs the server (no preexec_fn in a threaded process)
        setpriv = shutil.which("setpriv")
        if setpriv and sys.platform.startswith("linux"):
            cmd = [setpriv, "--pdeathsig", "SIGTERM", "--", *cmd]
        log.info("starting tritonserver on %s (gRPC %s), models %s", self.http_url, self.grpc_url, self.models_dir)
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=str(server_dir),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("tritonserver ready (pid %d)", self._proc.pid)
        return self

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except OSError:
            return 0, b""

    def _failed_models(self) -> list[str]:
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2.0) as resp:
                index = json.loads(resp.read())
        except (OSError, ValueError):
            return []
        return [f"{m.get('name')}: {m.get('reason', '')}" for m in index if m.get("state") == "UNAVAILABLE"]

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        live_since: float | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TransientError(f"tritonserver exited with {self._proc.returncode}: {self.log_tail()}")
            status, _ = self._get("/v2/health/ready")
            if status == 200:
                return
            if status:  # live but not ready: models loading, or one failed
                live_since = live_since or time.monotonic()
                failed = self._failed_models()
                if failed and time.monotonic() - live_since > 1.0:
                    raise ModelContractError("models failed to load in Triton: " + "; ".join(failed))
            time.sleep(0.2)
        raise TransientError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        """The last ``n`` characters of the server log (no patient data ever reaches it)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def is_ready(self) -> bool:
        """True when ``/v2/health/ready`` answers 200."""
        return self._get("/v2/health/ready")[0] == 200

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server (by PID, its own process group), SIGKILL after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s, killing it", timeout_s)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        if self._own_log:
            try:
                self.log_path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def local_server_from_config(cfg: "Config") -> LocalTriton:
    """The (not yet started) local server described by ``cfg.triton`` (for ``url = "local"``).

    Models from ``cfg.resource(triton.models_dir)``, venv ``cfg.resource(triton.venv_dir)``, ports
    ``http_port``/``grpc_port`` (0: free ports), the log under ``data_dir/logs/tritonserver.log``.
    """
    t = cfg.triton
    logs = cfg.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return LocalTriton(
        cfg.resource(t.models_dir), cfg.resource(t.venv_dir), t.http_port, t.grpc_port,
        log_path=logs / "tritonserver.log",
    )
