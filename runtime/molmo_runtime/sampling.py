"""Token selection: greedy, or temperature / top-k / top-p sampling. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


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
