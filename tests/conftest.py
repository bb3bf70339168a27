"""Shared test fixtures: paths to ../shared/data (skip when absent) and free ports."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers import free_port  # noqa: F401  (one port picker for all tests)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with a clear reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (see README, 'Test data')")
    return SHARED_DATA
