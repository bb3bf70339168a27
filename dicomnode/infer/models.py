"""Model manifests (labels, codes, colours, input contract) and the ``Prediction`` object.

A manifest lives next to each model in the Triton repository as ``labels.json``; the node reads
it at startup and checks it against the server's model metadata (``ModelContractError``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ModelContractError
from dicomnode.volume import Volume


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept (e.g. SNOMED CT: scheme "SCT")."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class LabelInfo:
    """One output label of a model."""

    value: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]  # display colour, sRGB 0-255


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """The contract of one served model.

    ``windows``: one (low, high) HU/intensity window per input channel, clipped and scaled to
    [0, 1]; ``normalisation`` "window" or "zscore" (z-score per volume, for MR).
    """

    name: str
    version: str
    modalities: tuple[str, ...]
    spacing_mm: tuple[float, float, float]  # (slice, row, column) spacing the model expects
    windows: tuple[tuple[float, float], ...]
    normalisation: str
    patch: tuple[int, int, int]
    input_name: str
    output_name: str
    labels: tuple[LabelInfo, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    pad_multiple: int = 1  # every input dim is padded to a multiple of this
    overlap: float = 0.5  # sliding-window overlap, fraction of the patch
    output_kind: str = "logits"  # "logits" or "probabilities" (channel 0 = background)
    normalisation_by_modality: tuple[tuple[str, str], ...] = ()  # e.g. (("MR", "zscore"),)
    largest_component: tuple[int, ...] = ()  # labels kept to their largest 26-connected component
    fill_holes: tuple[int, ...] = ()  # labels whose background holes are filled per axial slice

    @property
    def n_channels(self) -> int:
        """Number of input channels."""
        return len(self.windows) if self.normalisation == "window" else 1

    def normalisation_for(self, modality: str) -> str:
        """The normalisation ("window" or "zscore") for images of ``modality``."""
        return dict(self.normalisation_by_modality).get(modality, self.normalisation)

    @property
    def n_classes(self) -> int:
        """Number of output channels (background + labels)."""
        return len(self.labels) + 1


def _code(d: dict[str, Any]) -> Code:
    return Code(value=str(d["value"]), scheme=str(d["scheme"]), meaning=str(d["meaning"]))


def _checked(m: ModelManifest) -> ModelManifest:
    """Raise ValueError when the manifest is inconsistent in itself."""
    norms = {m.normalisation, *(v for _, v in m.normalisation_by_modality)}
    if not norms <= {"window", "zscore"}:
        raise ValueError(f"normalisation must be 'window' or 'zscore', got {sorted(norms)}")
    if "window" in norms and (not m.windows or any(hi <= lo for lo, hi in m.windows)):
        raise ValueError("'window' normalisation needs windows with low < high")
    if "zscore" in norms and m.n_channels != 1:
        raise ValueError("'zscore' normalisation has one channel, so at most one window")
    if m.output_kind not in ("logits", "probabilities"):
        raise ValueError("output_kind must be 'logits' or 'probabilities'")
    if len(m.spacing_mm) != 3 or min(m.spacing_mm) <= 0 or len(m.patch) != 3 or min(m.patch) < 1:
        raise ValueError("spacing_mm and patch need 3 positive values")
    if m.pad_multiple < 1 or not 0.0 <= m.overlap < 1.0:
        raise ValueError("pad_multiple >= 1 and 0 <= overlap < 1")
    if sorted(l.value for l in m.labels) != list(range(1, len(m.labels) + 1)):
        raise ValueError("label values must be 1..K without gaps (0 is background)")
    for step, named in (("largest_component", m.largest_component), ("fill_holes", m.fill_holes)):
        if not set(named) <= {l.value for l in m.labels}:
            raise ValueError(f"{step} names a label value the model does not have")
    return m


def load_manifest(path: str | Path) -> ModelManifest:
    """Read ``labels.json``; raises ModelContractError when it is missing or malformed."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        labels = tuple(
            LabelInfo(
                value=int(l["value"]), name=str(l["name"]), category=_code(l["category"]),
                type=_code(l["type"]), color=tuple(int(c) for c in l["color"]),  # type: ignore[arg-type]
            )
            for l in d["labels"]
        )
        return _checked(ModelManifest(
            name=str(d["name"]), version=str(d["version"]), modalities=tuple(d["modalities"]),
            spacing_mm=tuple(float(s) for s in d["spacing_mm"]),  # type: ignore[arg-type]
            windows=tuple((float(a), float(b)) for a, b in d.get("windows", [])),
            normalisation=str(d.get("normalisation", "window")),
            patch=tuple(int(s) for s in d["patch"]),  # type: ignore[arg-type]
            input_name=str(d.get("input_name", "INPUT")), output_name=str(d.get("output_name", "OUTPUT")),
            labels=labels, description=str(d.get("description", "")), extra=dict(d.get("extra", {})),
            pad_multiple=int(d.get("pad_multiple", 1)), overlap=float(d.get("overlap", 0.5)),
            output_kind=str(d.get("output_kind", "logits")),
            normalisation_by_modality=tuple(
                (str(k), str(v)) for k, v in sorted(dict(d.get("normalisation_by_modality", {})).items())
            ),
            largest_component=tuple(int(v) for v in d.get("largest_component", [])),
            fill_holes=tuple(int(v) for v in d.get("fill_holes", [])),
        ))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ModelContractError(f"manifest {p.name} of {p.parent.name}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Prediction:
    """A label map on a Volume's grid (``labels.array`` integer values = manifest label values)."""

    labels: Volume
    manifest: ModelManifest
    probabilities: np.ndarray | None = None  # optional (C, slice, row, column) softmax on the same grid
