"""The error tree of dicomnode (see DESIGN.md "Errors").

Exceptions become outcomes in exactly three places: the SCP handler, ``pipeline.run_series`` and
the sender. Messages must never contain patient data (names, IDs, dates, UIDs): they end up in
logs, job records and SRs.
"""
from __future__ import annotations


class DicomNodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration file is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems) if self.problems else "invalid configuration")


class InstanceRejected(DicomNodeError):
    """An incoming instance is refused; ``status`` is the C-STORE failure status to return.

    0xA700 out of resources, 0xA900 / 0xC000 cannot understand, 0x0122 SOP class not supported.
    Nothing is stored when this is raised.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = int(status)
        self.reason = reason
        super().__init__(f"0x{self.status:04X}: {reason}")


class SeriesError(DicomNodeError):
    """A series cannot be processed; it is quarantined with ``reason`` (machine-readable code).

    ``kind`` is one of ``geometry``, ``unsupported``, ``inconsistent``, ``anatomy``.
    """

    def __init__(self, reason: str, *, kind: str = "inconsistent", detail: str = "") -> None:
        self.reason = reason
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}:{reason}" + (f" ({detail})" if detail else ""))


class TransientError(DicomNodeError):
    """A failure that may go away (inference unavailable, peer unreachable, 0xA7xx from a PACS).

    The work is retried with persisted exponential backoff; it is never dropped.
    """


class PermanentSendError(DicomNodeError):
    """A destination refused a result for good (0xA9xx, 0xCxxx, refused SOP class): dead-letter."""


class ModelContractError(DicomNodeError):
    """A served model disagrees with its manifest (inputs, outputs, labels): startup fails."""
