"""C-STORE SCU: send result objects to a peer over one association, classify every outcome.

- TCP_NODELAY on the socket (without it each C-STORE waits ~40 ms for Nagle + delayed ACK).
- Only the presentation contexts needed are proposed: one per SOP class being sent, with the
  uncompressed transfer syntaxes the node writes (many PACS refuse associations that propose
  dozens of contexts, and dcmtk only offers SEG/SR with such a restricted proposal).
- Outcomes: ``success`` (0x0000 and the 0xB0xx warnings: the object is stored), ``transient``
  (no connection, association rejected transiently, A-ABORT, timeout, 0xA7xx, and pynetdicom's
  empty status dataset on timeout/abort) and ``permanent`` (0xA9xx, 0xCxxx, 0x01xx/0x02xx refusals,
  SOP class not accepted, association rejected permanently).

Association-level failures are raised (``TransientError`` / ``PermanentSendError``); per-object
outcomes are returned. Messages contain no UIDs or patient data.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.config import PeerConfig
from dicomnode.errors import PermanentSendError, TransientError
from dicomnode.net.dimse import set_nodelay

log = logging.getLogger(__name__)

Outcome = Literal["success", "transient", "permanent"]
TRANSFER_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The outcome of one C-STORE; ``status`` is None when no response came."""

    index: int  # position in the list handed to :meth:`StoreSCU.send`
    status: int | None
    outcome: Outcome
    reason: str


def classify_status(status: int | None) -> tuple[Outcome, str]:
    """Map a C-STORE response status (None: no response) to an outcome and a reason."""
    if status is None:
        return "transient", "no response (timeout or abort)"
    if status == 0x0000:
        return "success", "stored"
    if status in (0xB000, 0xB006, 0xB007):
        return "success", f"stored with warning 0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return "transient", f"out of resources 0x{status:04X}"
    if 0xA900 <= status <= 0xA9FF:
        return "permanent", f"data set does not match SOP class 0x{status:04X}"
    if 0xC000 <= status <= 0xCFFF:
        return "permanent", f"cannot understand 0x{status:04X}"
    if status in (0x0122, 0x0124, 0x0211, 0x0117):
        return "permanent", f"refused 0x{status:04X}"
    if status == 0xFE00:
        return "transient", "cancelled"
    return "permanent", f"failure 0x{status:04X}"


class StoreSCU:
    """Sends datasets to one peer per call (one association per call)."""

    def __init__(
        self, ae_title: str, *, timeout_s: float = 60.0, max_pdu: int = 4_194_304,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu
        self.tls_context = tls_context

    def _associate(self, peer: PeerConfig, sop_classes: Sequence[str]):  # type: ignore[no-untyped-def]
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = min(self.timeout_s, 10.0)
        ae.maximum_pdu_size = self.max_pdu
        for uid in sorted(set(sop_classes)):
            ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
        tls_args = None
        if peer.tls:
            if self.tls_context is None:
                raise PermanentSendError("peer requires TLS but no TLS context is configured")
            tls_args = (self.tls_context, peer.host)
        try:
            assoc = ae.associate(
                peer.host, peer.port, ae_title=peer.ae_title, max_pdu=self.max_pdu,
                evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)], tls_args=tls_args,
            )
        except (OSError, RuntimeError) as exc:
            raise TransientError(f"cannot connect to {peer.name}: {type(exc).__name__}") from exc
        if assoc.is_established:
            return assoc
        primitive = getattr(assoc.acceptor, "primitive", None)
        result = getattr(primitive, "result", None)
        if assoc.is_rejected and result == 0x01:
            raise PermanentSendError(f"association rejected permanently by {peer.name} "
                                     f"(source {getattr(primitive, 'source', '?')}, reason {getattr(primitive, 'diagnostic', '?')})")
        if assoc.is_rejected:
            raise TransientError(f"association rejected transiently by {peer.name}")
        if result == 0x00:  # accepted, but not one context: every SOP class refused
            raise PermanentSendError(f"{peer.name} accepted none of the proposed SOP classes")
        raise TransientError(f"no association with {peer.name} (no connection, aborted or timed out)")

    def send(
        self, peer: PeerConfig, datasets: Sequence[Dataset | str | Path], sop_classes: Sequence[str] | None = None,
    ) -> list[StoreResult]:
        """C-STORE every dataset over one association; one :class:`StoreResult` per dataset.

        Items may be files (read one at a time, just before sending, so a long backlog does not
        sit in memory); ``sop_classes`` (one per item) saves reading their headers first.
        Raises TransientError when no association could be made (no connection, rejected
        transiently, timeout) and PermanentSendError when it was rejected permanently or none of
        the SOP classes was accepted. A connection lost midway makes the remaining objects
        ``transient``; an unreadable file is ``permanent``.
        """
        if not datasets:
            return []
        if sop_classes is None:
            sop_classes = [str(d.SOPClassUID) if isinstance(d, Dataset) else
                           str(dcmread(d, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
                           for d in datasets]
        assoc = self._associate(peer, list(sop_classes))
        results: list[StoreResult] = []
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            for i, item in enumerate(datasets):
                if not assoc.is_established:
                    results.append(StoreResult(i, None, "transient", "association lost"))
                    continue
                if str(sop_classes[i]) not in accepted:
                    results.append(StoreResult(i, None, "permanent", "SOP class refused by the peer"))
                    continue
                try:
                    ds = item if isinstance(item, Dataset) else dcmread(item)
                except (OSError, InvalidDicomError) as exc:
                    results.append(StoreResult(i, None, "permanent", f"unreadable file: {type(exc).__name__}"))
                    continue
                try:
                    rsp = assoc.send_c_store(ds)
                except (OSError, RuntimeError, ValueError, AttributeError) as exc:
                    results.append(StoreResult(i, None, "transient", f"send failed: {type(exc).__name__}"))
                    continue
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                outcome, reason = classify_status(status)
                results.append(StoreResult(i, status, outcome, reason))
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
        return results
