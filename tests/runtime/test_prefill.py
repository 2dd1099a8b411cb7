"""Chunked prefill (molmo_runtime.prefill) gives the logits of one call, on ONNX Runtime with the
exported demo decoder: batch 2 with left padding, several chunk sizes, then decode steps on the
cache the chunks filled. Bound: tolerances.TABLE["prefill/chunked_vs_one_call"]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from molmo_runtime.backends.ort import OrtBackend  # noqa: E402
from molmo_runtime.errors import InputError  # noqa: E402
from molmo_runtime.manifest import load_manifest  # noqa: E402
from molmo_runtime.prefill import prefill  # noqa: E402
from molmo_runtime.tolerances import TABLE  # noqa: E402

BOUND = TABLE["prefill/chunked_vs_one_call"]


def _inputs(art: Path, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = load_manifest(art, verify="none")
    table = np.load(m.path("embed_tokens.npy"), mmap_mode="r")
    ids = np.random.default_rng(3).integers(0, 256, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, :5] = 0  # left padding in the second row
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return np.asarray(table[ids], np.float32), mask, positions


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_matches_one_call(demo_artifact: Path, chunk: int) -> None:
    m = load_manifest(demo_artifact, verify="none")
    embeds, mask, positions = _inputs(demo_artifact, 40)
    prompt = 33
    backend = OrtBackend(m)
    one, chunked = backend.new_state(2), backend.new_state(2)
    calls = []
    real = chunked.decode

    def counting(*a: np.ndarray) -> np.ndarray:
        calls.append(a[0].shape[1])
        return real(*a)

    chunked.decode = counting  # type: ignore[method-assign]
    want = one.decode(embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt])
    got = prefill(chunked, embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt],
                  chunk)  # what a TensorRT profile imposes
    assert calls == [min(chunk, prompt - s) for s in range(0, prompt, chunk)]
    assert np.abs(got - want).max() <= BOUND.bound(float(np.abs(want).max()))
    for t in range(prompt, 40):  # the cache the chunks wrote serves the decode steps
        step = (embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])
        want, got = one.decode(*step), chunked.decode(*step)
        assert np.abs(got - want).max() <= BOUND.bound(float(np.abs(want).max())), t


def test_bad_chunk_and_mask_are_refused(demo_artifact: Path) -> None:
    m = load_manifest(demo_artifact, verify="none")
    embeds, mask, positions = _inputs(demo_artifact, 10)
    state = OrtBackend(m).new_state(2)
    with pytest.raises(InputError, match="chunk must be >= 1"):
        prefill(state, embeds, mask, positions, chunk=0)
    with pytest.raises(InputError, match="cache holds 0 positions and the prompt 10"):
        prefill(state, embeds, mask[:, :9], positions, chunk=4)
    assert state.length == 0  # nothing ran
