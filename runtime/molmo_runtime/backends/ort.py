"""ONNX Runtime runner: three sessions built once; per generation, a preallocated host KV cache
bound by address.

The decoder's `past_key_values.*` inputs are bound (IOBinding) to the cache arrays themselves,
whole: the graph reads their valid prefix (graph_io's shared-buffer convention), so a decode step
copies only the new token's K/V into place (O(1) in the context length) and never reallocates.

Threads: an ORT InferenceSession serves concurrent run() calls, so the sessions are shared and
each generation gets its own cache and IOBinding (_OrtState). Finished generations hand their
cache back to a small pool, so sequential generations reuse one allocation; N concurrent
generations hold N caches.

With the "ort" decoder flavour (graph_io) the `present.*` outputs are bound to the same arrays
too, and the graph's GroupQueryAttention writes the new K/V in place: no copy at all.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from molmo_runtime import mapped_files
from molmo_runtime.backends.base import Backend, DecodeState, cache_shape, check_cache_size
from molmo_runtime.errors import InputError, require
from molmo_runtime.graph_io import CONNECTOR, DECODER, VISION_ENCODER
from molmo_runtime.huge_pages import collapse_new_memory, enabled_by_env
from molmo_runtime.manifest import Manifest


def physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return os.cpu_count() or 1


def default_providers() -> list[str]:
    ort: Any = require("onnxruntime", "ort", "the ONNX Runtime backend")
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(ort: Any, threads: int, profile_prefix: str | None,
                    keep_spinning: bool) -> Any:
    """ONNX Runtime session options of one graph. ORT's intra-op pool keeps spinning for ~30 ms
    after a run, a whole core's worth. The decoder keeps that (its next step follows within a
    millisecond); the vision encoder and connector run once per request and are followed by
    another session's run, which their spinning worker would leave one core of two on a
    2-core machine: stopping it when the run ends cut the connector's time after the vision
    encoder by half or more, and TTFT by 7-10 % at bench-0.5b (docs/runtime.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not keep_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix:  # ORT's profiler (benchmarks count the nodes a step runs)
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None,
                 graphs: tuple[str, ...] = (VISION_ENCODER, CONNECTOR, DECODER),
                 profile_prefix: str | None = None, huge_pages: bool | None = None,
                 page_out: bool | None = None) -> None:
        ort: Any = require("onnxruntime", "ort", "the ONNX Runtime backend")
        self.providers = providers or default_providers()
        self.dims = manifest.dims
        specs = manifest.graphs

        self.page_outs: dict[str, mapped_files.PageOut] = {}
        page_out = mapped_files.enabled_by_env() if page_out is None else page_out
        threads = threads or physical_cores()

        def session(name: str) -> Any:
            path = manifest.graph_path(specs[name])
            options = session_options(ort, threads, profile_prefix,
                                      keep_spinning=name == DECODER)
            with mapped_files.page_out_files(mapped_files.data_files(path),
                                             page_out) as self.page_outs[name]:
                return ort.InferenceSession(str(path), options, providers=self.providers)

        # all three, or a subset for tools that check one graph; the decoder last, so that the
        # memory mapped while building it is its own (huge_pages)
        self._sessions = {name: session(name) for name in graphs if name != DECODER}
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        with collapse_new_memory(on_cpu and (enabled_by_env() if huge_pages is None
                                             else huge_pages)) as self.huge_pages:
            if DECODER in graphs:
                self._sessions[DECODER] = session(DECODER)
        spec = specs[DECODER]
        self._in_place = manifest.decoder_flavour == "ort"
        self._past_names = [t.name for t in spec.inputs[3:]]
        self._output_names = [t.name for t in spec.outputs]
        # Idle caches of finished generations, reused by the next ones (flat memory over many
        # generations); at most _POOL_SIZE are kept.
        self._pool: list[list[np.ndarray]] = []
        self._pool_lock = threading.Lock()
        self._state: _OrtState | None = None  # the implicit state of start()/decode()

    def end_profiling(self) -> str:
        """Stop the decoder session's profiler; -> the JSON trace it wrote."""
        return str(self._sessions[DECODER].end_profiling())

    def vision(self, images: np.ndarray) -> np.ndarray:
        return self._sessions[VISION_ENCODER].run(None, {"images": images})[0]

    def connector(self, image_features: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        feeds = {"image_features": image_features, "image_masks": image_masks}
        return self._sessions[CONNECTOR].run(None, feeds)[0]

    def new_state(self, batch: int) -> _OrtState:
        """A KV cache and IOBinding of this generation's own: ORT sessions serve concurrent
        run() calls, so generations in several threads (or interleaved streams) decode at once."""
        return _OrtState(self, batch)

    def _take_cache(self, batch: int) -> list[np.ndarray]:
        with self._pool_lock:
            for i, cache in enumerate(self._pool):
                if cache[0].shape[0] == batch:
                    return self._pool.pop(i)
        # The cache's dtype is the graph's (fp16 in the fp16 graphs TensorRT builds from).
        types = {i.name: i.type for i in self._sessions[DECODER].get_inputs()}
        dtype = np.float16 if types[self._past_names[0]] == "tensor(float16)" else np.float32
        check_cache_size(self.dims, batch, np.dtype(dtype).itemsize)
        shape = cache_shape(self.dims, batch)
        return [np.zeros(shape, dtype) for _ in self._past_names]

    def _return_cache(self, cache: list[np.ndarray]) -> None:
        with self._pool_lock:
            self._pool.append(cache)
            del self._pool[:-_POOL_SIZE]

    def start(self, batch: int) -> None:
        if self._state is not None:
            self._state.close()
        self._state = self.new_state(batch)

    @property
    def cache_length(self) -> int:
        return self._state.length if self._state is not None else 0

    @property
    def _cache(self) -> list[np.ndarray]:
        """The implicit state's K/V arrays (molmo_export.verify compares them with the
        reference's present K/V)."""
        if self._state is None or self._state.cache is None:
            raise InputError("no cache: call start(batch) first")
        return self._state.cache

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        if self._state is None:
            raise InputError("decode() called without start(batch)")
        return self._state.decode(inputs_embeds, attention_mask, position_ids)


_POOL_SIZE = 4


class _OrtState(DecodeState):
    """One generation's host KV cache, bound by address to an IOBinding of its own."""

    def __init__(self, backend: OrtBackend, batch: int) -> None:
        self._backend = backend
        self._session = backend._sessions[DECODER]
        self._cache: list[np.ndarray] | None = backend._take_cache(batch)
        self._binding = self._session.io_binding()
        for name, arr in zip(backend._past_names, self._cache):
            self._binding.bind_cpu_input(name, arr)  # shares the array's memory
        self._in_place = backend._in_place
        self._logits: np.ndarray | None = None
        if self._in_place:  # present.* = the same arrays, written in place by the graph
            names = backend._output_names
            # the graph's logits are the last position's, [B, 1, V] at every call: one buffer
            # bound once, so a step neither allocates them nor wraps 1 + 2 x layers outputs
            self._logits = np.empty((batch, 1, backend.dims.vocab_rows), np.float32)
            for name, arr in zip(names, [self._logits, *self._cache]):
                self._binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape),
                                          arr.ctypes.data)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def cache(self) -> list[np.ndarray] | None:
        """[B, kv_heads, max_seq_len, head_dim] per K and V of each layer; None once closed."""
        return self._cache

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        batch, seq, _ = inputs_embeds.shape
        past = self._length
        max_seq_len = self._backend.dims.max_seq_len
        if self._cache is None:
            raise InputError("decode() on a closed decode state")
        if self._cache[0].shape[0] != batch:
            raise InputError(f"decode() got {batch} rows; this state was started for "
                             f"{self._cache[0].shape[0]}")
        if past + seq > max_seq_len:
            raise InputError(f"sequence of {past + seq} tokens exceeds the artifact's "
                             f"max_seq_len {max_seq_len}")
        b = self._binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        if not self._in_place:
            b.clear_binding_outputs()  # outputs change shape with seq: let ORT allocate them
            for name in self._backend._output_names:
                b.bind_output(name)
        self._session.run_with_iobinding(b)
        self._length = past + seq
        if self._logits is not None:
            return self._logits[:, -1].copy()  # [B, V]; the buffer is the next step's too
        outputs = b.get_outputs()
        for cache, new in zip(self._cache, outputs[1:]):
            cache[:, :, past:past + seq] = new.numpy()  # [B, kv, seq, hd]
        # a copy: with bound outputs ORT may reuse the logits buffer in the next run
        return np.array(outputs[0].numpy()[:, -1])  # [B, V]

    def close(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None:
            self._backend._return_cache(cache)
