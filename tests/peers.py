"""Real DICOM peers for tests and benchmarks: the node, Orthanc, dcmtk, synthetic CT series.

Everything listens on 127.0.0.1 on free ports and is stopped by PID (context managers and
``stop()`` always clean up). Tools that are missing make the test skip with a reason
(``require_tool``); in CI ``scripts/setup.sh`` installs them.

API (import as ``from tests.peers import ...``):

- ``free_port() -> int``
- ``require_tool(name)`` / ``have_tool(name) -> bool``          skip when a binary is missing
- ``wait_for(pred, timeout=10.0, interval=0.05) -> bool``
- ``make_ct_series(folder, n=20, rows=64, cols=64, **kw) -> SeriesInfo``
      synthetic CT Image Storage series (proper UIDs, positions, orientation, canary patient);
      kw: spacing, pixel_spacing, orientation, origin, study_uid, series_uid, patient_name,
      patient_id, modality ("CT"/"MR"), transfer_syntax, skip (slice indices left out),
      shuffle_names, seed.  SeriesInfo: folder, files, study_uid, series_uid, sop_uids.
- ``write_node_config(path, port, data_dir, peers=(...), **kw) -> Path``   a node TOML
      peers: iterable of ``Peer(name, ae_title, port, host="127.0.0.1", may_send=True,
      receives_results=False)``; kw: ae_title, quiet_period_s, max_wait_s, extra (raw TOML
      appended: add [triton], [tls], ... sections yourself), require_known_callers, node_extra
      (raw lines added to [node]).
- ``NodeProcess.start(config, port, log=path, env=None, timeout=60, echo_calling="ECHOSCU")``
      ``.venv/bin/dicomnode serve --config ...`` (cwd = the config's folder); waits until it
      answers C-ECHO from ``echo_calling`` (give that AE a ``Peer``), or with ``echo_calling=""``
      until the port accepts; ``extra_args`` are appended (``--port``, ``--data-dir``).
      ``.proc``, ``.log`` (node output), ``.port``, ``.config``;
      ``.stop()`` (SIGTERM, then SIGKILL), ``.kill()`` (SIGKILL now), ``.status() -> dict``
      (``dicomnode status --json``), context manager. The node's data: ``state.sqlite3`` and
      ``spool/`` under the config's data_dir.
- ``echo(port, called="DICOMNODE", calling="ECHOSCU") -> bool``  pynetdicom C-ECHO
- ``storescu(paths, port, called="DICOMNODE", calling="STORESCU", extra=(), timeout=300)``
      dcmtk storescu with TCP_NODELAY=1; ``acked_files(r.stderr)`` lists the files it got
      a success status for (map them to UIDs with ``SeriesInfo.files``/``sop_uids``).
- ``Orthanc.start(workdir, modalities={"dicomnode": ("DICOMNODE", "127.0.0.1", port)})``
      ``.dicom_port``, ``.http_port``, ``.ae_title``, ``.rest(method, path, body=None)``,
      ``.upload(files) -> list[str]`` (instance ids), ``.push(modality, resources)``,
      ``.stop()``; context manager.
- ``StoreSCP.start(outdir, ae_title="STORESCP") -> StoreSCP``  dcmtk storescp; ``.port``, ``.stop()``.
- ``peer_env(**extra) -> dict``  os.environ + TCP_NODELAY=1 for any dcmtk/Orthanc subprocess;
  ``DICOMNODE``: path of ``.venv/bin/dicomnode``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
DICOMNODE = VENV_BIN / "dicomnode"


# ---- small utilities ---------------------------------------------------------------------

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and was not handed out before in this
    process (picking ports one at a time can otherwise return the same port twice in a row)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port found")


def have_tool(name: str) -> bool:
    """True if the executable ``name`` is on PATH."""
    return shutil.which(name) is not None


def require_tool(name: str) -> None:
    """Skip the calling test when ``name`` is not installed (scripts/setup.sh installs it)."""
    if not have_tool(name):
        import pytest

        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it is truthy or ``timeout`` seconds pass; returns the last result's truth."""
    end = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return True
        except Exception:
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _kill(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def peer_env(**extra: str) -> dict[str, str]:
    """The environment for dcmtk/Orthanc: TCP_NODELAY=1 (dcmtk leaves Nagle on otherwise)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


# ---- synthetic series ----------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesInfo:
    """A series written by :func:`make_ct_series`; ``files``/``sop_uids`` in slice order."""

    folder: Path
    files: tuple[Path, ...]
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]


def make_ct_series(folder: str | Path, n: int = 20, rows: int = 64, cols: int = 64, *,
                   spacing: float = 2.5, pixel_spacing: tuple[float, float] = (0.8, 0.8),
                   orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
                   origin: Sequence[float] = (-100.0, -120.0, 50.0),
                   study_uid: str | None = None, series_uid: str | None = None,
                   patient_name: str = "CANARY^PATIENT", patient_id: str = "CANARY-0001",
                   modality: str = "CT", transfer_syntax: str = "1.2.840.10008.1.2.1",
                   skip: Iterable[int] = (), shuffle_names: bool = False, seed: int = 0) -> SeriesInfo:
    """Write ``n`` single-frame slices (int16 phantom: a body ellipse with noise) to ``folder``.

    Slice k sits at ``origin + k * spacing * normal``. Indices in ``skip`` are not written (gaps).
    ``transfer_syntax`` is explicit (default) or implicit little endian.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((yy - rows / 2) / (rows * 0.4)) ** 2 + ((xx - cols / 2) / (cols * 0.35)) ** 2 <= 1.0
    base = np.where(body, 40, -1000).astype(np.int16)
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    skipped = set(skip)
    files: list[Path] = []
    sops: list[str] = []
    order = list(range(n))
    names = list(range(n))
    if shuffle_names:
        random.Random(seed).shuffle(names)
    for k in order:
        if k in skipped:
            continue
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = transfer_syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19010101"
        ds.AccessionNumber = "CANARYACC1"
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.Modality = modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * spacing * normal]
        ds.ImageOrientationPatient = [float(v) for v in o]
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.SliceThickness = spacing
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        noise = rng.integers(-20, 20, size=(rows, cols), dtype=np.int16)
        ds.PixelData = (base + noise).tobytes()
        path = folder / f"{names[k]:05d}.dcm"
        ds.save_as(path, implicit_vr=transfer_syntax == "1.2.840.10008.1.2", little_endian=True,
                   enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    del pydicom
    return SeriesInfo(folder, tuple(files), study_uid, series_uid, tuple(sops))


# ---- the node -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """A ``[[peers]]`` entry for :func:`write_node_config`."""

    name: str
    ae_title: str
    port: int = 104
    host: str = "127.0.0.1"
    may_send: bool = True
    receives_results: bool = False


def write_node_config(path: str | Path, port: int, data_dir: str | Path, peers: Iterable[Peer] = (), *,
                      ae_title: str = "DICOMNODE", quiet_period_s: float = 10.0, max_wait_s: float = 600.0,
                      require_known_callers: bool = True, node_extra: str = "", extra: str = "") -> Path:
    """Write a node TOML for tests (web status page off unless ``extra`` configures it)."""
    lines = [
        "[node]", f'ae_title = "{ae_title}"', f"port = {port}", f'data_dir = "{Path(data_dir)}"',
        'bind_address = "127.0.0.1"', "min_free_bytes = 0",
        f"require_known_callers = {'true' if require_known_callers else 'false'}", node_extra, "",
    ]
    for p in peers:
        lines += ["[[peers]]", f'name = "{p.name}"', f'ae_title = "{p.ae_title}"', f'host = "{p.host}"',
                  f"port = {p.port}", f"may_send = {'true' if p.may_send else 'false'}",
                  f"receives_results = {'true' if p.receives_results else 'false'}", ""]
    lines += ["[completion]", f"quiet_period_s = {quiet_period_s}", f"max_wait_s = {max_wait_s}", ""]
    if "[web]" not in extra:
        lines += ["[web]", "enabled = false", f"port = {free_port()}", f"metrics_port = {free_port()}", ""]
    lines.append(extra)
    p = Path(path)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def echo(port: int, called: str = "DICOMNODE", calling: str = "ECHOSCU", host: str = "127.0.0.1",
         timeout: float = 5.0) -> bool:
    """True if the AE at ``host:port`` answers C-ECHO with success (pynetdicom)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        st = assoc.send_c_echo()
        return bool(st) and int(st.Status) == 0
    finally:
        assoc.release()


@dataclass
class NodeProcess:
    """``dicomnode serve`` as a subprocess."""

    proc: subprocess.Popen
    config: Path
    port: int
    log: Path
    echo_calling: str = "ECHOSCU"
    _fh: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, config: str | Path, port: int, *, log: str | Path | None = None,
              env: dict[str, str] | None = None, timeout: float = 60.0, echo_calling: str = "ECHOSCU",
              wait: bool = True, extra_args: Sequence[str] = ()) -> "NodeProcess":
        """Start the node; wait until it answers C-ECHO from ``echo_calling`` (must be allowed) or
        just until its port accepts connections when ``echo_calling`` is "" ."""
        config = Path(config)
        log = Path(log) if log else config.with_suffix(".log")
        fh = open(log, "ab")
        proc = subprocess.Popen([str(DICOMNODE), "serve", "--config", str(config), *extra_args], stdout=fh,
                                stderr=subprocess.STDOUT, env=peer_env(**(env or {})), cwd=str(config.parent))
        node = cls(proc, config, port, log, echo_calling, fh)
        if wait:
            end = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    node.stop()
                    raise RuntimeError(f"node exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
                try:
                    if echo(port, calling=echo_calling, timeout=2) if echo_calling else _port_open(port):
                        break
                except Exception:
                    pass
                if time.monotonic() > end:
                    node.stop()
                    raise RuntimeError(f"node did not come up on port {port}; log:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        return node

    def status(self) -> dict[str, Any]:
        """``dicomnode status --json`` for this node's config."""
        out = subprocess.run([str(DICOMNODE), "status", "--config", str(self.config), "--json"],
                             capture_output=True, text=True, timeout=60, cwd=str(self.config.parent), check=True)
        return json.loads(out.stdout)

    def kill(self) -> None:
        """SIGKILL now (crash tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        _kill(self.proc, 15.0)
        self._close()

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "NodeProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- dcmtk --------------------------------------------------------------------------------

def storescu(paths: Sequence[str | Path] | str | Path, port: int, *, called: str = "DICOMNODE",
             calling: str = "STORESCU", host: str = "127.0.0.1", extra: Sequence[str] = (),
             timeout: float = 300.0, verbose: bool = True) -> subprocess.CompletedProcess:
    """Run dcmtk ``storescu`` (TCP_NODELAY=1, ``-v``; folders are scanned with ``+sd``)."""
    require_tool("storescu")
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    args = ["storescu", *(["-v"] if verbose else []), "-aet", calling, "-aec", called, *extra]
    if any(Path(p).is_dir() for p in items):
        args += ["+sd", "+r"]
    args += [host, str(port), *map(str, items)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=peer_env())


def acked_files(storescu_output: str) -> list[Path]:
    """Files that storescu ``-v`` reports as answered with Success (Warning counts too)."""
    acked: list[Path] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response" in line and current:
            if "(Success)" in line or "Warning" in line:
                acked.append(Path(current))
            current = None
    return acked


@dataclass
class StoreSCP:
    """dcmtk ``storescp`` writing into ``outdir``."""

    proc: subprocess.Popen
    port: int
    outdir: Path
    ae_title: str

    @classmethod
    def start(cls, outdir: str | Path, ae_title: str = "STORESCP", extra: Sequence[str] = ()) -> "StoreSCP":
        """Start it on a free port; waits until the port accepts connections."""
        require_tool("storescp")
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = subprocess.Popen(["storescp", "-aet", ae_title, "-od", str(outdir), *extra, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=peer_env())
        scp = cls(proc, port, outdir, ae_title)
        if not wait_for(lambda: _port_open(port), 15):
            scp.stop()
            raise RuntimeError("storescp did not start")
        return scp

    def stop(self) -> None:
        """Stop by PID."""
        _kill(self.proc, 5.0)

    def __enter__(self) -> "StoreSCP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- Orthanc ------------------------------------------------------------------------------

@dataclass
class Orthanc:
    """A throw-away Orthanc (DICOM + REST on free ports, storage in ``workdir``)."""

    proc: subprocess.Popen
    dicom_port: int
    http_port: int
    ae_title: str
    workdir: Path

    @classmethod
    def start(cls, workdir: str | Path, modalities: dict[str, tuple[str, str, int]] | None = None,
              ae_title: str = "ORTHANC", extra: dict[str, Any] | None = None, timeout: float = 60.0) -> "Orthanc":
        """Start Orthanc with ``DicomModalities`` = ``modalities`` (name -> (AE, host, port))."""
        require_tool("Orthanc")
        workdir = Path(workdir)
        (workdir / "db").mkdir(parents=True, exist_ok=True)
        dicom_port, http_port = free_port(), free_port()
        cfg: dict[str, Any] = {
            "Name": "test-pacs", "DicomAet": ae_title, "DicomPort": dicom_port, "HttpPort": http_port,
            "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "Plugins": [], "StorageCompression": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomScuTimeout": 30, "HttpTimeout": 60, "ConcurrentJobs": 2, "StableAge": 60,
            "SaveJobs": False, "LogExportedResources": False,
        }
        cfg.update(extra or {})
        conf = workdir / "orthanc.json"
        conf.write_text(json.dumps(cfg, indent=1))
        log = open(workdir / "orthanc.log", "ab")
        proc = subprocess.Popen(["Orthanc", str(conf)], stdout=log, stderr=subprocess.STDOUT, env=peer_env(),
                                cwd=str(workdir))
        log.close()
        o = cls(proc, dicom_port, http_port, ae_title, workdir)
        if not wait_for(lambda: o.rest("GET", "/system") is not None, timeout, 0.2):
            o.stop()
            raise RuntimeError("Orthanc did not start: " + (workdir / "orthanc.log").read_text()[-2000:])
        return o

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 300.0) -> Any:
        """Call the REST API; JSON in (dict/list) or raw bytes, JSON (or bytes) out. Raises on HTTP errors."""
        data = body if isinstance(body, (bytes, bytearray)) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def upload(self, files: Iterable[str | Path]) -> list[str]:
        """POST each file to /instances; returns the Orthanc instance ids."""
        return [self.rest("POST", "/instances", Path(f).read_bytes())["ID"] for f in files]

    def push(self, modality: str, resources: list[str], synchronous: bool = True) -> Any:
        """``POST /modalities/<modality>/store`` (C-STORE from Orthanc to that modality)."""
        return self.rest("POST", f"/modalities/{modality}/store",
                         {"Resources": resources, "Synchronous": synchronous})

    def stop(self) -> None:
        """Stop by PID."""
        _kill(self.proc, 15.0)

    def __enter__(self) -> "Orthanc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # tiny manual check: python tests/peers.py OUTDIR
    info = make_ct_series(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ct", n=5)
    print(info.folder, len(info.files))
