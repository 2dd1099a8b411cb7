"""A stand-in for `tensorrt` and `molmo_runtime.cuda_api` that runs on a CPU, for tests.

It is not TensorRT: an "engine" is the (fp16) ONNX graph the builder would hand to TensorRT, run
by onnxruntime, and "device memory" is host bytes addressed by fake pointers. What it checks is
everything around the engine that our code does: the builder's calls and profiles, plan files
and build records, and the runner's buffer sizes, bindings by address, profile selection (a
shape outside the context's profile is rejected, as TensorRT does), KV-cache appends by pitched
copies, mask uploads, and CUDA-graph capture/replay.

CUDA graphs: a captured TensorRT run reads its context's state (profile, input shapes, tensor
addresses) when the graph is launched, while its kernels were chosen for the state at capture
(TensorRT-Edge-LLM re-binds its context before every replay for this reason). So a replay here
computes from the context's state at launch and fails loudly if that state is not the one
captured: a runner that replays without re-binding is caught.

Every call our code makes on an execution context is counted (FakeCuda.trt_calls), so tests can
state the TensorRT calls per decoded token.

API names mirror TensorRT `version` (make_module): from 11.0 the names TensorRT 11 removed
(ICudaEngine.device_memory_size, IExecutionContext.device_memory) raise AttributeError, so code
that so much as reads one fails (the real stubs check the rest, via mypy).
"""

from __future__ import annotations

import bisect
import importlib.machinery
import json
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from molmo_runtime.trt_env import MachineInfo

PLAN_MAGIC = b"FAKEPLAN"
MACHINE = MachineInfo(trt_version="10.3.0.30", cuda_runtime_version="12.6",
                      cuda_driver_version="12.6", gpu_name="Fake GPU", compute_capability="8.7")
_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}
_TRT_TO_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32,
              "BOOL": np.bool_}


# -- device memory ---------------------------------------------------------------------------------

class FakeCuda:
    """Replaces the functions of molmo_runtime.cuda_api (monkeypatch them onto the module)."""

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self._bases: list[int] = []
        self._next = 0x10000
        self.capturing: list[Callable[[], None]] | None = None
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.launches = 0
        self.htod_bytes = 0
        self.freed: list[int] = []
        self.trt_calls: Counter[str] = Counter()  # execution-context method -> calls

    # memory
    def malloc(self, nbytes: int) -> int:
        ptr = self._next
        self.blocks[ptr] = np.zeros(max(nbytes, 1), np.uint8)
        bisect.insort(self._bases, ptr)
        self._next += -(-max(nbytes, 1) // 4096) * 4096 + 4096  # a gap between blocks
        return ptr

    def free(self, ptr: int) -> None:
        del self.blocks[ptr]
        self._bases.remove(ptr)
        self.freed.append(ptr)

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        i = bisect.bisect_right(self._bases, ptr) - 1
        if i < 0:
            raise AssertionError(f"address {ptr:#x} is not in any allocation")
        base = self._bases[i]
        block = self.blocks[base]
        off = ptr - base
        if off + nbytes > block.size:
            raise AssertionError(f"access [{off}, {off + nbytes}) past the end of a "
                                 f"{block.size}-byte allocation")
        return block[off:off + nbytes]

    def read(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        return self.view(ptr, n).view(dt).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self.view(ptr, a.nbytes)[:] = a.reshape(-1).view(np.uint8)

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: int) -> None:
        assert self.capturing is None, "host copies are kept out of captured graphs"
        self.htod_bytes += src.nbytes
        self.write(dst, src)

    def memcpy_dtoh_async(self, dst: np.ndarray, src: int, stream: int) -> None:
        dst.reshape(-1).view(np.uint8)[:] = self.view(src, dst.nbytes)

    def memcpy_dtod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.view(dst, nbytes)[:] = self.view(src, nbytes).copy()

    def memcpy_2d_dtod_async(self, dst: int, dst_pitch: int, src: int, src_pitch: int,
                             width: int, height: int, stream: int) -> None:
        assert width <= dst_pitch and width <= src_pitch
        for r in range(height):
            self.view(dst + r * dst_pitch, width)[:] = self.view(src + r * src_pitch, width).copy()

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self.view(ptr, nbytes)[:] = value

    # streams and graphs
    def stream_create(self) -> int:
        return 7

    def stream_synchronize(self, stream: int) -> None:
        pass

    def stream_destroy(self, stream: int) -> None:
        pass

    def set_device(self, device: int) -> None:
        pass

    def stream_begin_capture(self, stream: int) -> None:
        self.capturing = []

    def stream_end_capture(self, stream: int) -> int:
        assert self.capturing is not None
        gid = len(self.graphs) + 1
        self.graphs[gid] = self.capturing
        self.capturing = None
        return gid

    def graph_instantiate(self, graph: int) -> int:
        return 1000 + graph

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self.launches += 1
        for op in self.graphs[graph_exec - 1000]:
            op()

    def graph_exec_destroy(self, graph_exec: int) -> None:
        pass

    def graph_destroy(self, graph: int) -> None:
        pass

    def install(self, monkeypatch: Any, module: Any) -> None:
        for name in ("malloc", "free", "memcpy_htod_async", "memcpy_dtoh_async",
                     "memcpy_dtod_async", "memcpy_2d_dtod_async", "memset_async", "stream_create",
                     "stream_synchronize", "stream_destroy", "set_device", "stream_begin_capture",
                     "stream_end_capture", "graph_instantiate", "graph_launch",
                     "graph_exec_destroy", "graph_destroy"):
            monkeypatch.setattr(module, name, getattr(self, name))


# -- tensorrt --------------------------------------------------------------------------------------

class _Enum:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Enum) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def _enum(*names: str) -> types.SimpleNamespace:
    ns = types.SimpleNamespace(**{n: _Enum(n, i) for i, n in enumerate(names)})
    ns.__members__ = {n: getattr(ns, n) for n in names}
    return ns


