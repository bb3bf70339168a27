"""``run_series``: the whole flow for one series, top to bottom (DESIGN.md "The flow").

    headers -> pick pipeline -> convert -> header orientation (canonical grid)
    -> Triton body (+ anatomy19) -> CTARR registration + orientation check (+ correction)
    -> region crops -> region models on the crops -> paste back -> SEG + SR -> deliver (outbox)

This is one of the three places where exceptions become outcomes (DESIGN.md "Errors"):

- ``SeriesError``    -> ``quarantined`` with its machine-readable reason (+ an SR stating the reason
                        when ``results.sr_on_quarantine``);
- ``TransientError`` -> ``retry``: the job goes back to the queue with exponential backoff, never lost;
- anything else      -> ``failed`` as ``internal:<ExceptionType>`` with the traceback in the job record.

Everything the flow needs (config, inference client, atlas, regions, where instances are and where
results go) comes in a :class:`PipelineContext`; the node (``worker.py``) and the offline
``dicomnode process`` command build different contexts around the same function.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from dicomnode.config import Config, PipelineConfig
from dicomnode.errors import SeriesError, TransientError
from dicomnode.ops.logs import series_key
from dicomnode.pipeline_select import SeriesFacts, region_model_pairs, select_pipeline
from dicomnode.store.records import Job
from dicomnode.volume import Volume, to_source_grid

log = logging.getLogger(__name__)


# ---- what the flow produces ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RegionSummary:
    """One cropped region: its box in source-grid voxels (slice, row, column), lower inclusive."""

    name: str
    lower: tuple[int, int, int]
    upper: tuple[int, int, int]
    model: str = ""


@dataclass(frozen=True, slots=True)
class SegmentSummary:
    """One segment of the SEG: the model it came from and its volume in millilitres."""

    model: str
    label: str
    volume_ml: float
    mean_hu: float | None = None


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """What was found for one series (no patient data): the body of summary.json and of the SR."""

    series_key: str
    pipeline: str
    modality: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    header_orientation: str
    orientation: dict[str, Any]
    regions: tuple[RegionSummary, ...]
    segments: tuple[SegmentSummary, ...]
    qc: dict[str, Any]
    model_versions: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "series_key": self.series_key, "pipeline": self.pipeline, "modality": self.modality,
            "shape": list(self.shape), "spacing_mm": list(self.spacing_mm),
            "header_orientation": self.header_orientation, "orientation": self.orientation,
            "regions": [{"name": r.name, "lower": list(r.lower), "upper": list(r.upper), "model": r.model}
                        for r in self.regions],
            "segments": [{"model": s.model, "label": s.label, "volume_ml": round(s.volume_ml, 3),
                          "mean_hu": None if s.mean_hu is None else round(s.mean_hu, 1)} for s in self.segments],
            "qc": self.qc, "model_versions": self.model_versions,
        }


@dataclass(frozen=True, slots=True)
class ResultObject:
    """One DICOM object produced for a series (``kind`` "seg" or "sr") and where it should go."""

    kind: str
    dataset: Any  # pydicom Dataset (highdicom Segmentation / Comprehensive3DSR)
    destinations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How a job ended: ``state`` is done | quarantined | failed | retry."""

    state: str
    reason: str = ""
    detail: str = ""  # the traceback for internal failures (job record only, never the status page)
    timings: tuple[tuple[str, float], ...] = ()
    summary: SeriesSummary | None = None
    outputs: tuple[str, ...] = ()  # kinds delivered
    compute: tuple[tuple[str, float], ...] = ()  # per inference stage: seconds inside Triton requests

    @property
    def total_s(self) -> float:
        """Sum of the stage timings."""
        return float(sum(t for _, t in self.timings))


# ---- what the flow needs -------------------------------------------------------------------------

class SeriesSource(Protocol):
    """Where a job's instances are."""

    def paths(self, job: Job) -> list[Path]:
        """The files of the job's series (raises SeriesError when there are none)."""


