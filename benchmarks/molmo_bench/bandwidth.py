"""The memory-bandwidth limit of decode: how fast this machine reads memory, and how many bytes
one decode step must read.

At batch 1 a decode step multiplies one vector by every decoder weight, so it reads all of them
once and does ~2 FLOPs per weight: it is bound by memory bandwidth, and
`weight_bytes * tokens_per_s / read_bandwidth` says how close a runtime gets to that bound.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from molmo_bench.idle import settle


@dataclass(frozen=True)
class Bandwidth:
    read_gb_per_s: float  # best of every method and repetition: the limit decode is compared to
    by_method: dict[str, float]  # method -> best GB/s over the repetitions
    array_mb: int
    reps: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = ("best of: numpy sum over a float32 array far larger than the caches "
                       "(1 thread, and split across threads), and a numpy (BLAS) matrix-vector "
                       "product over the same bytes, as decode does; best repetition, "
                       "GB = 1e9 bytes. Other processes only ever lower it, hence the best")
        return d

    def merge(self, other: Bandwidth) -> Bandwidth:
        """The best of two probes (e.g. one before and one after the timed runs)."""
        methods = {k: max(self.by_method.get(k, 0.0), other.by_method.get(k, 0.0))
                   for k in {*self.by_method, *other.by_method}}
        return Bandwidth(max(methods.values()), dict(sorted(methods.items())), self.array_mb,
                         self.reps + other.reps)


def measure_read_bandwidth(threads: int, array_mb: int = 1024, reps: int = 5) -> Bandwidth:
    """Best read bandwidth (GB/s) over `array_mb` MiB of float32.

    numpy's reductions release the GIL, so each thread streams its own slice; the matrix-vector
    product reads the array as a [rows, 4096] matrix, in BLAS's own threads. The array is written
    once first (so its pages are resident).
    """
    if array_mb < 64:
        raise ValueError(f"array_mb={array_mb}: use at least 64 MiB so the array is far larger "
                         "than the CPU caches")
    data = np.ones(array_mb * 2**20 // 4, np.float32)  # [N], touched: pages are resident
    matrix = data.reshape(-1, 4096)  # [N / 4096, 4096]
    vector = np.ones(4096, np.float32)

    def best(run: Any, check: Any) -> float:
        seconds = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            result = run()
            seconds = min(seconds, time.perf_counter() - start)
        if not check(result):
            raise RuntimeError("bandwidth probe: wrong result; numpy is misbehaving")
        return round(data.nbytes / seconds / 1e9, 2)

    by_method: dict[str, float] = {}
    for n in sorted({1, max(1, threads)}):
        chunks = np.array_split(data, n)
        with ThreadPoolExecutor(n) as pool:
            by_method[f"sum_{n}_threads"] = best(
                lambda pool=pool, chunks=chunks: sum(float(s) for s in pool.map(np.sum, chunks)),
                lambda total: abs(total - data.size) <= 1e-3 * data.size)
    by_method["blas_gemv"] = best(lambda: matrix @ vector,
                                  lambda out: bool(np.allclose(out, 4096.0)))
    return Bandwidth(max(by_method.values()), by_method, array_mb, reps)


class StepProbe:
    """The read-bandwidth probe run beside decode steps, in this process: one numpy (BLAS)
    matrix-vector pass over `array_mb` MiB of float32 per call (the method that reads fastest
    here). Its array lives in the caller, so make it after the peak RSS has been taken."""

    def __init__(self, array_mb: int) -> None:
        self.matrix = np.ones((array_mb * 2**20 // 4 // 4096, 4096), np.float32)
        self.vector = np.ones(4096, np.float32)
        self.gb_per_s: list[float] = []

    def __call__(self) -> None:
        settle()  # the decoder's thread pool stops spinning first
        start = time.perf_counter()
        self.matrix @ self.vector
        self.gb_per_s.append(self.matrix.nbytes / (time.perf_counter() - start) / 1e9)

    def best(self) -> Bandwidth:
        best = round(max(self.gb_per_s), 2)
        return Bandwidth(best, {"blas_gemv_beside_steps": best},
                         self.matrix.nbytes // 2**20, len(self.gb_per_s))


def _probe_limits(threads: int, array_mb: int) -> tuple[Bandwidth, float]:
    from molmo_bench.flops import measure_gemm_gflops

    return measure_read_bandwidth(threads, array_mb), measure_gemm_gflops()


def measure_in_subprocess(threads: int, array_mb: int) -> tuple[Bandwidth, float]:
    """(read bandwidth, fp32 GEMM GFLOP/s), probed in a fresh process so that the probe's
    arrays never count in the caller's peak RSS."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_probe_limits, threads, array_mb).result()


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of every initializer of an ONNX file (inline or external data), without loading
    the external data."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in init.external_data}
            if "length" in entries:
                total += int(entries["length"])
                continue
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        total += count * np.dtype(dtype).itemsize
    return total


def decoder_weight_bytes(artifact_dir: str | Path, decoder_file: str) -> tuple[int, str]:
    """(bytes one decode step reads as weights, how they were counted).

    The embedding gather is not counted: the runtime reads one row of embed_tokens.npy per token,
    not the table. The KV cache read (which grows with the context) is not counted either.
    """
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / decoder_file
    try:
        return onnx_weight_bytes(path), "sum of decoder.onnx initializer sizes"
    except ImportError:
        pass
    # Without the onnx package: the graph file and its external data files. The graph proto
    # itself adds well under 1% to the weights.
    stem = path.name
    files = [p for p in path.parent.iterdir() if p.name.startswith(stem)]
    return (sum(p.stat().st_size for p in files),
            "size of decoder.onnx and its external data files (onnx package not installed)")
