"""Typed, validated configuration: one TOML file, passed explicitly, unknown keys rejected.

``load_config(path)`` returns a frozen :class:`Config` or raises :class:`ConfigError` listing every
problem found (not just the first). This is the only module that reads the environment
(``secret()``), and only for variables whose *names* the config gives.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicomnode.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The node's own identity and listening socket."""

    ae_title: str = "DICOMNODE"
    port: int = 11112
    data_dir: str = "var"  # spool, database, logs, results
    bind_address: str = "127.0.0.1"
    max_pdu: int = 4_194_304  # bytes; large PDUs cut per-PDU overhead
    max_associations: int = 16
    network_timeout_s: float = 60.0
    quota_bytes: int = 0  # 0: no quota; spool size above which C-STORE answers 0xA700
    min_free_bytes: int = 512 * 1024 * 1024  # free disk kept in reserve
    fsync: bool = True  # durable ingest (fsync file + directory before the ack); false only for benchmarks
    scp_engine: Literal["fast", "pynetdicom"] = "fast"  # DICOM upper layer of the Storage SCP
    max_instance_bytes: int = 2 * 1024**3  # larger data sets abort the association (memory bound)
    require_known_callers: bool = True  # reject calling AEs not in [[peers]] with may_send
    check_caller_host: bool = False  # also require the peer's host to match
    workers: int = 1  # concurrent pipeline runs
    log_level: str = "INFO"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A DICOM application entity the node talks to."""

    name: str
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    may_send: bool = False  # may C-STORE to the node
    receives_results: bool = False  # SEG/SR go here
    tls: bool = False  # use TLS when the node sends to this peer


@dataclass(frozen=True, slots=True)
class CompletionConfig:
    """When a series counts as complete."""

    quiet_period_s: float = 10.0
    max_wait_s: float = 600.0


@dataclass(frozen=True, slots=True)
class TritonConfig:
    """Where inference runs. ``url = "local"`` starts the project's own server."""

    url: str = "local"  # or "host:port" of a running server (HTTP port, or gRPC with protocol=grpc)
    protocol: Literal["http", "grpc"] = "http"
    shared_memory: Literal["auto", "off"] = "auto"
    models_dir: str = "triton_models"
    http_port: int = 0  # local server: 0 picks a free port
    grpc_port: int = 0
    timeout_s: float = 120.0
    retries: int = 3
    venv_dir: str = ".venv-triton"


@dataclass(frozen=True, slots=True)
class GeometryConfig:
    """Policies for stacks that are not a plain regular grid."""

    spacing_tolerance_mm: float = 0.05
    on_tilt: Literal["resample", "refuse"] = "resample"
    on_nonuniform: Literal["resample", "refuse"] = "resample"
    on_gap: Literal["refuse", "resample"] = "refuse"
    multiple_stacks: Literal["largest", "refuse"] = "refuse"
    tilt_tolerance_deg: float = 0.05  # steeper shear between slices counts as gantry tilt
    orientation_tolerance: float = 1e-4  # direction cosines closer than this are one orientation
    max_voxels: int = 1_000_000_000  # larger stacks are refused ("too_large") before allocation


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """DICOM TLS for the SCP (and for sending to peers with ``tls = true``)."""

    enabled: bool = False
    require: bool = True  # when enabled, plain connections are refused
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # verify peers against this CA when set
    key_password_env: str = ""  # name of an environment variable holding the key password


