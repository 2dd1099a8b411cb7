"""TensorRT backend: the three engines of an artifact behind the Backend interface. Torch-free.

    TrtBackend ── _EngineRunner (vision_encoder)   contexts: one, profile "crops"
               ├─ _EngineRunner (connector)        contexts: one, profile "crops"
               └─ _EngineRunner (decoder)          contexts: prefill (profile 0), decode (1),
                                                   sharing one activation-memory block
    device memory (cuda_api): per-tensor I/O buffers sized from the profiles, one block for the
    KV cache of every layer, scratch for the `present.*` outputs; one CUDA stream.

Engines are deserialised once, after their build records were checked against this machine
(trt_env: TensorRT version, GPU, CUDA major, source-graph hash). Tensors are bound by address
(set_tensor_address) and run with execute_async_v3 on the one stream. Each context remembers what
it was told (_Bindings), so an address reaches TensorRT once per context and buffer, and a decode
step makes two TensorRT calls: the attention mask's new length, and the run itself.

KV cache (graph_io's convention): each layer's K and V live in a fixed device buffer
[batch, kv_heads, max_seq_len, head_dim] bound as `past_key_values.*` for the whole generation.
The engine writes the new tokens' K/V to scratch (`present.*`, dense [batch, kv, seq, hd]); one
pitched device-to-device copy per tensor then appends them at position `past`
(trt_buffers.present_to_cache_copy). Host traffic per decode step: one embedding row, the
position, the new attention-mask columns (trt_buffers.changed_span) and the logits.

CUDA graphs (cuda_graph=True, off by default): a captured graph replays fixed shapes, but the
attention length grows every step. So 1-token steps run at a padded length: total rounded up to
a bucket of `graph_bucket` positions, the mask padded so the result is unchanged
(trt_buffers.padded_decode_mask), and one graph captured per (batch, bucket) the first time it
is used, right after an ordinary run of that shape (TensorRT requires one before capture). A
captured run reads its context's state when launched, and the decode context is re-bound by
every other bucket (and every eager step) in between: so the context is bound to the graph's
shapes again before each replay (a no-op when they did not change). The
cache copies and uploads stay outside the graph, since their offsets change every step. Cost:
attention reads up to graph_bucket - 1 masked positions more per step; gain: one launch instead
of hundreds of kernel launches (which dominates small-batch decode on Jetson CPUs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from molmo_runtime import cuda_api
from molmo_runtime.backends.base import Backend, cache_shape
from molmo_runtime.errors import ArtifactError, InputError, MissingDependencyError
from molmo_runtime.graph_io import (
    CONNECTOR,
    DECODER,
    GRAPH_NAMES,
    VISION_ENCODER,
    GraphDims,
    GraphSpec,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)
from molmo_runtime.manifest import Manifest, VerifyMode, load_manifest
from molmo_runtime.trt_buffers import (
    KvCacheLayout,
    Profile,
    Shape,
    capacity_shapes,
    changed_span,
    chunks,
    decode_bucket,
    kv_cache_layout,
    numpy_dtype,
    padded_decode_mask,
    present_to_cache_copy,
    select_profile,
    volume,
)
from molmo_runtime.trt_env import (
    MachineInfo,
    collect_machine_info,
    missing_for_tensorrt,
    missing_message,
    require_matching_engines,
)

if TYPE_CHECKING:
    import tensorrt as trt

BUILD_HINT = "build them on this device: molmo-export --target trt-fp16 --from-onnx --out {out}"


class _DeviceBuffer:
    """One cudaMalloc'd region; grows (reallocates) only if asked for more."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = cuda_api.malloc(nbytes)
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            cuda_api.free(self.ptr)
        self.ptr, self.nbytes = 0, 0


def _dims_tuple(d: trt.Dims) -> Shape:
    return tuple(int(d[i]) for i in range(len(d)))


@dataclass(frozen=True)
class _IoTensor:
    name: str
    is_input: bool
    dtype: np.dtype


