"""CheckpointWeights: lazy per-parameter reads equal what from_pretrained loads."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from molmo_export.export.onnx_export import resolve_checkpoint  # noqa: E402
from molmo_export.model import MolmoForConditionalGeneration  # noqa: E402
from molmo_export.weights import CheckpointWeights  # noqa: E402


def test_every_parameter_equals_the_loaded_model() -> None:
    directory = resolve_checkpoint("demo")
    weights = CheckpointWeights(directory)
    model = MolmoForConditionalGeneration.from_pretrained(directory)
    params = dict(model.named_parameters())
    assert sorted(weights.names()) == sorted(params)
    for name, p in params.items():
        got = weights.get(name, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, p), name
    half = weights.get("language_model.lm_head.weight", torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, params["language_model.lm_head.weight"].half())


def test_unknown_name_is_a_key_error() -> None:
    weights = CheckpointWeights(resolve_checkpoint("demo"))
    with pytest.raises(KeyError, match="not a parameter"):
        weights.get("vision.nope")
