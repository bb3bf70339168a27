"""Property-based fuzzing of ingest over the network (Hypothesis): mutated encodings of a valid CT
slice - flipped bytes, truncation, spliced random elements, random lengths - are C-STOREd to a
running node on one association. (The conversion path is fuzzed in tests/unit/test_convert_fuzz.py,
the header scanner in tests/unit/test_header_scan.py; this is the whole SCP, in its own process.)

Every input must get a DIMSE status; an acknowledged one must be indexed and its spool file must read
back as the bytes that were sent; the node must never die. 300 inputs in CI,
``DICOMNODE_NIGHTLY=1`` 3000.
"""
from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.peers import echo
from tests.reliability.conftest import NodeUnderTest, report, sized
from tests.reliability.corpus import CT, ct_dataset, encode, canary_uid, part10

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = sized(300, 3000)
STATS: dict[str, int] = {}


class Sender:
    """One association, re-opened when the node aborts it (which counts as a refusal)."""

    def __init__(self, port: int) -> None:
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        self.port = port
        self.assoc: Any = None

    def _open(self) -> Any:
        from pynetdicom import AE, evt

        from dicomnode.net.dimse import set_nodelay

        ae = AE(ae_title="CORPUS")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        ae.add_requested_context(CT, ["1.2.840.10008.1.2.1"])
        return ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE", evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self._open()
            assert self.assoc.is_established
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = self.assoc.send_c_store(path)
        return int(st.Status) if "Status" in st else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeUnderTest, Sender, Path]]:
    from tests.peers import NodeProcess
    from tests.reliability.conftest import node_config

    tmp = tmp_path_factory.mktemp("fuzz")
    config, port, _, _ = node_config(tmp, name="fuzz", quiet_period_s=30.0)
    proc = NodeProcess.start(config, port, log=tmp / "fuzz.out")
    node = NodeUnderTest(proc, config, port, tmp / "fuzz-data")
    sender = Sender(port)
    try:
        yield node, sender, tmp
    finally:
        sender.close()
        proc.stop()


def _base(sop: str) -> bytes:
    return encode(ct_dataset(canary_uid(1), canary_uid(2), sop, rows=8, cols=8))


BASE = _base(canary_uid(3))  # for the mutation ranges; each example encodes a fresh instance

mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.integers(0, len(BASE))),
    st.tuples(st.just("splice"), st.integers(0, len(BASE)), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("length"), st.integers(0, len(BASE) - 8), st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF])),
)


def mutate(data: bytes, m: tuple[Any, ...]) -> bytes:
    b = bytearray(data)
    if not b and m[0] in ("flip", "length"):
        return data
    if m[0] == "flip":  # positions are taken modulo the current length (earlier cuts shorten it)
        for pos, val in m[1]:
            b[pos % len(b)] = val
    elif m[0] == "cut":
        del b[m[1]:]
    elif m[0] == "splice":
        b[m[1]:m[1]] = m[2]
    else:  # overwrite a 4-byte little-endian length-looking field
        at = m[1] % len(b)
        b[at:at + 4] = struct.pack("<I", m[2])
    return bytes(b)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_instances_get_a_status_and_acknowledged_ones_are_stored_intact(fuzz_node, muts) -> None:  # type: ignore[no-untyped-def]
    node, sender, tmp = fuzz_node
    sop = canary_uid(3)  # the command's SOP instance UID (the dataset's own copy may get mutated)
    data = _base(sop)
    for m in muts:
        data = mutate(data, m)
    path = part10(tmp / "x.dcm", data, sop_class=CT, sop_uid=sop)
    status = sender.send(path)
    assert node.alive(), "the node died"
    key = "no-response" if status is None else ("stored" if status == 0 else f"0x{status:04X}")
    STATS[key] = STATS.get(key, 0) + 1
    if status == 0:
        rows = node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (sop,))
        assert rows, "acknowledged but not indexed"
        stored = (node.data_dir / "spool" / rows[0][0]).read_bytes()
        # what went over the wire: the sender splits the file after its meta group, and a mutation
        # that makes the dataset start with group 0002 elements moves them into that meta
        from pynetdicom.dsutils import split_dataset

        sent = path.read_bytes()[split_dataset(path)[1]:]
        assert stored.endswith(sent), "stored bytes differ from the bytes sent"


def test_node_survived_the_fuzzing(fuzz_node) -> None:  # type: ignore[no-untyped-def]
    node, _, _ = fuzz_node
    assert node.alive() and echo(node.port)
    assert list((node.data_dir / "spool" / ".tmp").glob("*")) == []
    report("fuzz_network", {"examples": sum(STATS.values()), "outcomes": dict(sorted(STATS.items()))})
    assert sum(STATS.values()) >= min(EXAMPLES, 100)