class _Bindings:
    """What one execution context has been told, so TensorRT is called only on a change.

    A context keeps its input shapes and tensor addresses between runs. Our buffers are
    allocated once at their largest (profile maxima), so each address is set once per context
    and per allocation; a decode step then changes one shape (the attention mask's length).
    """

    def __init__(self, ctx: trt.IExecutionContext, graph: str) -> None:
        self.ctx = ctx
        self.graph = graph
        self.shapes: dict[str, Shape] = {}
        self.addresses: dict[str, int] = {}

    def shape(self, name: str, shape: Shape) -> None:
        if self.shapes.get(name) == shape:
            return
        self.shapes.pop(name, None)  # unknown until TensorRT accepts it
        if not self.ctx.set_input_shape(name, shape):
            raise InputError(f"{self.graph}: TensorRT rejected shape {shape} for {name}")
        self.shapes[name] = shape

    def address(self, name: str, ptr: int) -> None:
        if self.addresses.get(name) == ptr:
            return
        self.addresses.pop(name, None)
        if not self.ctx.set_tensor_address(name, ptr):
            raise cuda_api.CudaError(f"{self.graph}: TensorRT refused the address of {name}")
        self.addresses[name] = ptr


class _EngineRunner:
    """An engine, one execution context per optimization profile, and its I/O buffers."""

    def __init__(self, runtime: trt.Runtime, plan: Path, spec: GraphSpec, stream: int) -> None:
        import tensorrt as trt

        self.spec = spec
        self.stream = stream
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialise {plan}; "
                                + BUILD_HINT.format(out=plan.parent.parent))
        self.engine = engine
        self.io: dict[str, _IoTensor] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self.io[name] = _IoTensor(name, is_input,
                                      numpy_dtype(engine.get_tensor_dtype(name).name))
        expected = {t.name for t in (*spec.inputs, *spec.outputs)}
        if set(self.io) != expected:
            raise ArtifactError(
                f"engine {plan.name} has I/O {sorted(self.io)}, the manifest's {spec.name} graph "
                f"has {sorted(expected)}; " + BUILD_HINT.format(out=plan.parent.parent))
        self.profiles: list[Profile] = []
        for p in range(engine.num_optimization_profiles):
            prof: Profile = {}
            for t in spec.inputs:
                lo, opt, hi = (_dims_tuple(d) for d in engine.get_tensor_profile_shape(t.name, p))
                prof[t.name] = (lo, opt, hi)
            self.profiles.append(prof)
        self._memory = _DeviceBuffer()
        self.contexts = self._make_contexts()
        self.bindings = [_Bindings(ctx, spec.name) for ctx in self.contexts]
        self._buffers: dict[str, _DeviceBuffer] = {}
        caps = capacity_shapes(spec, self.profiles)
        self.capacity = {n: volume(caps[n]) * t.dtype.itemsize for n, t in self.io.items()}

    def _make_contexts(self) -> list[trt.IExecutionContext]:
        """One context per profile, its profile selected once. They never run concurrently (one
        stream), so several share one activation-memory block that we own (USER_MANAGED),
        sized by device_memory_size_v2: the most any profile needs. Both names exist from
        TensorRT 10.1 to 11 (their predecessors are gone in 11; docs/tensorrt.md)."""
        import tensorrt as trt

        engine = self.engine
        n = engine.num_optimization_profiles
        shared = n > 1
        contexts = []
        for _ in range(n):
            ctx = (engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED) if shared
                else engine.create_execution_context())
            if ctx is None:
                raise ArtifactError(f"TensorRT could not create an execution context for "
                                    f"{self.spec.name} (out of device memory?)")
            contexts.append(ctx)
        if shared:
            size = int(engine.device_memory_size_v2)
            ptr = self._memory.ensure(size)
            for ctx in contexts:
                ctx.set_device_memory(ptr, size)
        for p, ctx in enumerate(contexts):
            if not ctx.set_optimization_profile_async(p, self.stream):
                raise ArtifactError(f"{self.spec.name}: cannot select optimization profile {p}")
        return contexts

    def buffer(self, name: str, nbytes: int) -> int:
        """Device address of `name`'s buffer, (re)allocated to hold at least nbytes."""
        return self._buffers.setdefault(name, _DeviceBuffer()).ensure(nbytes)

    def ptr(self, name: str) -> int:
        return self._buffers[name].ptr

    def execute(self, profile: int) -> None:
        if not self.contexts[profile].execute_async_v3(self.stream):
            raise cuda_api.CudaError(f"{self.spec.name}: TensorRT execution failed")

    def max_dim(self, input_name: str, axis: int) -> int:
        return max(p[input_name][2][axis] for p in self.profiles)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on host arrays and return host arrays (vision encoder, connector)."""
        shapes = {n: a.shape for n, a in feeds.items()}
        profile = select_profile(self.profiles, shapes, self.spec.name)
        bound = self.bindings[profile]
        hosts = []  # keep the staged arrays alive until the stream is synchronised
        for name, array in feeds.items():
            host = np.ascontiguousarray(array, dtype=self.io[name].dtype)
            ptr = self.buffer(name, max(host.nbytes, self.capacity[name]))
            cuda_api.memcpy_htod_async(ptr, host, self.stream)
            bound.shape(name, host.shape)
            bound.address(name, ptr)
            hosts.append(host)
        outputs = {}
        for t in self.io.values():
            if t.is_input:
                continue
            shape = _dims_tuple(self.contexts[profile].get_tensor_shape(t.name))
            out = np.empty(shape, t.dtype)
            bound.address(t.name, self.buffer(t.name, max(out.nbytes, self.capacity[t.name])))
            outputs[t.name] = out
        self.execute(profile)
        for name, out in outputs.items():
            cuda_api.memcpy_dtoh_async(out, self.ptr(name), self.stream)
        cuda_api.stream_synchronize(self.stream)
        return outputs

    def close(self) -> None:
        self.bindings.clear()
        self.contexts.clear()
        del self.engine
        for b in self._buffers.values():
            b.free()
        self._memory.free()


@dataclass
class _CapturedStep:
    graph: int
    graph_exec: int


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, manifest: Manifest, *, device: int = 0, cuda_graph: bool = False,
                 graph_bucket: int = 128, machine: MachineInfo | None = None) -> None:
        missing = missing_for_tensorrt()
        if missing:
            raise MissingDependencyError(missing_message("the TensorRT backend", missing))
        out = str(manifest.directory)
        engines = manifest.raw.get("engines") or {}
        absent = [g for g in GRAPH_NAMES if g not in engines]
        if absent:
            raise ArtifactError(f"{out} has no TensorRT engine for {', '.join(absent)}; "
                                + BUILD_HINT.format(out=out))
        require_matching_engines(engines, machine or collect_machine_info(device),
                                 manifest.files, out)
        import tensorrt as trt

        cuda_api.set_device(device)
        self.dims: GraphDims = manifest.dims
        self.cuda_graph = cuda_graph
        self.graph_bucket = graph_bucket
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._stream = cuda_api.stream_create()
        specs = manifest.graphs
        self._runners = {g: _EngineRunner(self._runtime, manifest.path(engines[g]["file"]),
                                          specs[g], self._stream) for g in GRAPH_NAMES}
        self._decoder = self._runners[DECODER]
        self.max_prefill_tokens = self._decoder.max_dim("inputs_embeds", 1)
        self._kv_dtype = self._decoder.io[past_key_name(0)].dtype
        present = self._decoder.io[present_key_name(0)].dtype
        if present != self._kv_dtype:  # the append copies bytes: the two must agree
            raise ArtifactError(f"decoder engine: present K/V are {present}, the cache "
                                f"{self._kv_dtype}; " + BUILD_HINT.format(out=out))
        self._kv: KvCacheLayout | None = None
        self._kv_mem = _DeviceBuffer()
        self._scratch = _DeviceBuffer()
        self._scratch_stride = 0
        self._batch = 0
        self._cache_len = 0
        self._mask_on_device: np.ndarray | None = None
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}

    @classmethod
    def from_dir(cls, artifact_dir: str | os.PathLike[str], *, verify: VerifyMode = "size",
                 device: int = 0, cuda_graph: bool = False) -> TrtBackend:
        return cls(load_manifest(artifact_dir, verify=verify), device=device,
                   cuda_graph=cuda_graph)

    # -- vision --------------------------------------------------------------------------------

    def _run_crops(self, graph: str, feeds: Mapping[str, np.ndarray], out_name: str) -> np.ndarray:
        runner = self._runners[graph]
        first = next(iter(feeds.values()))
        if first.ndim == 0 or first.shape[0] == 0:
            raise InputError(f"{graph}: no crops to run (got shape {first.shape})")
        parts = [runner.run({n: a[s:e] for n, a in feeds.items()})[out_name]
                 for s, e in chunks(first.shape[0], runner.max_dim(next(iter(feeds)), 0))]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def vision(self, images: np.ndarray) -> np.ndarray:
        return self._run_crops(VISION_ENCODER, {"images": images}, "image_features")

    def connector(self, image_features: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        if image_features.shape[0] != image_masks.shape[0]:
            raise InputError(f"image_features has {image_features.shape[0]} crops, image_masks "
                             f"{image_masks.shape[0]}")
        return self._run_crops(CONNECTOR, {"image_features": image_features,
                                           "image_masks": image_masks}, "image_tokens")

    # -- decoder -------------------------------------------------------------------------------

    def start(self, batch: int) -> None:
        max_batch = self._decoder.max_dim("inputs_embeds", 0)
        if not 1 <= batch <= max_batch:
            raise InputError(f"batch {batch} is outside 1..{max_batch} of the decoder engine; "
                             "rebuild the engines with max_batch >= "
                             f"{batch} (molmo_export.trt.build_engines)")
        if batch != self._batch:
            self._allocate(batch)
        self._cache_len = 0

    def _allocate(self, batch: int) -> None:
        self._release_graphs()
        d = self.dims
        itemsize = self._kv_dtype.itemsize
        self._kv = kv_cache_layout(d, batch, itemsize)
        self._kv_mem.ensure(self._kv.total_bytes)
        # Zeroed once: masked positions a padded (graph) step reads must hold finite values.
        cuda_api.memset_async(self._kv_mem.ptr, 0, self._kv.total_bytes, self._stream)
        caps = capacity_shapes(self._decoder.spec, self._decoder.profiles, {"batch": batch})
        present_bytes = volume(caps[present_key_name(0)]) * itemsize
        self._scratch_stride = -(-present_bytes // 256) * 256
        self._scratch.ensure(2 * d.num_layers * self._scratch_stride)
        for name in ("inputs_embeds", "attention_mask", "position_ids", "logits"):
            self._decoder.buffer(name, volume(caps[name]) * self._decoder.io[name].dtype.itemsize)
        self._mask_on_device = None
        self._batch = batch
        cuda_api.stream_synchronize(self._stream)

    @property
    def cache_length(self) -> int:
        return self._cache_len

    def _check_decode_inputs(self, embeds: np.ndarray, mask: np.ndarray,
                             positions: np.ndarray) -> int:
        if self._kv is None:
            raise InputError("call start(batch) before decode()")
        b, seq = embeds.shape[0], embeds.shape[1] if embeds.ndim == 3 else -1
        total = self._cache_len + seq
        if (embeds.ndim != 3 or embeds.shape[2] != self.dims.d_model or b != self._batch
                or mask.shape != (b, total) or positions.shape != (b, seq)):
            raise InputError(
                f"decode expects inputs_embeds [{self._batch}, seq, {self.dims.d_model}], "
                f"attention_mask [{self._batch}, cache_length + seq = {self._cache_len} + seq], "
                f"position_ids [{self._batch}, seq]; got {embeds.shape}, {mask.shape}, "
                f"{positions.shape}")
        if total > self.dims.max_seq_len:
            raise InputError(f"{total} positions exceed the KV cache ({self.dims.max_seq_len}, "
                             "max_seq_len); shorten the prompt or max_new_tokens")
        return seq

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        seq = self._check_decode_inputs(inputs_embeds, attention_mask, position_ids)
        runner, b, past = self._decoder, self._batch, self._cache_len
        mask = attention_mask.astype(np.int64, copy=False)
        use_graph = self.cuda_graph and seq == 1
        if use_graph:
            bucket = decode_bucket(past + 1, self.graph_bucket, self.dims.max_seq_len)
            mask = padded_decode_mask(mask, bucket)
        shapes = {"inputs_embeds": inputs_embeds.shape, "attention_mask": mask.shape,
                  "position_ids": position_ids.shape}
        profile = select_profile(runner.profiles, shapes, DECODER)
        hosts = self._upload(inputs_embeds, mask, position_ids)
        key = (b, mask.shape[1])
        # Bound before every run, a replay included: a captured TensorRT run reads the state of
        # its context (shapes, addresses) when it is launched, and other buckets may have
        # re-bound the context since the capture. Only what changed reaches TensorRT.
        self._bind_decoder(runner.bindings[profile], seq, mask.shape[1])
        if use_graph and key in self._graphs:
            cuda_api.graph_launch(self._graphs[key].graph_exec, self._stream)
        else:
            runner.execute(profile)
            if use_graph:
                self._graphs[key] = self._capture(profile)
        self._append_present(past, seq)
        logits = np.empty((b, 1, self.dims.vocab_rows), runner.io["logits"].dtype)
        cuda_api.memcpy_dtoh_async(logits, runner.ptr("logits"), self._stream)
        cuda_api.stream_synchronize(self._stream)
        del hosts
        self._cache_len = past + seq
        return logits[:, 0, :].astype(np.float32, copy=False)

    def _upload(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray
                ) -> list[np.ndarray]:
        runner = self._decoder
        io = runner.io
        e = np.ascontiguousarray(embeds, dtype=io["inputs_embeds"].dtype)
        p = np.ascontiguousarray(positions, dtype=io["position_ids"].dtype)
        m = np.ascontiguousarray(mask, dtype=io["attention_mask"].dtype)
        cuda_api.memcpy_htod_async(runner.ptr("inputs_embeds"), e, self._stream)
        cuda_api.memcpy_htod_async(runner.ptr("position_ids"), p, self._stream)
        hosts = [e, p]
        span = changed_span(self._mask_on_device, m)
        if span is not None:
            lo, hi = span
            part = np.ascontiguousarray(m.reshape(-1)[lo:hi])
            cuda_api.memcpy_htod_async(runner.ptr("attention_mask") + lo * m.itemsize,
                                       part, self._stream)
            hosts.append(part)
        self._mask_on_device = m.reshape(-1).copy()
        return hosts

    def _bind_decoder(self, bound: _Bindings, seq: int, total: int) -> None:
        """Shapes and addresses of a decoder run. The addresses (fixed buffers, the KV cache,
        the present scratch) reach TensorRT once per context and allocation; per decode step
        only the attention mask's length changes (one set_input_shape call)."""
        runner, b, d = self._decoder, self._batch, self.dims
        assert self._kv is not None
        bound.shape("inputs_embeds", (b, seq, d.d_model))
        bound.shape("attention_mask", (b, total))
        bound.shape("position_ids", (b, seq))
        for name in ("inputs_embeds", "attention_mask", "position_ids", "logits"):
            bound.address(name, runner.ptr(name))
        shape = cache_shape(d, b)
        base = self._kv_mem.ptr
        for i in range(d.num_layers):
            for name, offset in ((past_key_name(i), self._kv.key_offsets[i]),
                                 (past_value_name(i), self._kv.value_offsets[i])):
                bound.shape(name, shape)
                bound.address(name, base + offset)
            bound.address(present_key_name(i), self._scratch_ptr(2 * i))
            bound.address(present_value_name(i), self._scratch_ptr(2 * i + 1))

    def _scratch_ptr(self, k: int) -> int:
        return self._scratch.ptr + k * self._scratch_stride

    def _append_present(self, past: int, seq: int) -> None:
        """Write the step's present K/V into the cache at [past, past + seq)."""
        assert self._kv is not None
        c = present_to_cache_copy(self.dims, self._batch, past, seq, self._kv_dtype.itemsize)
        base = self._kv_mem.ptr
        for i in range(self.dims.num_layers):
            for k, dst in ((2 * i, self._kv.key_offsets[i]), (2 * i + 1, self._kv.value_offsets[i])):
                cuda_api.memcpy_2d_dtod_async(base + dst + c.dst_offset, c.dst_pitch,
                                              self._scratch_ptr(k) + c.src_offset, c.src_pitch,
                                              c.width, c.height, self._stream)

    def _capture(self, profile: int) -> _CapturedStep:
        """Capture the engine run just made (same shapes and addresses) as a CUDA graph."""
        cuda_api.stream_begin_capture(self._stream)
        try:
            self._decoder.execute(profile)
        finally:
            graph = cuda_api.stream_end_capture(self._stream)
        return _CapturedStep(graph, cuda_api.graph_instantiate(graph))

    def _release_graphs(self) -> None:
        for g in self._graphs.values():
            cuda_api.graph_exec_destroy(g.graph_exec)
            cuda_api.graph_destroy(g.graph)
        self._graphs.clear()

    def close(self) -> None:
        cuda_api.stream_synchronize(self._stream)
        self._release_graphs()
        for r in self._runners.values():
            r.close()
        self._runners.clear()
        self._kv_mem.free()
        self._scratch.free()
        cuda_api.stream_destroy(self._stream)