class ResultSink(Protocol):
    """Where results go: the outbox (node) or a folder (``dicomnode process``)."""

    def deliver(self, job: Job, objects: list[ResultObject], summary: SeriesSummary | None) -> None:
        """Hand the objects over durably; raises TransientError when that is not possible now."""


@dataclass(slots=True)
class PipelineContext:
    """Everything ``run_series`` uses; built once by ``app.py`` or ``commands/process.py``."""

    cfg: Config
    client: Any  # dicomnode.infer.client.InferenceClient
    source: SeriesSource
    sink: ResultSink
    atlas: Any = None  # dicomnode.anatomy.atlas.Atlas, loaded when a pipeline uses regions
    regions: dict[str, Any] = field(default_factory=dict)  # name -> dicomnode.anatomy.regions.Region
    progress: Any = None  # optional callable(stage_name) for progress bars


class StageTimer:
    """Records (stage, seconds) pairs in order; ``with timer("convert"): ...``."""

    def __init__(self, progress: Any = None, client: Any = None) -> None:
        self.timings: list[tuple[str, float]] = []
        self.compute: list[tuple[str, float]] = []  # seconds inside Triton requests, per inference stage
        self._progress = progress
        self._client = client

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._progress is not None:
            self._progress(stage)
        take = getattr(self._client, "take_compute_s", None) if stage.startswith("infer:") else None
        if take is not None:
            take()  # reset this thread's counter
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings.append((stage, time.perf_counter() - t0))
            if take is not None:
                self.compute.append((stage, float(take())))

    def split(self, stage: str, part: str, seconds: float) -> None:
        """Move ``seconds`` of the last ``stage`` record into a new ``part`` record (work done
        inside one timed call that belongs to another stage, e.g. the fits of the turns)."""
        for i in range(len(self.timings) - 1, -1, -1):
            if self.timings[i][0] == stage:
                moved = min(max(0.0, seconds), self.timings[i][1])
                self.timings[i] = (stage, self.timings[i][1] - moved)
                self.timings.append((part, moved))
                return


#: Type 2 patient/study attributes highdicom copies from the source into SEG and SR by attribute
#: access; scanners and PACS do omit them, which must not fail the job.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2_defaults(headers: list[Any]) -> list[Any]:
    """The in-memory headers with missing type 2 attributes present and empty (files untouched)."""
    for ds in headers:
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
    return headers


def _facts(headers: list[Any]) -> SeriesFacts:
    first = headers[0]
    return SeriesFacts(
        modality=str(getattr(first, "Modality", "") or ""),
        body_part=str(getattr(first, "BodyPartExamined", "") or ""),
        description=str(getattr(first, "SeriesDescription", "") or ""),
    )


def _segment_summaries(predictions: list[tuple[str, Any]], measured: Any) -> tuple[SegmentSummary, ...]:
    """Per-segment volumes, numbered like the SEG (prediction order, then label value)."""
    names = [(m, info.name) for m, p in predictions for info in sorted(p.manifest.labels, key=lambda l: l.value)]
    return tuple(SegmentSummary(model=m, label=name, volume_ml=float(sm.volume_ml),
                                mean_hu=None if sm.mean_hu is None else float(sm.mean_hu))
                 for (m, name), sm in zip(names, measured))


def _findings(summary: SeriesSummary, measured: Any, grid: Volume) -> Any:
    """The SR's findings from the summary (region boxes are in ``grid``'s voxels)."""
    from dicomnode.results.sr import ModelUsed, OrientationFinding, QcFinding, RegionBox, ReportFindings

    o = summary.orientation
    return ReportFindings(
        segments=tuple(measured),
        regions=tuple(RegionBox.from_voxel_box(r.name, r.lower, r.upper, grid.affine) for r in summary.regions),
        orientation=OrientationFinding(bool(o.get("matches_header", True)), int(o.get("rotation_k", 0)),
                                       bool(o.get("z_flip", False)), bool(o.get("verified", False)))
        if o.get("checked") else None,
        qc=tuple(QcFinding(str(k), bool(v)) for k, v in summary.qc.items() if isinstance(v, bool)),
        models=tuple(ModelUsed(m, v) for m, v in summary.model_versions.items()),
    )


