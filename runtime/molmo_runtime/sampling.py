"""Token selection: greedy, or temperature / top-k / top-p sampling. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from molmo_runtime.input_checks import check_float, check_int


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy, and then top_k, top_p and seed have no effect. Bad values
    (NaN, negative temperature or seed, top_k < 1, top_p outside (0, 1], bools, strings) raise
    InputError."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        check_float("temperature", self.temperature, 0.0)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.seed is not None:
            check_int("seed", self.seed, 0)


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B] int64."""
        p = self.params
        if p.temperature == 0:
            return logits.argmax(-1).astype(np.int64)
        z = logits.astype(np.float64) / p.temperature  # [B, V]
        if p.top_k is not None and p.top_k < z.shape[-1]:
            kth = np.partition(z, -p.top_k, axis=-1)[:, -p.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if p.top_p is not None and p.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, -1)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= p.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(-1, keepdims=True)
        u = self.rng.random((probs.shape[0], 1))
        ids = (np.cumsum(probs, -1) < u).sum(-1)
        return np.minimum(ids, probs.shape[-1] - 1).astype(np.int64)
