"""Pipeline selection from [[pipelines]] and the startup check of configured models."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from dicomnode.config import load_config, parse_config
from dicomnode.errors import ModelContractError
from dicomnode.pipeline_select import (
    SeriesFacts,
    check_model_repository,
    pipeline_models,
    region_model_pairs,
    required_models,
    select_pipeline,
)

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[[peers]]
name = "pacs"
ae_title = "PACS"
port = 4242
receives_results = true

[[peers]]
name = "research"
ae_title = "RESEARCH"
port = 4243

[[pipelines]]
name = "ct-liver-protocol"
modalities = ["CT"]
description_regex = "liver|hepat"
models = ["body", "anatomy19"]
regions = ["liver"]
region_models = ["liver:liver"]
destinations = ["research"]

[[pipelines]]
name = "ct-full"
modalities = ["CT"]
models = ["body", "anatomy19"]
regions = ["liver", "kidneys"]
region_models = ["liver:liver"]

[[pipelines]]
name = "mr-head"
modalities = ["MR"]
body_parts = ["HEAD", "BRAIN"]
models = ["body", "face_area"]

[[pipelines]]
name = "mr-body"
modalities = ["MR"]
models = ["body"]
"""


@pytest.fixture()
def cfg():  # type: ignore[no-untyped-def]
    return parse_config(tomllib.loads(CONFIG))


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (SeriesFacts("CT", "ABDOMEN", "Liver 3-phase"), "ct-liver-protocol"),
        (SeriesFacts("CT", "", "arterial HEPATIC phase"), "ct-liver-protocol"),  # regex is case-insensitive
        (SeriesFacts("CT", "CHEST", "Thorax 1mm"), "ct-full"),
        (SeriesFacts("ct", "", ""), "ct-full"),  # modality compared case-insensitively
        (SeriesFacts("MR", "head", "T1 MPRAGE"), "mr-head"),
        (SeriesFacts("MR", "BRAIN", ""), "mr-head"),
        (SeriesFacts("MR", "ABDOMEN", "T2 HASTE"), "mr-body"),
        (SeriesFacts("MR", "", ""), "mr-body"),  # no body part never matches a body_parts list
        (SeriesFacts("PT", "WHOLEBODY", ""), None),
        (SeriesFacts("", "", ""), None),
    ],
)
def test_select_pipeline(cfg, facts: SeriesFacts, expected: str | None) -> None:  # type: ignore[no-untyped-def]
    pl = select_pipeline(cfg.pipelines, facts)
    assert (pl.name if pl else None) == expected


def test_first_match_wins_and_destinations_come_along(cfg) -> None:  # type: ignore[no-untyped-def]
    pl = select_pipeline(cfg.pipelines, SeriesFacts("CT", "", "liver"))
    assert pl is not None and pl.destinations == ("research",)
    reordered = parse_config({**tomllib.loads(CONFIG), "pipelines": tomllib.loads(CONFIG)["pipelines"][::-1]})
    pl2 = select_pipeline(reordered.pipelines, SeriesFacts("CT", "", "liver"))
    assert pl2 is not None and pl2.name == "ct-full"


def test_models_per_pipeline_and_required(cfg) -> None:  # type: ignore[no-untyped-def]
    ct = select_pipeline(cfg.pipelines, SeriesFacts("CT"))
    head = select_pipeline(cfg.pipelines, SeriesFacts("MR", "HEAD"))
    assert ct is not None and pipeline_models(ct) == ("body", "anatomy19", "liver")
    assert head is not None and pipeline_models(head) == ("body", "face_area")
    assert required_models(cfg) == ("body", "anatomy19", "liver", "face_area")


def _repo(tmp_path: Path, names: list[str]) -> Path:
    for n in names:
        (tmp_path / n).mkdir(parents=True)
        (tmp_path / n / "labels.json").write_text(json.dumps({"name": n}))
    return tmp_path


def test_missing_configured_model_fails_startup(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = _repo(tmp_path, ["body", "anatomy19", "face_area"])
    with pytest.raises(ModelContractError, match="liver"):
        check_model_repository(cfg, repo)
    (repo / "liver").mkdir()
    with pytest.raises(ModelContractError, match="liver"):  # a folder without a manifest is not a model
        check_model_repository(cfg, repo)
    (repo / "liver" / "labels.json").write_text("{}")
    assert check_model_repository(cfg, repo) == ("body", "anatomy19", "liver", "face_area")


def test_regions_need_anatomy19_and_listed_region(tmp_path: Path) -> None:
    base = tomllib.loads(CONFIG)
    no_anatomy = {**base, "pipelines": [{"name": "x", "modalities": ["CT"], "models": ["body"], "regions": ["liver"]}]}
    repo = _repo(tmp_path, ["body", "anatomy19", "liver"])
    with pytest.raises(ModelContractError, match="anatomy19"):
        check_model_repository(parse_config(no_anatomy), repo)
    unlisted = {**base, "pipelines": [{"name": "y", "modalities": ["CT"], "models": ["body", "anatomy19"],
                                       "regions": ["kidneys"], "region_models": ["liver:liver"]}]}
    with pytest.raises(ModelContractError, match="liver"):
        check_model_repository(parse_config(unlisted), repo)


def test_embedded_default_config_pipelines() -> None:
    cfg = load_config(ROOT / "config" / "node.toml")
    ct = select_pipeline(cfg.pipelines, SeriesFacts("CT", "ABDOMEN", ""))
    mr = select_pipeline(cfg.pipelines, SeriesFacts("MR", "ABDOMEN", ""))
    assert ct is not None and {"body", "anatomy19"} <= set(ct.models) and ct.regions
    assert ("liver", "liver") in region_model_pairs(ct)  # the liver model runs on the liver crop
    assert mr is not None and mr.models[0] == "body" and "anatomy19" not in mr.models
    head = select_pipeline(cfg.pipelines, SeriesFacts("MR", "HEAD", ""))
    assert head is not None and head.name == "mr-head" and head.models == ("body", "face_area")
    assert select_pipeline(cfg.pipelines, SeriesFacts("MR", "BRAIN", "")).name == "mr-head"  # type: ignore[union-attr]
    assert mr.name == "mr-body"  # an MR abdomen does not get the face model
    unnamed = select_pipeline(cfg.pipelines, SeriesFacts("MR", "", "T1 MPRAGE Brain sag"))
    assert unnamed is not None and "face_area" in unnamed.models  # no body part: the description decides
    assert select_pipeline(cfg.pipelines, SeriesFacts("MR", "", "t2 haste liver")).name == "mr-body"  # type: ignore[union-attr]
    # the embedded default must start: every model it configures is in the shipped repository
    check_model_repository(cfg, ROOT / "triton_models")
