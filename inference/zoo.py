"""The model zoo: one :class:`ModelSpec` per trained model and its Triton manifest (labels.json).

Label codes are SNOMED CT (scheme "SCT"); category "Anatomical Structure" (91723000, the code the
node's DICOM SEG writer uses); left/right as a ``modifier`` (7771000 Left, 24028007 Right).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inference.phantom import CTARR_NAMES

CATEGORY = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
LEFT = {"value": "7771000", "scheme": "SCT", "meaning": "Left"}
RIGHT = {"value": "24028007", "scheme": "SCT", "meaning": "Right"}
CT_WINDOWS = ((-500.0, 1300.0), (-1024.0, 150.0), (-150.0, 250.0))  # bone, lung, soft tissue

# name -> (SCT code, meaning, laterality or None, colour)
_CTARR_CODES: dict[str, tuple[str, str, dict | None, tuple[int, int, int]]] = {
    "skull": ("89546000", "Bone structure of cranium", None, (241, 214, 145)),
    "cervical_vertebrae": ("122494005", "Cervical spine", None, (216, 101, 79)),
    "left_ribs_scapula_clavicle": ("113197003", "Rib", LEFT, (196, 172, 79)),
    "right_ribs_scapula_clavicle": ("113197003", "Rib", RIGHT, (120, 140, 60)),
    "sternum": ("56873002", "Sternum", None, (250, 250, 210)),
    "thoracic_vertebrae": ("122495006", "Thoracic spine", None, (226, 202, 134)),
    "lumbar_vertebrae": ("122496007", "Lumbar spine", None, (212, 188, 102)),
    "sacrum": ("54735007", "Sacrum", None, (200, 180, 140)),
    "left_hip": ("29836001", "Hip", LEFT, (230, 158, 140)),
    "right_hip": ("29836001", "Hip", RIGHT, (180, 110, 100)),
    "brain": ("12738006", "Brain", None, (250, 250, 225)),
    "left_lung": ("39607008", "Lung", LEFT, (197, 165, 145)),
    "right_lung": ("39607008", "Lung", RIGHT, (172, 138, 115)),
    "heart": ("80891009", "Heart", None, (206, 110, 84)),
    "liver": ("10200004", "Liver", None, (221, 130, 101)),
    "spleen": ("78961009", "Spleen", None, (157, 108, 162)),
    "left_kidney": ("64033007", "Kidney", LEFT, (185, 102, 83)),
    "right_kidney": ("64033007", "Kidney", RIGHT, (145, 60, 66)),
    "urinary_bladder": ("89837001", "Urinary bladder", None, (222, 154, 132)),
}


def _label(value: int, name: str, code: str, meaning: str, lat: dict | None, color: tuple[int, int, int]) -> dict[str, Any]:
    d: dict[str, Any] = {"value": value, "name": name, "category": CATEGORY,
                         "type": {"value": code, "scheme": "SCT", "meaning": meaning}, "color": list(color)}
    if lat is not None:
        d["modifier"] = lat
    return d


@dataclass(frozen=True)
class ModelSpec:
    """Architecture, input contract and labels of one model."""

    name: str
    in_ch: int
    labels: tuple[dict[str, Any], ...]
    base: int
    stages: int
    patch: tuple[int, int, int]  # training patch (z, y, x)
    batch: int
    spacing_mm: float
    windows: tuple[tuple[float, float], ...]
    normalisation: str = "window"
    by_modality: dict[str, str] = field(default_factory=dict)
    modalities: tuple[str, ...] = ("CT",)
    infer_patch: tuple[int, int, int] = (128, 160, 160)
    version: str = "1.0.0"
    description: str = ""
    stem: int = 1  # 2: the U-Net runs at half resolution (see inference.unet)
    refine: int = 0  # with a stem: filters of the full-resolution path (inference.unet), 0 = none
    refine_k: int = 1  # kernel of the layer joining that path with the upsampled decoder features
    largest_component: tuple[int, ...] = ()  # labels the node keeps to their largest component
    fill_holes: tuple[int, ...] = ()  # labels whose holes the node fills per axial slice

    @property
    def pad_multiple(self) -> int:
        """Input dimensions must be multiples of this."""
        return self.stem * 2 ** (self.stages - 1)

    @property
    def n_classes(self) -> int:
        """Output channels (background + labels)."""
        return len(self.labels) + 1


SPECS: dict[str, ModelSpec] = {
    "anatomy19": ModelSpec(
        name="anatomy19", in_ch=3,
        labels=tuple(_label(i + 1, n, *_CTARR_CODES[n]) for i, n in enumerate(CTARR_NAMES)),
        base=16, stages=4, patch=(64, 80, 80), batch=2, spacing_mm=3.0, windows=CT_WINDOWS,
        infer_patch=(128, 160, 160), stem=2, refine=8, refine_k=3,
        description="19 CTARR anatomies, stride-2 stem + 3D U-Net at 6 mm (16 base filters, 4 stages) + trilinear upsampling to 3 mm "
                    "refined by a full-resolution path (8 filters), trained on synthetic CT "
                    "made from procedural phantoms (inference/phantom.py, inference/synth.py); see docs/models.md"),
    "body": ModelSpec(
        name="body", in_ch=1,
        labels=(_label(1, "body", "38266002", "Entire body as a whole", None, (177, 122, 101)),),
        base=8, stages=4, patch=(32, 96, 96), batch=2, spacing_mm=3.0, windows=((-1024.0, 1500.0),),
        by_modality={"MR": "zscore"}, modalities=("CT", "MR"), infer_patch=(128, 192, 192),
        largest_component=(1,), fill_holes=(1,),  # one body; gas inside it (lungs, bowel) is body
        description="body/foreground of CT and MR, 3D U-Net (8 base filters, 4 stages) trained on synthetic "
                    "CT and MR-like images from phantoms, with constant-valued regions outside the field of view"),
    "face_area": ModelSpec(
        name="face_area", in_ch=1,
        labels=(_label(1, "face_area", "89545001", "Face structure", None, (230, 200, 60)),),
        base=8, stages=4, patch=(48, 64, 64), batch=2, spacing_mm=3.0, windows=(), normalisation="zscore",
        modalities=("MR", "CT"), infer_patch=(96, 96, 96),
        description="anonymised (defaced/refaced/blurred) face area of head MR and CT, 3D U-Net (8 base filters) "
                    "trained on anonymised phantom heads and two real MR heads"),
    "liver": ModelSpec(
        name="liver", in_ch=1,
        labels=(_label(1, "liver", "10200004", "Liver", None, (221, 130, 101)),),
        base=8, stages=4, patch=(64, 96, 96), batch=1, spacing_mm=1.5, windows=((-150.0, 250.0),),
        infer_patch=(128, 192, 192), largest_component=(1,),  # a typical liver crop in one window
        description="liver on a CTARR liver crop at 1.5 mm, 3D U-Net (8 base filters) trained on synthetic CT"),
}


def manifest(spec: ModelSpec, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The labels.json dict for :func:`inference.triton_repo.write_model_dir`."""
    m: dict[str, Any] = {
        "name": spec.name, "version": spec.version, "description": spec.description,
        "modalities": list(spec.modalities), "spacing_mm": [spec.spacing_mm] * 3,
        "normalisation": spec.normalisation, "windows": [list(w) for w in spec.windows],
        "patch": list(spec.infer_patch), "pad_multiple": spec.pad_multiple, "overlap": 0.25,
        "output_kind": "logits", "input_name": "INPUT", "output_name": "OUTPUT",
        "labels": list(spec.labels), "extra": dict(extra or {}),
    }
    if spec.by_modality:
        m["normalisation_by_modality"] = dict(spec.by_modality)
    if spec.largest_component:
        m["largest_component"] = list(spec.largest_component)
    if spec.fill_holes:
        m["fill_holes"] = list(spec.fill_holes)
    return m
