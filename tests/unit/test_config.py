"""The config contract: the issue's keys load, unknown keys and bad values are named, overrides apply."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dicomnode.config import PROJECT_ROOT, load_config, parse_config, with_overrides
from dicomnode.errors import ConfigError

CONTRACT = """
[node]
ae_title = "DICOMNODE"
port = 11112
data_dir = "var"
[[peers]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
may_send = true
receives_results = true
[completion]
quiet_period_s = 10
max_wait_s = 600
[triton]
url = "local"
"""


def test_contract_keys_load(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(CONTRACT)
    cfg = load_config(f)
    assert cfg.node.ae_title == "DICOMNODE" and cfg.node.port == 11112
    assert cfg.data_dir == (tmp_path.cwd() / "var").resolve()
    pacs = cfg.peer("pacs")
    assert (pacs.ae_title, pacs.host, pacs.port, pacs.may_send, pacs.receives_results) == \
        ("ORTHANC", "127.0.0.1", 4242, True, True)
    assert cfg.completion.quiet_period_s == 10.0 and isinstance(cfg.completion.quiet_period_s, float)
    assert cfg.triton.url == "local"


def test_embedded_default_is_valid() -> None:
    cfg = load_config(PROJECT_ROOT / "config" / "node.toml")
    assert cfg.node.ae_title == "DICOMNODE"
    assert any(p.may_send for p in cfg.peers)


def test_every_problem_is_named() -> None:
    data = {
        "node": {"ae_title": "WAY_TOO_LONG_AE_TITLE_X", "port": 70000, "colour": "blue"},
        "peers": [{"name": "a", "ae_title": "A", "port": 0}, {"name": "a", "ae_title": "B", "port": 104}],
        "completion": {"quiet_period_s": 20, "max_wait_s": 5},
        "bogus": {},
    }
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    text = "\n".join(ei.value.problems)
    assert "node.colour: unknown key" in text
    assert "bogus: unknown key" in text
    # semantic problems are reported once the structure is valid
    data2 = {k: v for k, v in data.items() if k != "bogus"}
    data2["node"] = {"ae_title": "WAY_TOO_LONG_AE_TITLE_X", "port": 70000}
    with pytest.raises(ConfigError) as ei2:
        parse_config(data2)
    text2 = "\n".join(ei2.value.problems)
    for needle in ("node.ae_title", "node.port", "peers[0].port", "duplicate peer name", "completion.max_wait_s"):
        assert needle in text2, needle


def test_wrong_types_are_named() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"node": {"port": "11112", "fsync": "yes"}, "peers": [{"name": "x"}]})
    text = "\n".join(ei.value.problems)
    assert "node.port: must be an integer" in text
    assert "node.fsync: must be true or false" in text
    assert "peers[0].ae_title: required" in text


def test_overrides() -> None:
    cfg = with_overrides(parse_config({}), port=4000, data_dir="/tmp/x-data")
    assert cfg.node.port == 4000 and cfg.data_dir == Path("/tmp/x-data")


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(CONTRACT)
    bad = tmp_path / "bad.toml"
    bad.write_text(CONTRACT.replace('port = 11112', 'port = 11112\nportt = 1').replace("max_wait_s = 600", "max_wait_s = -1"))
    exe = str(PROJECT_ROOT / ".venv" / "bin" / "dicomnode")
    ok = subprocess.run([exe, "check-config", str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    ko = subprocess.run([exe, "check-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert ko.returncode == 1
    assert "node.portt: unknown key" in ko.stderr