class Logger:
    WARNING, VERBOSE, INFO, ERROR = 2, 4, 3, 1

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity


@dataclass
class FakeProfile:
    shapes: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"+"


class FakeConfig:
    def __init__(self) -> None:
        self.profiles: list[FakeProfile] = []
        self.pool_limits: dict[str, int] = {}
        self.builder_optimization_level = 3
        self.tactic_sources: int | None = None
        self.cache = FakeTimingCache(b"")

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool_limits[pool.name] = size

    def add_optimization_profile(self, p: FakeProfile) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1

    def set_tactic_sources(self, mask: int) -> bool:
        self.tactic_sources = mask
        return True

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        return self.cache


class FakeHostMemory(bytes):
    """IHostMemory: a buffer with nbytes."""

    @property
    def nbytes(self) -> int:
        return len(self)


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_path: str | None = None


class OnnxParser:
    def __init__(self, network: FakeNetwork, logger: Logger) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        onnx.checker.check_model(path)  # validates external data and types
        self.network.onnx_path = path
        return True

    def get_error(self, i: int) -> str:
        return "fake parser error"


class Builder:
    log: list[dict[str, Any]] = []  # every build, for assertions

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> FakeNetwork:
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig
                                 ) -> FakeHostMemory:
        assert network.onnx_path is not None
        model = onnx.load(network.onnx_path)  # external data resolved into the proto
        header = json.dumps({"profiles": [p.shapes for p in config.profiles]}).encode()
        Builder.log.append({"onnx": network.onnx_path, "flags": network.flags,
                            "profiles": [p.shapes for p in config.profiles],
                            "pool_limits": dict(config.pool_limits),
                            "opt_level": config.builder_optimization_level,
                            "tactics": config.tactic_sources, "model": model})
        return FakeHostMemory(PLAN_MAGIC + len(header).to_bytes(8, "little") + header
                              + model.SerializeToString())


class FakeEngine:
    def __init__(self, plan: bytes, cuda: FakeCuda) -> None:
        import onnxruntime as ort

        assert plan[:8] == PLAN_MAGIC, "not a plan written by the fake builder"
        n = int.from_bytes(plan[8:16], "little")
        header = json.loads(plan[16:16 + n])
        self.model = onnx.load_from_string(plan[16 + n:])
        self.session = ort.InferenceSession(plan[16 + n:], providers=["CPUExecutionProvider"])
        self.cuda = cuda
        self.profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()}
                         for p in header["profiles"]]
        self.io = [(v.name, True, _ORT_TO_TRT[v.type]) for v in self.session.get_inputs()]
        self.io += [(v.name, False, _ORT_TO_TRT[v.type]) for v in self.session.get_outputs()]
        self.dim_params = {v.name: [d.dim_param or d.dim_value
                                    for d in v.type.tensor_type.shape.dim]
                           for v in (*self.model.graph.input, *self.model.graph.output)}
        self.major = int(_VERSION[0].split(".")[0])
        self.device_memory_size_v2 = 4096

    @property
    def device_memory_size(self) -> int:
        if self.major >= 11:
            raise AttributeError("ICudaEngine.device_memory_size was removed in TensorRT 11")
        return self.device_memory_size_v2

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str) -> Any:
        is_input = next(x[1] for x in self.io if x[0] == name)
        return TensorIOMode.INPUT if is_input else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return getattr(DataType, next(x[2] for x in self.io if x[0] == name))

    def get_tensor_profile_shape(self, name: str, p: int) -> list[tuple[int, ...]]:
        return list(self.profiles[p][name])

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        return FakeContext(self, user_memory=strategy is not None)


