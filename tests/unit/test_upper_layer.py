"""The lean upper layer's PDUs, cross-checked with pynetdicom's independent PDU codec."""
from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from dicomnode.net.ul import (
    ProtocolError,
    encode_associate_ac,
    encode_associate_rj,
    encode_response,
    parse_associate_rq,
    parse_command,
)

CT = "1.2.840.10008.5.1.4.1.1.2"




def test_parse_rq_encoded_by_pynetdicom() -> None:
    pdu = A_ASSOCIATE_RQ()
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "STORESCU"
    prim.called_ae_title = "DICOMNODE"
    cx = build_context(CT, ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    pdu.from_primitive(prim)
    raw = pdu.encode()
    rq = parse_associate_rq(raw[6:])
    assert (rq.calling_ae, rq.called_ae, rq.peer_max_pdu, rq.protocol_ok) == ("STORESCU", "DICOMNODE", 16384, True)
    assert rq.contexts == ((1, CT, ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1")),)

    ac_raw = encode_associate_ac(rq, [(1, 0, "1.2.840.10008.1.2.4.80"), (3, 3, "1.2.840.10008.1.2")], 4194304,
                                 "1.2.826.0.1.3680043.9.3811.3.0.4", "DICOMNODE_01")
    ac = A_ASSOCIATE_AC()
    ac.decode(ac_raw)
    assert ac.pdu_length == len(ac_raw) - 6
    prim_ac = ac.to_primitive()
    results = {c.context_id: (c.result, c.transfer_syntax[0]) for c in prim_ac.presentation_context_definition_results_list}
    assert results == {1: (0, "1.2.840.10008.1.2.4.80"), 3: (3, "1.2.840.10008.1.2")}
    assert prim_ac.maximum_length_received == 4194304
    assert prim_ac.called_ae_title == "DICOMNODE" and prim_ac.calling_ae_title == "STORESCU"


def test_reject_and_malformed() -> None:
    assert encode_associate_rj(1, 1, 3) == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"
    with pytest.raises(ProtocolError):
        parse_associate_rq(b"\x00\x01" + b"\x00" * 20)
    bad = bytearray(b"\x00\x01\x00\x00" + b"A" * 64 + b"\x20\x00\xff\xff\x01")  # item longer than the PDU
    with pytest.raises(ProtocolError):
        parse_associate_rq(bytes(bad))


def test_response_command_round_trip() -> None:
    rsp = encode_response(0x8001, 7, CT, 0xA700, "1.2.3.4", "spool quota reached")
    els = parse_command(rsp)
    assert struct.unpack("<L", els[0x0000])[0] == len(rsp) - 12
    assert els[0x0002].rstrip(b"\x00").decode() == CT
    assert struct.unpack("<H", els[0x0100])[0] == 0x8001 and struct.unpack("<H", els[0x0120])[0] == 7
    assert struct.unpack("<H", els[0x0800])[0] == 0x0101 and struct.unpack("<H", els[0x0900])[0] == 0xA700
    assert els[0x0902].strip().decode() == "spool quota reached"
    assert els[0x1000].rstrip(b"\x00").decode() == "1.2.3.4"
    with pytest.raises(ProtocolError):
        parse_command(b"\x08\x00\x00\x00\x04\x00\x00\x00abcd")  # not group 0000
