from __future__ import annotations

import numpy as np
import pytest

from molmo_runtime.errors import InputError
from molmo_runtime.sampling import Sampler, SamplingParams


def test_greedy_is_argmax_over_all_rows() -> None:
    logits = np.array([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 5.5]], np.float32)
    assert Sampler(SamplingParams())(logits).tolist() == [1, 3]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    draw = lambda seed: np.stack([Sampler(SamplingParams(1.0, seed=seed))(logits)  # noqa: E731
                                  for _ in range(3)])
    assert (draw(7) == draw(7)).all()
    many = [Sampler(SamplingParams(1.0, seed=s))(logits).tolist() for s in range(20)]
    assert len({tuple(m) for m in many}) > 1


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = np.arange(10, dtype=np.float32)[None].repeat(200, 0)
    ids = Sampler(SamplingParams(5.0, top_k=3, seed=0))(logits)
    assert set(ids.tolist()) <= {7, 8, 9} and len(set(ids.tolist())) == 3


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None].repeat(500, 0)
    ids = Sampler(SamplingParams(1.0, top_p=0.75, seed=1))(logits)
    assert set(ids.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.8
    ids = Sampler(SamplingParams(1.0, top_p=0.4, seed=1))(logits)
    assert set(ids.tolist()) == {0}  # the top token always stays


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(temperature=None), dict(temperature=True), dict(top_k=0), dict(top_k=3.0),
    dict(top_k=False), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(seed=-1), dict(seed=1.5), dict(seed="7")])
def test_bad_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(InputError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_good_edge_values_are_accepted() -> None:
    SamplingParams(temperature=0, top_k=np.int64(1), top_p=1, seed=np.uint32(0))
    SamplingParams(temperature=np.float32(0.5), top_p=1e-9, seed=2**70)
