"""The few CUDA runtime calls the TensorRT backend needs, with typed signatures. Torch-free.

cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6) ships no type
stubs, so every call into it lives here and everything else stays checked by mypy --strict.
Device pointers, streams and graphs cross this boundary as plain ints (their addresses /
handles); cuda-python accepts ints wherever it takes a pointer or a handle.

Each wrapper raises CudaError naming the call and the CUDA error; `device_count` and
`probe_gpu` never raise (they answer "is there a usable GPU" for the availability check).
The bindings load libcuda lazily, so importing this module on a machine without a GPU is fine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from molmo_runtime.errors import MissingDependencyError, MolmoError


class CudaError(MolmoError, RuntimeError):
    """A CUDA runtime call failed."""


@functools.lru_cache(maxsize=1)
def _rt() -> Any:
    """The cuda-python runtime module (cudart)."""
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: I001

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[import-not-found, import-untyped, attr-defined, unused-ignore]

        return cudart
    except ImportError as e:
        raise MissingDependencyError(
            "cuda-python is not installed (needed for the TensorRT backend): "
            "pip install 'molmo-export[trt]' (on Jetson: pip install 'cuda-python==<JetPack CUDA "
            "major.minor>.*')") from e


def _error_name(rt: Any, err: Any) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the error-name lookup itself may fail when the driver is missing
        return str(err)


def _check(call: str, result: Any) -> Any:
    """cuda-python returns (err, *values); raise on err, return the value(s)."""
    rt = _rt()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{call} failed: {_error_name(rt, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# -- devices ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuProbe:
    """What `probe_gpu` found: a device count, or why there is none."""

    count: int
    reason: str = ""  # empty when count > 0


def probe_gpu() -> GpuProbe:
    """Count CUDA devices without raising (no driver, driver too old, no cuda-python...)."""
    try:
        rt = _rt()
    except MissingDependencyError:
        return GpuProbe(0, "no cuda-python module")
    try:
        err, count = rt.cudaGetDeviceCount()
    except Exception as e:  # cuda-python raises when libcuda cannot be loaded at all
        return GpuProbe(0, f"no CUDA driver ({type(e).__name__})")
    if err != rt.cudaError_t.cudaSuccess:
        return GpuProbe(0, f"no usable CUDA GPU ({_error_name(rt, err)})")
    if int(count) == 0:
        return GpuProbe(0, "no CUDA GPU")
    return GpuProbe(int(count))


def device_count() -> int:
    return probe_gpu().count


def set_device(device: int) -> None:
    _check("cudaSetDevice", _rt().cudaSetDevice(device))


def device_name(device: int) -> str:
    prop = _check("cudaGetDeviceProperties", _rt().cudaGetDeviceProperties(device))
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip()


def compute_capability(device: int) -> tuple[int, int]:
    rt = _rt()
    attr = rt.cudaDeviceAttr
    major = _check("cudaDeviceGetAttribute",
                   rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
    minor = _check("cudaDeviceGetAttribute",
                   rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
    return int(major), int(minor)


def _version_string(v: int) -> str:
    """CUDA encodes versions as 1000 * major + 10 * minor (12020 -> "12.2")."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def driver_version() -> str:
    """Highest CUDA version the installed driver supports, e.g. "12.6"."""
    return _version_string(int(_check("cudaDriverGetVersion", _rt().cudaDriverGetVersion())))


def runtime_version() -> str:
    """Version of the CUDA runtime cuda-python is bound to, e.g. "12.6"."""
    return _version_string(int(_check("cudaRuntimeGetVersion", _rt().cudaRuntimeGetVersion())))


def mem_info() -> tuple[int, int]:
    """(free, total) bytes of device memory (on Jetson: of the shared DRAM)."""
    free, total = _check("cudaMemGetInfo", _rt().cudaMemGetInfo())
    return int(free), int(total)


# -- memory ----------------------------------------------------------------------------------------

def malloc(nbytes: int) -> int:
    """Plain device allocation (never managed memory); returns the address."""
    return int(_check("cudaMalloc", _rt().cudaMalloc(max(int(nbytes), 1))))


def free(ptr: int) -> None:
    _check("cudaFree", _rt().cudaFree(ptr))


def _kind(name: str) -> Any:
    return getattr(_rt().cudaMemcpyKind, name)


def _host_ptr(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:
        raise ValueError("host arrays passed to the GPU must be C-contiguous")
    return int(array.ctypes.data)


def memcpy_htod_async(dst: int, src: np.ndarray, stream: int) -> None:
    _check("cudaMemcpyAsync", _rt().cudaMemcpyAsync(
        dst, _host_ptr(src), src.nbytes, _kind("cudaMemcpyHostToDevice"), stream))


def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: int) -> None:
    if not dst.flags.writeable:
        raise ValueError("destination host array is read-only")
    _check("cudaMemcpyAsync", _rt().cudaMemcpyAsync(
        _host_ptr(dst), src, dst.nbytes, _kind("cudaMemcpyDeviceToHost"), stream))


def memcpy_dtod_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    _check("cudaMemcpyAsync", _rt().cudaMemcpyAsync(
        dst, src, nbytes, _kind("cudaMemcpyDeviceToDevice"), stream))


def memcpy_2d_dtod_async(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                         height: int, stream: int) -> None:
    """Copy `height` rows of `width` bytes between pitched device regions."""
    _check("cudaMemcpy2DAsync", _rt().cudaMemcpy2DAsync(
        dst, dst_pitch, src, src_pitch, width, height, _kind("cudaMemcpyDeviceToDevice"), stream))


def memset_async(ptr: int, value: int, nbytes: int, stream: int) -> None:
    _check("cudaMemsetAsync", _rt().cudaMemsetAsync(ptr, value, nbytes, stream))


# -- streams and graphs ----------------------------------------------------------------------------

def stream_create() -> int:
    return int(_check("cudaStreamCreate", _rt().cudaStreamCreate()))


def stream_synchronize(stream: int) -> None:
    _check("cudaStreamSynchronize", _rt().cudaStreamSynchronize(stream))


def stream_destroy(stream: int) -> None:
    _check("cudaStreamDestroy", _rt().cudaStreamDestroy(stream))


def stream_begin_capture(stream: int) -> None:
    # Thread-local mode: other threads' CUDA calls do not break this capture.
    mode = _rt().cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    _check("cudaStreamBeginCapture", _rt().cudaStreamBeginCapture(stream, mode))


def stream_end_capture(stream: int) -> int:
    """End capture; returns the captured graph's handle."""
    return int(_check("cudaStreamEndCapture", _rt().cudaStreamEndCapture(stream)))


def graph_instantiate(graph: int) -> int:
    return int(_check("cudaGraphInstantiate", _rt().cudaGraphInstantiate(graph, 0)))


def graph_launch(graph_exec: int, stream: int) -> None:
    _check("cudaGraphLaunch", _rt().cudaGraphLaunch(graph_exec, stream))


def graph_exec_destroy(graph_exec: int) -> None:
    _check("cudaGraphExecDestroy", _rt().cudaGraphExecDestroy(graph_exec))


def graph_destroy(graph: int) -> None:
    _check("cudaGraphDestroy", _rt().cudaGraphDestroy(graph))
