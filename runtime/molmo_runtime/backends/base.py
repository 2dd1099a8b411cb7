"""The one small interface the ORT and TensorRT runners share (they are peers).

A backend owns its sessions/engines and its KV cache (host memory for ORT, device memory for
TensorRT). The pipeline does everything else in numpy: preprocessing, embedding gather, image
token injection, sampling. Shapes follow molmo_runtime.graph_io.
"""

from __future__ import annotations

import abc

import numpy as np

from molmo_runtime.graph_io import GraphDims


def cache_shape(dims: GraphDims, batch: int) -> tuple[int, int, int, int]:
    """Shape of one layer's preallocated K (or V) cache: [batch, kv_heads, max_seq_len, head_dim]."""
    return (batch, dims.num_kv_heads, dims.max_seq_len, dims.head_dim)


class Backend(abc.ABC):
    name: str = "base"
    # Most new positions one decode() call takes (TensorRT: the prefill profile's maximum);
    # None = no limit. Longer prompts are prefilled in chunks (molmo_runtime.prefill). Set it
    # on any backend to bound prefill activation memory (a Jetson's shared DRAM).
    max_prefill_tokens: int | None = None

    @abc.abstractmethod
    def vision(self, images: np.ndarray) -> np.ndarray:
        """images [crops, 576, 588] f32 -> image_features [crops, 576, F] f32."""

    @abc.abstractmethod
    def connector(self, image_features: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        """image_features [crops, 576, F], image_masks [crops, 576] -> image_tokens [crops, 144, D]."""

    @abc.abstractmethod
    def start(self, batch: int) -> None:
        """Begin a new sequence batch: the cache becomes empty (no reallocation if it fits)."""

    @property
    @abc.abstractmethod
    def cache_length(self) -> int:
        """Number of positions already held in the KV cache."""

    @abc.abstractmethod
    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        """Run the decoder on `seq` new positions and append their K/V to the cache.

        inputs_embeds [B, seq, D] f32, attention_mask [B, cache_length + seq] int64,
        position_ids [B, seq] int64 -> logits of the last position [B, vocab] f32.
        """

    def close(self) -> None:
        """Release sessions and memory (optional)."""
