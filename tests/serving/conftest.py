"""Fixtures for the Triton tests: the server environment, or a skip (a failure under CI) that
says why tritonserver cannot run here."""

from __future__ import annotations

import os

import pytest

from molmo_triton.server import Distribution, TritonUnavailable


@pytest.fixture(scope="session")
def triton_dist() -> Distribution:
    try:
        return Distribution.find()
    except TritonUnavailable as e:
        # CI installs the server environment (make test-triton): missing there is a failure.
        if os.environ.get("CI"):
            pytest.fail(f"tritonserver unavailable under CI: {e}")
        pytest.skip(f"tritonserver unavailable: {e}")
