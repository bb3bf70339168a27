"""Deterministic result UIDs."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from dicomnode.results.uids import derive_uid, is_valid_uid

SRC = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def test_same_inputs_same_uid() -> None:
    a = derive_uid(SRC, "seg", ["body:1", "anatomy19:2"])
    b = derive_uid(SRC, "seg", ["anatomy19:2", "body:1"])  # order of versions does not matter
    assert a == b
    assert a.startswith("2.25.") and is_valid_uid(a)


def test_each_input_changes_the_uid() -> None:
    base = derive_uid(SRC, "seg", ["body:1"])
    others = {
        derive_uid(SRC + "1", "seg", ["body:1"]),
        derive_uid(SRC, "sr", ["body:1"]),
        derive_uid(SRC, "seg", ["body:2"]),
        derive_uid(SRC, "seg", ["body:1"], index=1),
        derive_uid(SRC, "seg", []),
    }
    assert base not in others and len(others) == 5


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        derive_uid("1.2.03", "seg")
    with pytest.raises(ValueError):
        derive_uid("../../etc", "seg")
    with pytest.raises(ValueError):
        derive_uid(SRC, "Bad Kind")
    with pytest.raises(ValueError):
        derive_uid(SRC, "seg", index=-1)


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=2, max_size=8), st.integers(0, 1000))
def test_always_valid(parts: list[int], index: int) -> None:
    uid = derive_uid(".".join(map(str, parts)), "seg", ["m:1"], index)
    assert is_valid_uid(uid) and len(uid) <= 64


def test_too_long_source_uid_is_refused() -> None:
    with pytest.raises(ValueError):
        derive_uid("1." + "2" * 63, "seg")
