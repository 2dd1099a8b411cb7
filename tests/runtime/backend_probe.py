"""One prefill through a backend's decoder: what tests compare when a setting must not change
what is computed (huge pages, mapped weight pages)."""

from __future__ import annotations

import numpy as np

from molmo_runtime.backends.base import Backend


def prefill_logits(backend: Backend, d_model: int, length: int = 7) -> np.ndarray:
    """Logits of a fixed random prompt of `length` embeddings, from a fresh generation."""
    embeds = np.random.default_rng(0).standard_normal((1, length, d_model), np.float32)
    backend.start(1)
    return backend.decode(embeds, np.ones((1, length), np.int64),
                          np.arange(length, dtype=np.int64)[None])
