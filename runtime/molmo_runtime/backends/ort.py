"""ONNX Runtime runner: three sessions built once, a preallocated host KV cache bound by address.

The decoder's `past_key_values.*` inputs are bound (IOBinding) to the cache arrays themselves,
whole: the graph reads their valid prefix (graph_io's shared-buffer convention), so a decode step
copies only the new token's K/V into place (O(1) in the context length) and never reallocates.
With the "ort" decoder flavour the `present.*` outputs are bound to the same arrays too, and the
graph's GroupQueryAttention writes the new K/V in place: no copy at all.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from molmo_runtime.backends.base import Backend, cache_shape
from molmo_runtime.errors import InputError, require
from molmo_runtime.graph_io import CONNECTOR, DECODER, VISION_ENCODER
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


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, manifest: Manifest, providers: list[str] | None = None,
                 threads: int | None = None,
                 graphs: tuple[str, ...] = (VISION_ENCODER, CONNECTOR, DECODER),
                 profile_prefix: str | None = None) -> None:
        ort: Any = require("onnxruntime", "ort", "the ONNX Runtime backend")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profile_prefix:  # ORT's profiler (benchmarks count the nodes a step runs)
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.providers = providers or default_providers()
        self.dims = manifest.dims
        specs = manifest.graphs
        self._sessions = {
            name: ort.InferenceSession(str(manifest.path(specs[name].file)), options,
                                       providers=self.providers)
            for name in graphs  # all three, or a subset for tools that check one graph
        }
        spec = specs[DECODER]
        self._in_place = manifest.decoder_flavour == "ort"
        self._past_names = [t.name for t in spec.inputs[3:]]
        self._output_names = [t.name for t in spec.outputs]
        self._cache: list[np.ndarray] = []  # 2 * num_layers arrays [B, kv, max_seq, hd]
        self._binding: Any = None
        self._length = 0

    def end_profiling(self) -> str:
        """Stop the decoder session's profiler; -> the JSON trace it wrote."""
        return str(self._sessions[DECODER].end_profiling())

    def vision(self, images: np.ndarray) -> np.ndarray:
        return self._sessions[VISION_ENCODER].run(None, {"images": images})[0]

    def connector(self, image_features: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        feeds = {"image_features": image_features, "image_masks": image_masks}
        return self._sessions[CONNECTOR].run(None, feeds)[0]

    def start(self, batch: int) -> None:
        if not self._cache or self._cache[0].shape[0] != batch:
            shape = cache_shape(self.dims, batch)
            self._cache = [np.zeros(shape, np.float32) for _ in self._past_names]
            self._binding = self._sessions[DECODER].io_binding()
            for name, arr in zip(self._past_names, self._cache):
                self._binding.bind_cpu_input(name, arr)  # shares the array's memory
            if self._in_place:  # present.* = the same arrays, written in place by the graph
                self._binding.bind_output(self._output_names[0])  # logits: get_outputs()[0]
                for name, arr in zip(self._output_names[1:], self._cache):
                    self._binding.bind_output(name, "cpu", 0, np.float32, list(arr.shape),
                                              arr.ctypes.data)
        self._length = 0

    @property
    def cache_length(self) -> int:
        return self._length

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        batch, seq, _ = inputs_embeds.shape
        past = self._length
        if not self._cache or self._cache[0].shape[0] != batch:
            raise InputError("decode() called without start(batch) for this batch size")
        if past + seq > self.dims.max_seq_len:
            raise InputError(f"sequence of {past + seq} tokens exceeds the artifact's "
                             f"max_seq_len {self.dims.max_seq_len}")
        b = self._binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        if not self._in_place:
            b.clear_binding_outputs()  # outputs change shape with seq: let ORT allocate them
            for name in self._output_names:
                b.bind_output(name)
        self._sessions[DECODER].run_with_iobinding(b)
        outputs = b.get_outputs()
        if not self._in_place:
            for cache, new in zip(self._cache, outputs[1:]):
                cache[:, :, past:past + seq] = new.numpy()  # [B, kv, seq, hd]
        self._length = past + seq
        # a copy: with bound outputs ORT may reuse the logits buffer in the next run
        return np.array(outputs[0].numpy()[:, -1])  # [B, V]