@dataclass(frozen=True, slots=True)
class WebConfig:
    """Status page + JSON API and Prometheus metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 9108
    token_env: str = ""  # name of an environment variable holding a bearer token


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """Durable result dispatch."""

    backoff_base_s: float = 2.0
    backoff_max_s: float = 600.0
    max_age_s: float = 7 * 24 * 3600.0  # transient failures older than this are dead-lettered
    timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ResultsConfig:
    """What the node writes back."""

    seg_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    seg_series_number: int = 9901
    seg_series_description: str = "dicomnode segmentation"
    sr_series_number: int = 9902
    sr_series_description: str = "dicomnode region report"
    sr_on_quarantine: bool = True
    write_dir: str = ""  # also write results here (relative to data_dir); "" = "results" when no peer receives
    manufacturer: str = "dicomnode"
    seg_content_label: str = "DICOMNODE"  # SEG ContentLabel (CS: upper case, <= 16 characters)
    device_serial_number: str = "1"  # DeviceSerialNumber written into SEG/SR
    quarantine_sr_title: str = "dicomnode: series not processed"  # text of the quarantine SR finding


@dataclass(frozen=True, slots=True)
class AnatomyConfig:
    """CTARR registration and orientation handling."""

    correct_orientation: bool = True  # process in the anatomically correct orientation
    # decide the orientation from anatomy19 run on the 8 turns of the scan (anatomy/turns.py; 8 model
    # runs); false: one run, the header orientation is trusted and reported as not verified
    check_orientation: bool = True
    regions_dir: str = "config/regions"
    atlas_file: str = "config/atlas/atlas19.npz"


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """What runs for which series; the first matching pipeline wins."""

    name: str
    modalities: tuple[str, ...] = ("CT",)
    body_parts: tuple[str, ...] = ()  # empty: any
    description_regex: str = ""  # empty: any
    models: tuple[str, ...] = ("body",)
    regions: tuple[str, ...] = ()
    region_models: tuple[str, ...] = ()  # "region:model", e.g. "liver:liver"
    destinations: tuple[str, ...] = ()  # peer names; empty: every peer with receives_results


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """PHI-free logging."""

    hash_key_env: str = ""  # env var with the key for hashing series UIDs in logs; else a per-install key
    file: str = "logs/dicomnode.log"  # relative to data_dir


@dataclass(frozen=True, slots=True)
class Config:
    """The whole node configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    peers: tuple[PeerConfig, ...] = ()
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)
    pipelines: tuple[PipelineConfig, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    base_dir: str = "."  # working directory at load time; relative data paths resolve against it

    # ---- derived paths -------------------------------------------------------------------
    def path(self, value: str) -> Path:
        """Resolve a data path (``data_dir``, certificates) against the working directory at load."""
        p = Path(value)
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def resource(self, value: str) -> Path:
        """Resolve a shipped resource (models, regions, atlas): absolute, else the project root."""
        p = Path(value)
        return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()

    @property
    def data_dir(self) -> Path:
        """The data directory (spool, database, logs, results)."""
        return self.path(self.node.data_dir)

    def peer(self, name: str) -> PeerConfig:
        """The peer called ``name``; raises KeyError if there is none."""
        for p in self.peers:
            if p.name == name:
                return p
        raise KeyError(name)

    def secret(self, env_name: str) -> str | None:
        """The value of the environment variable ``env_name`` named in the config (or None)."""
        return os.environ.get(env_name) if env_name else None


# ---- loading and validation --------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            problems.append(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return None
        return _convert(value, non_none[0], where, problems)
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{where}: must be a list")
            return ()
        item_tp = args[0]
        return tuple(_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: must be a table")
            return None
        return _build(tp, value, where, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: must be a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: must be a string, got {value!r}")
        return value
    problems.append(f"{where}: unsupported type {_type_name(tp)}")
    return value


def _build(cls: Any, table: dict[str, Any], where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key in table:
        if key not in fields or key == "base_dir":
            known = ", ".join(k for k in fields if k != "base_dir")
            problems.append(f"{where + '.' if where else ''}{key}: unknown key (known: {known})")
    for name, f in fields.items():
        if name == "base_dir":
            continue
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], f"{where + '.' if where else ''}{name}", problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            problems.append(f"{where + '.' if where else ''}{name}: required")
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def _semantic_checks(cfg: Config, problems: list[str]) -> None:
    n = cfg.node
    if not AE_RE.match(n.ae_title) or n.ae_title.strip() != n.ae_title:
        problems.append("node.ae_title: 1-16 printable ASCII characters, no backslash, no padding")
    for key, port in (("node.port", n.port), ("web.port", cfg.web.port), ("web.metrics_port", cfg.web.metrics_port)):
        if not 0 <= port <= 65535:
            problems.append(f"{key}: must be 0-65535")
    if n.max_pdu < 0 or (0 < n.max_pdu < 4096):
        problems.append("node.max_pdu: 0 (unlimited) or at least 4096")
    if n.workers < 1:
        problems.append("node.workers: at least 1")
    if n.quota_bytes < 0 or n.min_free_bytes < 0:
        problems.append("node.quota_bytes / node.min_free_bytes: must not be negative")
    names: set[str] = set()
    for i, p in enumerate(cfg.peers):
        if p.name in names:
            problems.append(f"peers[{i}].name: duplicate peer name {p.name!r}")
        names.add(p.name)
        if not AE_RE.match(p.ae_title) or p.ae_title.strip() != p.ae_title:
            problems.append(f"peers[{i}].ae_title: 1-16 printable ASCII characters")
        if not 1 <= p.port <= 65535:
            problems.append(f"peers[{i}].port: must be 1-65535")
    c = cfg.completion
    if c.quiet_period_s <= 0 or c.max_wait_s <= 0:
        problems.append("completion: quiet_period_s and max_wait_s must be positive")
    elif c.max_wait_s < c.quiet_period_s:
        problems.append("completion.max_wait_s: must be at least quiet_period_s")
    r = cfg.results
    if not re.match(r"^[A-Z0-9_ ]{1,16}$", r.seg_content_label):
        problems.append("results.seg_content_label: 1-16 upper-case letters, digits, '_' or space (DICOM CS)")
    for key, number in (("results.seg_series_number", r.seg_series_number), ("results.sr_series_number", r.sr_series_number)):
        if not 0 <= number <= 2**31 - 1:
            problems.append(f"{key}: must be 0..2147483647")
    t = cfg.triton
    if t.url != "local" and not re.match(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", t.url):
        problems.append('triton.url: "local" or "host:port"')
    if t.retries < 0 or t.timeout_s <= 0:
        problems.append("triton: retries >= 0 and timeout_s > 0")
    if cfg.tls.enabled and not (cfg.tls.cert_file and cfg.tls.key_file):
        problems.append("tls: cert_file and key_file are required when enabled")
    for i, pl in enumerate(cfg.pipelines):
        for dest in pl.destinations:
            if dest not in names:
                problems.append(f"pipelines[{i}].destinations: unknown peer {dest!r}")
        if pl.description_regex:
            try:
                re.compile(pl.description_regex)
            except re.error as exc:
                problems.append(f"pipelines[{i}].description_regex: {exc}")
        for rm in pl.region_models:
            if rm.count(":") != 1:
                problems.append(f"pipelines[{i}].region_models: entries are 'region:model', got {rm!r}")


def parse_config(data: dict[str, Any], base_dir: str | Path | None = None) -> Config:
    """Build a Config from a parsed TOML table; raises ConfigError naming every problem."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if cfg is not None and not problems:
        _semantic_checks(cfg, problems)
    if problems or cfg is None:
        raise ConfigError(problems or ["invalid configuration"])
    return dataclasses.replace(cfg, base_dir=str(Path(base_dir or os.getcwd()).resolve()))


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at ``path``; raises ConfigError naming every problem."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError([f"{p}: file not found"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from exc
    return parse_config(data)


def with_overrides(cfg: Config, *, port: int | None = None, data_dir: str | None = None) -> Config:
    """A copy of ``cfg`` with command-line overrides applied."""
    node = cfg.node
    if port is not None:
        node = dataclasses.replace(node, port=port)
    if data_dir is not None:
        node = dataclasses.replace(node, data_dir=str(Path(data_dir).resolve()))
    return dataclasses.replace(cfg, node=node)
