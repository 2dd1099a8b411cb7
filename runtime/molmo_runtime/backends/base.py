"""The one small interface the ORT and TensorRT runners share (they are peers).

A backend owns its sessions/engines and KV caches (host memory for ORT, device memory for
TensorRT). The pipeline does everything else in numpy: preprocessing, embedding gather, image
token injection, sampling. Shapes follow molmo_runtime.graph_io.

Each generation decodes through a DecodeState of its own (`new_state`), so several generations
can share one backend: concurrently where the backend allows it (ORT), one at a time otherwise
(the default, see `new_state`). `start`/`decode`/`cache_length` are the older single-sequence
form (one implicit state), kept for verification and benchmarks that drive the decoder directly.
"""

from __future__ import annotations

import abc
import math
import os
import threading
from types import TracebackType

import numpy as np

from molmo_runtime.errors import ArtifactError, MolmoError
from molmo_runtime.graph_io import GraphDims


def cache_shape(dims: GraphDims, batch: int) -> tuple[int, int, int, int]:
    """Shape of one layer's preallocated K (or V) cache: [batch, kv_heads, max_seq_len, head_dim]."""
    return (batch, dims.num_kv_heads, dims.max_seq_len, dims.head_dim)


def physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None  # not a POSIX system: no bound known


def check_cache_size(dims: GraphDims, batch: int, itemsize: int,
                     limit_bytes: int | None = None, memory: str = "memory") -> int:
    """Bytes of one generation's K and V caches, all layers; ArtifactError before allocating
    if they exceed `limit_bytes` (default: this machine's physical memory)."""
    nbytes = 2 * dims.num_layers * math.prod(cache_shape(dims, batch)) * itemsize
    limit = physical_memory_bytes() if limit_bytes is None else limit_bytes
    if limit is not None and nbytes > limit:
        raise ArtifactError(
            f"the KV cache for {batch} row(s) of max_seq_len {dims.max_seq_len} needs "
            f"{nbytes / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB of {memory} here: "
            "re-export with a --max-seq-len that fits the prompts and answers you need"
            + (", or pass fewer rows" if batch > 1 else ""))
    return nbytes


class DecodeState(abc.ABC):
    """One generation's KV cache: `decode` runs the decoder on new positions and appends their
    K/V. Close it (or use `with`) to hand its memory back to the backend for reuse."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Number of positions already held in the cache."""

    @abc.abstractmethod
    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        """As Backend.decode."""

    def close(self) -> None:
        """Give the cache back (idempotent)."""

    def __enter__(self) -> DecodeState:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Gate:
    """A lock that knows its holder, so that a second hold from the same thread (which would
    wait forever) is an error instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self, backend: str) -> None:
        if self._owner == threading.get_ident():
            raise MolmoError(
                f"the {backend} backend keeps a single KV cache and this thread's other "
                "generation (an unfinished stream) holds it: finish or close that stream first, "
                "or use the ORT backend, which runs interleaved generations")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def release(self) -> None:
        self._owner = None
        self._lock.release()


class _ExclusiveState(DecodeState):
    """The backend's single cache (start/decode), held exclusively until closed."""

    def __init__(self, backend: Backend, batch: int) -> None:
        self._gate: _Gate | None = backend.__dict__.setdefault("_exclusive_gate", _Gate())
        assert self._gate is not None
        self._gate.acquire(backend.name)
        self._backend = backend
        try:
            backend.start(batch)
        except BaseException:
            self.close()
            raise

    @property
    def length(self) -> int:
        return self._backend.cache_length

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        if self._gate is None:
            raise MolmoError("decode() on a closed DecodeState")
        return self._backend.decode(inputs_embeds, attention_mask, position_ids)

    def close(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()


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

    def new_state(self, batch: int) -> DecodeState:
        """An empty KV cache of its own for one generation of `batch` rows.

        Backends that can decode several sequences at once override this (ORT). The default
        serves backends with one cache (TensorRT's device buffers, test fakes): the state holds
        the backend until closed; another thread waits for it, and a second state opened by the
        thread that holds the first (two interleaved streams) raises MolmoError instead of
        waiting forever."""
        return _ExclusiveState(self, batch)

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
