"""Shared test fixtures: where the golden data is, and skipping with a reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI puts a copy of shared/ beside the clone; MOLMO_GOLDEN overrides.
GOLDEN = Path(os.environ.get("MOLMO_GOLDEN", REPO.parent / "shared" / "golden"))


def golden_path(*parts: str) -> Path:
    """Path inside ../shared/golden; skips the calling test with a clear reason if absent."""
    p = GOLDEN.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"golden data not found at {p} (expected ../shared/golden beside the repo, "
                    "or set MOLMO_GOLDEN)")
    return p


@pytest.fixture(scope="session")
def golden() -> Path:
    return golden_path()
