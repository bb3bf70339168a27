"""Which pipeline runs for a series, and which models the node needs at startup.

``select_pipeline`` matches a series' modality, body part and series description against the
``[[pipelines]]`` of the config (first match wins). ``required_models`` is every model any pipeline
names (its ``models`` and the model half of each ``region_models`` entry); ``check_model_repository``
fails startup with :class:`ModelContractError` when one of them has no manifest in the model
repository - a configured model is never silently skipped, and a model that is not configured is
never run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Config, PipelineConfig
from dicomnode.errors import ModelContractError


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """The header facts pipeline selection looks at (never logged: the description may be PHI)."""

    modality: str
    body_part: str = ""
    description: str = ""


def select_pipeline(pipelines: tuple[PipelineConfig, ...], facts: SeriesFacts) -> PipelineConfig | None:
    """The first pipeline matching ``facts``, or None.

    A pipeline matches when the modality is one of its ``modalities``, the body part is one of its
    ``body_parts`` (when it names any; compared case-insensitively, an absent body part never
    matches a non-empty list) and ``description_regex`` (when set) is found in the series
    description (case-insensitive ``re.search``).
    """
    modality = facts.modality.strip().upper()
    body = facts.body_part.strip().upper()
    for pl in pipelines:
        if modality not in {m.upper() for m in pl.modalities}:
            continue
        if pl.body_parts and body not in {b.upper() for b in pl.body_parts}:
            continue
        if pl.description_regex and not re.search(pl.description_regex, facts.description, re.IGNORECASE):
            continue
        return pl
    return None


def region_model_pairs(pl: PipelineConfig) -> tuple[tuple[str, str], ...]:
    """``region_models`` as (region, model) pairs (the config has already checked the syntax)."""
    return tuple((rm.split(":", 1)[0], rm.split(":", 1)[1]) for rm in pl.region_models)


def pipeline_models(pl: PipelineConfig) -> tuple[str, ...]:
    """Every model ``pl`` runs: its whole-volume models, then its region models (no duplicates)."""
    out: list[str] = []
    for m in (*pl.models, *(model for _, model in region_model_pairs(pl))):
        if m not in out:
            out.append(m)
    return tuple(out)


def required_models(cfg: Config) -> tuple[str, ...]:
    """Every model named by any pipeline, in first-mention order."""
    out: list[str] = []
    for pl in cfg.pipelines:
        for m in pipeline_models(pl):
            if m not in out:
                out.append(m)
    return tuple(out)


def check_pipelines(cfg: Config) -> None:
    """Structural checks between pipelines and the anatomy stage; raises ModelContractError.

    Regions can only be cropped from a CTARR registration, which needs the ``anatomy19`` model;
    a region model needs its region listed in ``regions``.
    """
    for pl in cfg.pipelines:
        if pl.regions and "anatomy19" not in pl.models:
            raise ModelContractError(f"pipeline {pl.name}: regions need the anatomy19 model in models")
        for region, _ in region_model_pairs(pl):
            if region not in pl.regions:
                raise ModelContractError(f"pipeline {pl.name}: region model for {region!r}, which is not in regions")


def check_model_repository(cfg: Config, models_dir: Path | None = None) -> tuple[str, ...]:
    """Check every configured model has ``<models_dir>/<model>/labels.json``; returns the models.

    Raises ModelContractError naming every missing model (the node must not start without them).
    """
    check_pipelines(cfg)
    root = models_dir if models_dir is not None else cfg.resource(cfg.triton.models_dir)
    models = required_models(cfg)
    missing = [m for m in models if not (root / m / "labels.json").is_file()]
    if missing:
        raise ModelContractError(
            f"configured model(s) missing from the model repository {root}: {', '.join(missing)}"
        )
    return models
