"""Bad input over the network: the malformed-instance corpus (tests/reliability/corpus.py) sent to a
real node with a real pipeline (Triton body model over gRPC).

The node must never die, every input must end with a failure status (or a refused presentation
context) or be accepted and then quarantined with a machine-readable reason, no file may appear
outside the spool, and a good series sent afterwards must still be processed.
(Property-based fuzzing of the parsing/conversion path lives in tests/unit/test_convert_fuzz.py.)
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.peers import echo, wait_for
from tests.reliability.conftest import FINAL, report
from tests.reliability.corpus import build_corpus, canary_uid, ct_dataset, encode, part10, send_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPOOL_FILE = re.compile(r"^[0-9a-f]{16}/[0-9]+(\.[0-9]+)*/[0-9]+(\.[0-9]+)*\.dcm$")


def good_series(folder: Path, n: int = 8) -> tuple[str, list[Path]]:
    """A valid canary CT series (n slices of 32x32)."""
    study, series = canary_uid(1), canary_uid(2)
    files = []
    for k in range(n):
        ds = ct_dataset(study, series, canary_uid(3), k)
        files.append(part10(folder / f"{k}.dcm", encode(ds), sop_class=str(ds.SOPClassUID), sop_uid=str(ds.SOPInstanceUID)))
    return series, files


def test_malformed_corpus_never_kills_the_node_and_every_input_gets_an_outcome(
        tmp_path: Path, start_node, triton_server) -> None:  # type: ignore[no-untyped-def]
    cases = build_corpus(tmp_path / "corpus")
    node = start_node(triton=triton_server)
    sent = {}
    for case in cases:
        sent[case.name] = send_raw(node.port, case.files)
        assert node.alive(), f"node died on {case.name}"
    assert echo(node.port), "node stopped answering C-ECHO after the corpus"

    good_uid, good_files = good_series(tmp_path / "good")
    assert all(r.acknowledged for r in send_raw(node.port, good_files))

    accepted = [c for c in cases if any(r.acknowledged for r in sent[c.name])]
    assert wait_for(lambda: all(node.series_outcome(c.series_uid)[0] in FINAL for c in accepted)
                    and node.series_outcome(good_uid)[0] in FINAL, 120, 0.5), \
        {c.name: node.series_outcome(c.series_uid) for c in accepted}

    table = {}
    problems = []
    for case in cases:
        results = sent[case.name]
        refused = all(r.refused or r.problem == "no-response" for r in results)
        took = all(r.acknowledged for r in results)
        state, reason = node.series_outcome(case.series_uid) if case.series_uid else ("absent", "")
        outcome = ("refused " + ",".join(sorted({f"0x{r.status:04X}" if r.status is not None else r.problem
                                                 for r in results}))) if refused else f"{state}: {reason.splitlines()[0] if reason else ''}"
        table[case.name] = {"expect": case.expect, "outcome": outcome, "what": case.what}
        quarantined = took and state == "quarantined" and bool(re.match(r"^[a-z]+:[a-z_]+", reason))
        ok = {"reject": refused, "quarantine": quarantined, "either": refused or quarantined}[case.expect]
        if not ok:
            problems.append(f"{case.name}: expected {case.expect}, got {outcome}")
    report("bad_input", {"cases": table, "good_series_after_corpus": node.series_outcome(good_uid)[0]})
    assert not problems, problems
    assert node.series_outcome(good_uid)[0] == "done", node.series_outcome(good_uid)

    # nothing was written outside the spool's own layout; no partial files were left behind
    spool = node.data_dir / "spool"
    stray = [str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()
             and not SPOOL_FILE.match(str(p.relative_to(spool)))]
    assert stray == [], stray
    assert not Path("/tmp/dicomnode-pwned").exists()
    assert not any((node.data_dir.parent / "etc").glob("*")) if (node.data_dir.parent / "etc").exists() else True
    # refused instances were not stored; accepted ones were, exactly once
    acked = sum(1 for c in cases for r in sent[c.name] if r.acknowledged) + len(good_files)
    assert len(node.instance_uids()) == acked
    assert node.alive()
