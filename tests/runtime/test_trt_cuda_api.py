"""cuda_api: error checking and the GPU probe, against a fake cuda-python runtime module."""

from __future__ import annotations

import enum
import types
from typing import Any

import numpy as np
import pytest

from molmo_runtime import cuda_api


class Err(enum.Enum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorMemoryAllocation = 2


def fake_runtime(**calls: Any) -> types.SimpleNamespace:
    rt = types.SimpleNamespace(
        cudaError_t=Err,
        cudaGetErrorName=lambda e: (Err.cudaSuccess, e.name.encode()),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                             cudaMemcpyDeviceToDevice=3),
        cudaDeviceAttr=types.SimpleNamespace(cudaDevAttrComputeCapabilityMajor="maj",
                                             cudaDevAttrComputeCapabilityMinor="min"))
    for k, v in calls.items():
        setattr(rt, k, v)
    return rt


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def install(rt: types.SimpleNamespace) -> None:
        monkeypatch.setattr(cuda_api, "_rt", lambda: rt)
    return install


def test_probe_gpu_reasons(use) -> None:  # type: ignore[no-untyped-def]
    use(fake_runtime(cudaGetDeviceCount=lambda: (Err.cudaSuccess, 2)))
    assert cuda_api.probe_gpu() == cuda_api.GpuProbe(2)
    use(fake_runtime(cudaGetDeviceCount=lambda: (Err.cudaSuccess, 0)))
    assert cuda_api.probe_gpu().reason == "no CUDA GPU"
    use(fake_runtime(cudaGetDeviceCount=lambda: (Err.cudaErrorInsufficientDriver, 0)))
    assert cuda_api.probe_gpu().reason == "no usable CUDA GPU (cudaErrorInsufficientDriver)"

    def no_driver() -> None:
        raise OSError("libcuda.so.1: cannot open shared object file")

    use(fake_runtime(cudaGetDeviceCount=no_driver))
    assert cuda_api.probe_gpu().reason == "no CUDA driver (OSError)"


def test_errors_name_the_call(use) -> None:  # type: ignore[no-untyped-def]
    use(fake_runtime(cudaMalloc=lambda n: (Err.cudaErrorMemoryAllocation, 0)))
    with pytest.raises(cuda_api.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cuda_api.malloc(1 << 40)


def test_calls_pass_addresses_and_sizes(use) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[Any, ...]] = []
    use(fake_runtime(
        cudaMalloc=lambda n: (Err.cudaSuccess, 0x1000 + n),
        cudaMemcpyAsync=lambda *a: (seen.append(a), (Err.cudaSuccess,))[1],
        cudaMemcpy2DAsync=lambda *a: (seen.append(a), (Err.cudaSuccess,))[1],
        cudaDriverGetVersion=lambda: (Err.cudaSuccess, 12060),
        cudaDeviceGetAttribute=lambda attr, dev: (Err.cudaSuccess, 8 if attr == "maj" else 7),
        cudaGetDeviceProperties=lambda dev: (Err.cudaSuccess, types.SimpleNamespace(
            name=b"Orin\0\0garbage"))))
    assert cuda_api.malloc(0) == 0x1001  # never a zero-byte allocation
    host = np.arange(6, dtype=np.float32)
    cuda_api.memcpy_htod_async(0x2000, host, 5)
    assert seen[-1] == (0x2000, host.ctypes.data, 24, 1, 5)
    out = np.empty(3, np.int64)
    cuda_api.memcpy_dtoh_async(out, 0x3000, 5)
    assert seen[-1] == (out.ctypes.data, 0x3000, 24, 2, 5)
    cuda_api.memcpy_2d_dtod_async(1, 2, 3, 4, 5, 6, 7)
    assert seen[-1] == (1, 2, 3, 4, 5, 6, 3, 7)
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_api.memcpy_htod_async(0x2000, host[::2], 5)
    assert cuda_api.driver_version() == "12.6"
    assert cuda_api.compute_capability(0) == (8, 7)
    assert cuda_api.device_name(0) == "Orin"
