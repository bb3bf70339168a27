"""The records the store hands out: frozen dataclasses, never dicts.

* :class:`InstanceMeta` - what the SCP parsed from one instance at receipt (header only).
* :class:`SeriesRecord` - one series and its state.
* :class:`Job` - one durable unit of processing (one per completed series).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SeriesState = Literal["receiving", "complete", "processing", "done", "quarantined", "failed"]
JobState = Literal["queued", "processing", "done", "quarantined", "failed", "superseded"]

SERIES_STATES: tuple[str, ...] = ("receiving", "complete", "processing", "done", "quarantined", "failed")
JOB_STATES: tuple[str, ...] = ("queued", "processing", "done", "quarantined", "failed", "superseded")
#: States a job may be finished with (``finish_job``); ``queued`` puts it back for a later retry.
FINAL_JOB_STATES: tuple[str, ...] = ("done", "quarantined", "failed", "queued")


@dataclass(frozen=True, slots=True)
class InstanceMeta:
    """One stored instance, parsed once at receipt from the header (never the pixel data).

    ``path`` is relative to the spool root (``Spool.root``); ``position`` is Image Position
    (Patient) and ``orientation`` Image Orientation (Patient) (6 direction cosines), both None
    when the instance has none (e.g. enhanced multi-frame objects keep them per frame).
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    path: str
    size_bytes: int
    instance_number: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    frames: int = 1
    frame_of_reference_uid: str = ""
    calling_ae: str = ""
    association_id: str = ""
    received_at: float = 0.0


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    """A series the node holds. ``generation`` grows each time new instances re-open the series."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    state: str
    instance_count: int
    bytes: int
    first_received_at: float
    last_received_at: float
    released_at: float | None  # when the last sending association was released (None: not yet)
    completed_at: float | None
    completion_reason: str  # released-contiguous | quiet-period | max-wait | ""
    generation: int
    last_association_id: str
    calling_ae: str


@dataclass(frozen=True, slots=True)
class Job:
    """One durable unit of work: process ``series_instance_uid`` as of ``generation``."""

    job_id: int
    series_instance_uid: str
    study_instance_uid: str
    generation: int
    state: str
    attempts: int
    created_at: float
    claimed_at: float | None
    finished_at: float | None
    worker: str
    reason: str
    timings_json: str
    not_before: float = 0.0