def _source_box(grid: Volume, lower: Any, upper: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A box [lower, upper) of ``grid``'s voxels as the enclosing box of source-grid voxels.

    Goes through the headers' coordinates (``header_affine``), so it also holds for a grid whose
    orientation was corrected from the anatomy.
    """
    assert grid.source_affine is not None and grid.source_shape is not None
    to_source = np.linalg.inv(grid.source_affine) @ grid.header_affine
    lo, hi = np.asarray(lower, float), np.asarray(upper, float) - 1.0  # last voxel inside
    corners = np.array([[c0, c1, c2, 1.0] for c0 in (lo[0], hi[0]) for c1 in (lo[1], hi[1]) for c2 in (lo[2], hi[2])])
    idx = (corners @ to_source.T)[:, :3]
    shape = np.asarray(grid.source_shape)
    a = np.clip(np.floor(idx.min(axis=0) + 1e-6), 0, shape - 1).astype(int)
    b = np.clip(np.ceil(idx.max(axis=0) - 1e-6), 0, shape - 1).astype(int) + 1
    return tuple(int(v) for v in a), tuple(int(v) for v in b)  # type: ignore[return-value]


def _orientation_code(volume: Volume) -> str:
    """Three-letter LPS code of the (slice, row, column) axes, e.g. "SPL" -> axial from feet."""
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    code = ""
    for axis in volume.direction.T:
        i = int(np.argmax(np.abs(axis)))
        code += letters[i][0] if axis[i] > 0 else letters[i][1]
    return code


# ---- the flow ------------------------------------------------------------------------------------

def _anatomy_and_registration(ctx: PipelineContext, cfg: Config, volume: Volume,
                              timer: StageTimer) -> tuple[Any, Any]:
    """(CTARR Registration or None when no anatomy was found, anatomy19 Prediction at 3 mm).

    With ``anatomy.check_orientation`` the model runs on the 8 turns of the scan and the best atlas
    fit decides the orientation (anatomy/turns.py); otherwise it runs once and the header
    orientation is kept, reported as not verified. Raises what the inference client raises.
    """
    from dicomnode.anatomy.register import register
    from dicomnode.anatomy.turns import NoAnatomyError, orientation_by_turns
    from dicomnode.infer import tiling
    from dicomnode.infer.models import Prediction

    if cfg.anatomy.check_orientation:
        manifest = ctx.client.manifest("anatomy19")
        with timer("infer:anatomy19"):  # 8 runs, plus the fixed-orientation fits that score them
            try:
                found = orientation_by_turns(volume, lambda v: ctx.client.segment_native(v, "anatomy19").labels,
                                             ctx.atlas, prepare=lambda v: tiling.to_model_grid(v, manifest))
            except NoAnatomyError as e:  # the header-orientation labels are still reported
                return None, Prediction(labels=e.labels, manifest=manifest)
        timer.split("infer:anatomy19", "register", found.seconds_fit)
        return found.registration, Prediction(labels=found.labels, manifest=manifest)
    with timer("infer:anatomy19"):
        anatomy = ctx.client.segment_native(volume, "anatomy19")
    with timer("register"):
        try:
            reg = register(anatomy.labels, ctx.atlas, orientation=(0, False))
        except ValueError:
            return None, anatomy
    return dataclasses.replace(reg, reason="orientation check off (anatomy.check_orientation): header kept",
                               method="header"), anatomy


def run_series(job: Job, ctx: PipelineContext) -> JobOutcome:
    """Run the configured pipeline on ``job``'s series and deliver SEG + SR; never raises.

    Returns the outcome (done / quarantined / failed / retry) with per-stage timings.
    """
    cfg = ctx.cfg
    key = series_key(job.series_instance_uid)
    timer = StageTimer(ctx.progress, ctx.client)
    headers: list[Any] = []
    pipeline: PipelineConfig | None = None
    try:
        from dicomnode.results.seg import build_seg
        from dicomnode.results.sr import build_sr, measure_predictions
        from dicomnode.series.convert import read_headers, read_series
        from dicomnode.series.geometry import to_canonical

        # 1. which pipeline: modality, body part, description from the headers
        with timer("select"):
            paths = ctx.source.paths(job)
            facts = _facts(read_headers(paths[:1]))
            pipeline = select_pipeline(cfg.pipelines, facts)
            if pipeline is None:
                raise SeriesError("no_pipeline", kind="unsupported",
                                  detail=f"no [[pipelines]] entry matches modality {facts.modality or '?'}")
        # 2. instances -> Volume with checked geometry (every header read alongside, for SEG/SR)
        with timer("convert"), ThreadPoolExecutor(1, thread_name_prefix="headers") as pool:
            pending = pool.submit(read_headers, paths)
            source = read_series(paths, cfg.geometry)
            headers = _with_type2_defaults(pending.result())
        # 3. header orientation: canonical axis order, so every model sees the same layout
        with timer("orient"):
            volume, reorientation = to_canonical(source)
        predictions: list[tuple[str, Any]] = []  # (model, Prediction on `volume`'s grid)
        # 4. CTARR: anatomy19 at its own 3 mm grid -> registration -> orientation check (+ correction)
        orientation: dict[str, Any] = {"checked": False}
        qc: dict[str, Any] = {}
        region_summaries: list[RegionSummary] = []
        reg = anatomy = None
        if "anatomy19" in pipeline.models:
            from dicomnode.anatomy import qc as anatomy_qc
            from dicomnode.anatomy.register import apply_orientation

            reg, anatomy = _anatomy_and_registration(ctx, cfg, volume, timer)
            predictions.append(("anatomy19", anatomy))  # stays at 3 mm; build_seg maps it onto the source
            if reg is None:  # none of the 19 anatomies: no registration, no regions
                qc["anatomy_found"] = False
            else:
                orientation = {
                    "checked": cfg.anatomy.check_orientation, "method": reg.method,
                    "verified": bool(reg.verified), "reason": str(reg.reason),
                    "rotation_k": int(reg.rotation_k), "z_flip": bool(reg.z_flip),
                    "matches_header": not reg.reoriented, "corrected": False,
                    "scale": [round(float(v), 4) for v in reg.scale],
                    "translation_mm": [round(float(v), 2) for v in reg.translation],
                    "residual_mm": None if not np.isfinite(reg.residual) else round(float(reg.residual), 2),
                }
                with timer("qc"):
                    qc.update(anatomy_qc.check(anatomy.labels, reg, ctx.atlas).to_json())
                if reg.reoriented and cfg.anatomy.correct_orientation:
                    # the anatomy disagrees with the header: the models see the anatomically correct
                    # orientation; the corrected volume keeps its way back to the source frames as
                    # their headers describe them (header_transform), so results map back through
                    # to_source_grid like any other (SEG, SR, measurements)
                    with timer("orient:correct"):
                        volume = apply_orientation(volume, reg)
                        reg = reg.corrected()
                    orientation["corrected"] = True
        # 5. whole-volume models (body; face_area for MR heads; ...)
        for model in (m for m in pipeline.models if m != "anatomy19"):
            with timer(f"infer:{model}"):
                predictions.append((model, ctx.client.segment(volume, model)))
        # 6. regions: atlas boxes -> scan boxes -> crops -> region models on the crops -> paste back
        if reg is not None and pipeline.regions:
            from dicomnode.anatomy.regions import crop_region, paste_back

            models_for = dict(region_model_pairs(pipeline))
            for name in pipeline.regions:
                with timer(f"crop:{name}"):
                    try:
                        crop = crop_region(volume, reg, ctx.regions[name], anatomy.labels if anatomy else None)
                    except SeriesError as exc:  # region_outside_image: this scan does not show it
                        qc.setdefault("regions_outside_image", []).append(name)
                        log.info("job %s %s: region %s: %s", job.job_id, key, name, exc.reason)
                        continue
                lower, upper = _source_box(volume, crop.lower, crop.upper)
                region_summaries.append(RegionSummary(name, lower, upper, models_for.get(name, "")))
                if name in models_for:
                    with timer(f"infer:{models_for[name]}"):
                        pred = ctx.client.segment(crop.volume, models_for[name])
                    with timer(f"paste:{name}"):
                        predictions.append((models_for[name], paste_back(pred, volume)))
        # 7. results: SEG (one segment per label, mapped back onto the source frames) + SR
        with timer("results"), ThreadPoolExecutor(1, thread_name_prefix="measure") as pool:
            # every prediction mapped onto the source frames once, for the SEG and the measurements
            preds = [dataclasses.replace(p, labels=to_source_grid(p.labels), probabilities=None) for _, p in predictions]
            measuring = pool.submit(measure_predictions, preds, source)  # volumes + mean HU, alongside the SEG
            seg = build_seg(headers, preds, cfg.results)
            measured = measuring.result()
            summary = SeriesSummary(
                series_key=key, pipeline=pipeline.name, modality=source.modality, shape=source.shape,
                spacing_mm=source.spacing, header_orientation=_orientation_code(source),
                orientation={**orientation, "header_reoriented": not reorientation.is_identity},
                regions=tuple(region_summaries), segments=_segment_summaries(predictions, measured), qc=qc,
                model_versions={m: p.manifest.version for m, p in predictions},
            )
            sr = build_sr(headers, seg, _findings(summary, measured, source), cfg.results)
        # 8. hand over durably (outbox / results folder)
        with timer("deliver"):
            dest = pipeline.destinations
            objects = [ResultObject("seg", seg, dest), ResultObject("sr", sr, dest)]
            ctx.sink.deliver(job, objects, summary)
        log.info("job %s %s: done (%s, %.1f s)", job.job_id, key, pipeline.name, sum(t for _, t in timer.timings))
        return JobOutcome("done", timings=tuple(timer.timings), summary=summary, outputs=("seg", "sr"),
                          compute=tuple(timer.compute))
    except SeriesError as exc:
        log.warning("job %s %s: quarantined: %s:%s", job.job_id, key, exc.kind, exc.reason)
        reason = f"{exc.kind}:{exc.reason}"
        outputs = _quarantine_report(job, ctx, headers, pipeline, exc, timer)
        return JobOutcome("quarantined", reason=reason, detail=exc.detail, timings=tuple(timer.timings),
                          outputs=outputs)
    except TransientError as exc:
        log.warning("job %s %s: transient failure, will retry: %s", job.job_id, key, type(exc).__name__)
        return JobOutcome("retry", reason=f"transient:{exc}"[:500], timings=tuple(timer.timings))
    except Exception as exc:  # noqa: BLE001 - the flow's catch-all: INTERNAL with traceback
        log.error("job %s %s: internal error %s", job.job_id, key, type(exc).__name__)
        return JobOutcome("failed", reason=f"internal:{type(exc).__name__}", detail=traceback.format_exc(),
                          timings=tuple(timer.timings))


def _quarantine_report(job: Job, ctx: PipelineContext, headers: list[Any], pipeline: PipelineConfig | None,
                       exc: SeriesError, timer: StageTimer) -> tuple[str, ...]:
    """Send an SR stating why the series was quarantined, where configured; returns kinds sent.

    Failures here are logged, never raised: the quarantine itself must be recorded.
    """
    if not ctx.cfg.results.sr_on_quarantine:
        return ()
    try:
        from dicomnode.results.sr import ReportFindings, build_sr
        from dicomnode.series.convert import read_headers

        if not headers:  # quarantined before every header was read (selection, conversion)
            headers = _with_type2_defaults(read_headers(ctx.source.paths(job)))

        with timer("quarantine_sr"):
            findings = ReportFindings(quarantine_reason=exc.reason, quarantine_kind=exc.kind)
            sr = build_sr(headers, None, findings, ctx.cfg.results)
            dest = pipeline.destinations if pipeline is not None else ()
            ctx.sink.deliver(job, [ResultObject("sr", sr, dest)], None)
        return ("sr",)
    except Exception as sr_exc:  # noqa: BLE001 - reported, the quarantine stands
        log.error("job %s: quarantine SR not sent: %s", job.job_id, type(sr_exc).__name__)
        return ()
