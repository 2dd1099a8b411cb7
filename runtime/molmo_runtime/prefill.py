"""Chunked prefill: a prompt longer than a backend takes in one call runs as several calls.

The decoder graph takes `seq` new positions after `past` cached ones (graph_io's contract), so a
prompt of L positions can be fed as chunks [0, c), [c, 2c), ... each attending to the cache the
previous chunks filled. The result is the same as one call (the causal mask of a chunk is the
corresponding rows of the full prompt's mask); only the summation order of attention differs.
Peak activation memory scales with the chunk instead of the prompt. Torch-free.
"""

from __future__ import annotations

import numpy as np

from molmo_runtime.backends.base import DecodeState
from molmo_runtime.errors import InputError


def prefill(state: DecodeState, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            chunk: int | None) -> np.ndarray:
    """Run the prompt (embeds [B, L, D], mask [B, L], positions [B, L]) through one
    generation's cache `state`, which must be empty or hold the positions mask describes
    before the prompt.

    chunk: most positions per call (the backend's max_prefill_tokens; None: one call).
    Returns the logits of the last position [B, vocab].
    """
    length = embeds.shape[1]
    if chunk is None or length <= chunk:
        return state.decode(embeds, mask, positions)
    if chunk < 1:
        raise InputError(f"prefill chunk must be >= 1, got {chunk}")
    past = state.length
    if mask.shape[1] != past + length:
        raise InputError(f"attention_mask has {mask.shape[1]} columns; the cache holds {past} "
                         f"positions and the prompt {length}")
    logits = None
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        logits = state.decode(embeds[:, start:stop], mask[:, :past + stop],
                                positions[:, start:stop])
    assert logits is not None
    return logits
