"""The distance measures of the quality report, on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from molmo_calibration import metrics


def test_cosine_known_values() -> None:
    x = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    assert metrics.cosine(x, x) == pytest.approx(1.0)
    assert metrics.cosine(x, -x) == pytest.approx(-1.0)
    assert metrics.cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert metrics.cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert metrics.cosine(np.zeros(3), np.ones(3)) == 0.0
    rows = metrics.row_cosines(x, np.stack([x[0], -x[1]]))
    np.testing.assert_allclose(rows, [1.0, -1.0])


def test_max_abs_and_top1() -> None:
    a = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    b = np.array([[0.0, 1.5, 1.0], [2.9, 0.0, 0.0]])
    assert metrics.max_abs(a, b) == pytest.approx(1.0)
    np.testing.assert_array_equal(metrics.top1_agreement(a, b), [0.0, 1.0])


def test_kl_divergence_matches_the_definition() -> None:
    p_logits = np.log(np.array([0.5, 0.25, 0.25]))
    q_logits = np.log(np.array([0.25, 0.5, 0.25])) + 7.0  # logits are shift-invariant
    expected = 0.5 * np.log(2.0) + 0.25 * np.log(0.5)
    assert float(metrics.kl_divergence(p_logits, q_logits)) == pytest.approx(expected)
    assert float(metrics.kl_divergence(p_logits, p_logits)) == pytest.approx(0.0, abs=1e-12)
    # stable for large logits
    big = np.array([1000.0, 0.0, -1000.0])
    assert np.isfinite(metrics.kl_divergence(big, big[::-1]))


def test_common_prefix_fraction() -> None:
    assert metrics.common_prefix_fraction([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert metrics.common_prefix_fraction([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert metrics.common_prefix_fraction([1, 2, 3, 4], [7, 2, 3, 4]) == 0.0
    assert metrics.common_prefix_fraction([1, 2, 3, 4], [1, 2]) == 0.5