class FakeContext:
    def __init__(self, engine: FakeEngine, user_memory: bool) -> None:
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: int | None = None if user_memory else -1
        self.runs = 0

    def _count(self, call: str) -> None:
        self.engine.cuda.trt_calls[call] += 1

    @property
    def device_memory(self) -> int:
        raise AttributeError("IExecutionContext.device_memory is write-only")

    @device_memory.setter
    def device_memory(self, ptr: int) -> None:  # deprecated in 10.1, removed in 11
        if self.engine.major >= 11:
            raise AttributeError("IExecutionContext.device_memory was removed in TensorRT 11")
        self.memory = ptr

    def set_optimization_profile_async(self, p: int, stream: int) -> bool:
        self._count("set_optimization_profile_async")
        self.profile = p
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        self._count("set_device_memory")
        assert size >= self.engine.device_memory_size_v2
        self.memory = ptr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self._count("set_input_shape")
        lo, _, hi = self.engine.profiles[self.profile][name]
        ok = len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._count("set_tensor_address")
        self.addresses[name] = ptr
        return True

    def _sizes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for name, shape in shapes.items():
            for d, s in zip(self.engine.dim_params[name], shape):
                if isinstance(d, str):
                    sizes[d] = s
        return sizes

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        self._count("get_tensor_shape")
        if name in self.shapes:
            return self.shapes[name]
        sizes = self._sizes(self.shapes)
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.engine.dim_params[name])

    def state(self) -> tuple[int, dict[str, tuple[int, ...]], dict[str, int]]:
        return self.profile, dict(self.shapes), dict(self.addresses)

    def _run(self) -> None:
        """One engine run on the state bound now, reading and writing device memory."""
        e = self.engine
        inputs = [x for x in e.io if x[1]]
        outputs = [n for n, is_in, _ in e.io if not is_in]
        assert all(n in self.shapes and n in self.addresses for n, _, _ in inputs), \
            "every input needs a shape and an address"
        assert all(n in self.addresses for n in outputs), "every output needs an address"
        feeds = {n: e.cuda.read(self.addresses[n], self.shapes[n], _TRT_TO_NP[t])
                 for n, _, t in inputs}
        for n, value in zip(outputs, e.session.run(outputs, feeds)):
            e.cuda.write(self.addresses[n], np.asarray(value))
        self.runs += 1

    def execute_async_v3(self, stream: int) -> bool:
        self._count("execute_async_v3")
        assert self.memory is not None, "USER_MANAGED context without device memory"
        if self.engine.cuda.capturing is None:
            self._run()
            return True
        captured = self.state()

        def replay() -> None:
            now = self.state()
            assert now == captured, (
                "CUDA graph replayed on a context whose state changed since capture: "
                f"captured profile/shapes {captured[:2]}, now {now[:2]}"
                + ("" if now[2] == captured[2] else "; addresses differ"))
            self._run()

        self.engine.cuda.capturing.append(replay)
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine:
        return FakeEngine(plan, _CUDA[0])


_CUDA: list[FakeCuda] = []
_VERSION: list[str] = ["10.3.0.30"]
TensorIOMode = _enum("NONE", "INPUT", "OUTPUT")
DataType = _enum("FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64")
ExecutionContextAllocationStrategy = _enum("STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED")
NetworkDefinitionCreationFlag = _enum("EXPLICIT_BATCH", "STRONGLY_TYPED")
MemoryPoolType = _enum("WORKSPACE")
TacticSource = _enum("CUBLAS", "CUBLAS_LT", "CUDNN", "EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS")


def Dims(shape: list[int]) -> tuple[int, ...]:  # noqa: N802 (TensorRT's name)
    return tuple(shape)


def make_module(cuda: FakeCuda, version: str = "10.3.0.30") -> types.ModuleType:
    """A module object to put in sys.modules["tensorrt"]."""
    _CUDA[:] = [cuda]
    _VERSION[:] = [version]
    Builder.log = []
    m = types.ModuleType("tensorrt")
    m.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec() callers (dynamo)
    for name in ("Logger", "Builder", "OnnxParser", "Runtime", "TensorIOMode", "DataType",
                 "ExecutionContextAllocationStrategy", "NetworkDefinitionCreationFlag",
                 "MemoryPoolType", "TacticSource", "Dims"):
        setattr(m, name, globals()[name])
    m.__version__ = version  # type: ignore[attr-defined]
    return m


def install(monkeypatch: Any, version: str = "10.3.0.30") -> FakeCuda:
    """Put the fakes in place of tensorrt, cuda_api and the availability probes; returns the
    fake device so tests can inspect memory, copies and graph launches."""
    import sys

    import molmo_export.trt.builder as builder
    import molmo_runtime.backends.trt as backend
    from molmo_runtime import cuda_api

    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", make_module(cuda, version))
    cuda.install(monkeypatch, cuda_api)
    monkeypatch.setattr(builder, "require_tensorrt", lambda target="trt-fp16": None)
    monkeypatch.setattr(backend, "missing_for_tensorrt", lambda: [])
    return cuda
