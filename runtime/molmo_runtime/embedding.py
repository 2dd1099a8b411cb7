"""Token embeddings (memory-mapped table) and image-token injection, as the reference does it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EmbeddingTable:
    def __init__(self, path: str | Path) -> None:
        self.table = np.load(path, mmap_mode="r")  # [rows, D] float32, paged in on demand

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [B, T] (-1 = padding, looked up as id 0) -> [B, T, D] float32."""
        ids = np.where(input_ids < 0, 0, input_ids)
        return np.asarray(self.table[ids], dtype=np.float32)


def add_image_tokens(embeds: np.ndarray, image_tokens: np.ndarray,
                     image_input_idx: np.ndarray) -> np.ndarray:
    """Molmo ADDS image features to the <im_patch> embeddings (in place, returns `embeds`).

    embeds [B, T, D]; image_tokens [B, crops, 144, D]; image_input_idx [B, crops, 144]
    (negative = feature dropped). Valid indices are unique per row, so plain += is exact.
    """
    batch, _, d = embeds.shape
    idx = image_input_idx.reshape(batch, -1)
    feats = image_tokens.reshape(batch, -1, d)
    for b in range(batch):
        keep = idx[b] >= 0
        embeds[b, idx[b, keep]] += feats[b, keep]
    return embeds
