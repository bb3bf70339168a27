"""A lean DICOM upper layer acceptor (PS3.8) for the Storage SCP's hot path.

Why: pynetdicom runs every association on three threads (socket reactor, state machine, service)
that hand each PDU and message over through polled queues; on a busy 2-core machine each hand-over
waits for a CPU slice, which caps a pynetdicom SCP near 150-200 C-STORE/s whatever the handler
does. Here one thread per connection reads a PDU, handles the message and answers it, with no
hand-over: receive -> parse the command -> store -> respond.

Scope (all a Storage SCP needs): A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF with fragmented command and data
sets, C-ECHO and C-STORE, A-RELEASE, A-ABORT. Presentation contexts are accepted with the
requestor's first transfer syntax the node supports (data stored as received). SCP/SCU role
selection, asynchronous operations and extended negotiation items are not answered, which per
PS3.7 means the defaults (requestor is SCU, one outstanding operation). Anything unexpected
(unknown PDU, PDU over the negotiated size, a context that was not accepted) aborts the association.

``AcceptorServer`` raises OSError from ``start()`` when it cannot bind.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Protocol

LOG = logging.getLogger("dicomnode.ul")

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
MAX_CONTROL_PDU = 1 << 20
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    """What the node uses from an A-ASSOCIATE-RQ."""

    called_ae: str
    calling_ae: str
    called_raw: bytes
    calling_raw: bytes
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...]  # (id, abstract syntax, transfer syntaxes)
    peer_max_pdu: int
    protocol_ok: bool


@dataclass
class Association:
    """One accepted association (its id is opaque and PHI-free)."""

    id: str
    calling_ae: str
    host: str
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract, transfer syntax)


class StoreHandler(Protocol):
    """Called for each C-STORE: returns (status, error comment)."""

    def __call__(self, sop_class: str, sop_uid: str, transfer_syntax: str, assoc: Association,
                 chunks: list[memoryview]) -> tuple[int, str]: ...


def _uid(b: bytes | memoryview) -> str:
    return bytes(b).rstrip(b"\x00 ").decode("ascii", "replace")


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode the variable part of an A-ASSOCIATE-RQ PDU; raises ProtocolError when malformed."""
    if len(body) < 68:
        raise ProtocolError("short A-ASSOCIATE-RQ")
    version = struct.unpack_from(">H", body, 0)[0]
    called_raw, calling_raw = body[4:20], body[20:36]
    contexts: list[tuple[int, str, tuple[str, ...]]] = []
    peer_max = 0
    off = 68
    while off + 4 <= len(body):
        item_type, length = body[off], struct.unpack_from(">H", body, off + 2)[0]
        value = body[off + 4: off + 4 + length]
        if len(value) != length:
            raise ProtocolError("truncated item")
        off += 4 + length
        if item_type == 0x20:
            if length < 4:
                raise ProtocolError("short presentation context")
            ctx_id, abstract, tss = value[0], "", []
            sub = 4
            while sub + 4 <= len(value):
                st, sl = value[sub], struct.unpack_from(">H", value, sub + 2)[0]
                sv = value[sub + 4: sub + 4 + sl]
                sub += 4 + sl
                if st == 0x30:
                    abstract = _uid(sv)
                elif st == 0x40:
                    tss.append(_uid(sv))
            contexts.append((ctx_id, abstract, tuple(tss)))
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                st, sl = value[sub], struct.unpack_from(">H", value, sub + 2)[0]
                if st == 0x51 and sl == 4:
                    peer_max = struct.unpack_from(">L", value, sub + 4)[0]
                sub += 4 + sl
    return AssociateRequest(_uid(called_raw).strip(), _uid(calling_raw).strip(), bytes(called_raw),
                            bytes(calling_raw), tuple(contexts), peer_max, bool(version & 1))


def _item(t: int, value: bytes) -> bytes:
    return struct.pack(">BBH", t, 0, len(value)) + value


def encode_associate_ac(rq: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int,
                        impl_uid: str, impl_version: str) -> bytes:
    """A-ASSOCIATE-AC for ``results`` = [(context id, result, transfer syntax)]."""
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for ctx_id, result, ts in results:
        items.append(_item(0x21, bytes((ctx_id, 0, result, 0)) + _item(0x40, ts.encode("ascii"))))
    user = (_item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, impl_uid.encode("ascii"))
            + _item(0x55, impl_version.encode("ascii")))
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + rq.called_raw + rq.calling_raw + b"\x00" * 32 + b"".join(items)
    return struct.pack(">BBL", 0x02, 0, len(body)) + body


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT; source 2 = service provider (reason 1: unrecognized PDU, 2: unexpected PDU)."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, source, reason)


RELEASE_RP = struct.pack(">BBLL", 0x06, 0, 4, 0)


def parse_command(b: bytes | bytearray) -> dict[int, bytes]:
    """Decode a command set (implicit VR little endian, group 0000) into {tag: raw value}."""
    out: dict[int, bytes] = {}
    off = 0
    while off + 8 <= len(b):
        group, elem, length = struct.unpack_from("<HHL", b, off)
        off += 8
        if group != 0 or off + length > len(b):
            raise ProtocolError("malformed command set")
        out[elem] = bytes(b[off: off + length])
        off += length
    return out


def _us(v: bytes | None) -> int | None:
    return struct.unpack("<H", v[:2])[0] if v and len(v) >= 2 else None


def _el(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, elem, len(value)) + value


def _ui_value(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def encode_response(command: int, msg_id: int, sop_class: str, status: int, sop_uid: str = "",
                    comment: str = "") -> bytes:
    """A response command set (group length first, elements in tag order)."""
    els = [_el(0x0002, _ui_value(sop_class)), _el(0x0100, struct.pack("<H", command)),
           _el(0x0120, struct.pack("<H", msg_id)), _el(0x0800, struct.pack("<H", NO_DATASET)),
           _el(0x0900, struct.pack("<H", status))]
    if comment and status != 0:
        c = comment.encode("ascii", "replace")[:64]
        els.append(_el(0x0902, c + b" " if len(c) % 2 else c))
    if sop_uid:
        els.append(_el(0x1000, _ui_value(sop_uid)))
    body = b"".join(els)
    return _el(0x0000, struct.pack("<L", len(body))) + body


def encode_pdata_command(ctx_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set (last fragment)."""
    pdv = struct.pack(">LBB", len(command) + 2, ctx_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv
