"""Deterministic DICOM UIDs for the node's outputs (DESIGN "Exactly-once results").

A result UID is ``2.25.<decimal of a UUIDv5>`` whose name is built from the source series UID, the
sorted model versions, the output kind and an index. Processing the same series twice with the
same models yields the same SOP instance UIDs, so a PACS replaces rather than duplicates; a new
model version yields new UIDs (a new result, not an overwrite of a different one).
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

# Fixed namespace of dicomnode (uuid5 of the DNS namespace and the project name); never change it:
# every UID the node ever sent depends on it.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "dicomnode.results")

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,63}$")


def is_valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, no leading zeros, <= 64 chars)."""
    return bool(uid) and len(uid) <= 64 and bool(_UID_RE.match(uid))


def derive_uid(source_series_uid: str, kind: str, model_versions: Sequence[str] = (), index: int = 0) -> str:
    """The UID of output ``kind`` (e.g. "seg", "seg-series", "sr") number ``index`` for a series.

    ``model_versions`` (e.g. ``["body:3", "anatomy19:2"]``) are sorted, so their order does not
    matter. Raises ValueError for an invalid source UID, kind or negative index.
    """
    if not is_valid_uid(source_series_uid):
        raise ValueError("source series UID is not a valid DICOM UID")
    if not _KIND_RE.match(kind):
        raise ValueError(f"invalid output kind {kind!r}")
    if index < 0:
        raise ValueError("index must not be negative")
    versions = sorted(str(v) for v in model_versions)
    if any("\n" in v for v in versions):
        raise ValueError("model versions must not contain newlines")
    name = "\n".join([source_series_uid, kind, str(int(index)), *versions])
    return f"2.25.{uuid.uuid5(NAMESPACE, name).int}"
