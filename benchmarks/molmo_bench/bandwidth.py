"""The memory-bandwidth limit of decode: how fast this machine reads memory, and how many bytes
one decode step must read.

At batch 1 a decode step multiplies one vector by every decoder weight, so it reads all of them
once and does ~2 FLOPs per weight: it is bound by memory bandwidth, and
`weight_bytes * tokens_per_s / read_bandwidth` says how close a runtime gets to that bound.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Bandwidth:
    read_gb_per_s: float  # best of all thread counts: the limit decode is compared with
    by_threads: dict[int, float]  # threads -> best GB/s over the repetitions
    array_mb: int
    reps: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["by_threads"] = {str(k): v for k, v in self.by_threads.items()}
        d["method"] = ("numpy sum over a float32 array far larger than the caches, split across "
                       "threads; best repetition (GB = 1e9 bytes)")
        return d


def measure_read_bandwidth(threads: int, array_mb: int = 1024, reps: int = 5) -> Bandwidth:
    """Best read bandwidth (GB/s) of a numpy sum over `array_mb` MiB, for 1..threads threads.

    numpy's reductions release the GIL, so each thread streams its own slice. The array is
    written once first (so its pages are resident) and freed at the end.
    """
    if array_mb < 64:
        raise ValueError(f"array_mb={array_mb}: use at least 64 MiB so the array is far larger "
                         "than the CPU caches")
    data = np.ones(array_mb * 2**20 // 4, np.float32)  # [N] touched: pages are resident
    by_threads: dict[int, float] = {}
    for n in sorted({1, max(1, threads)}):
        chunks = np.array_split(data, n)
        best = float("inf")
        with ThreadPoolExecutor(n) as pool:
            for _ in range(reps):
                start = time.perf_counter()
                sums = list(pool.map(np.sum, chunks))
                best = min(best, time.perf_counter() - start)
        if abs(sum(float(s) for s in sums) - data.size) > 1e-3 * data.size:
            raise RuntimeError("bandwidth probe: the sum is wrong; numpy is misbehaving")
        by_threads[n] = round(data.nbytes / best / 1e9, 2)
    del data
    return Bandwidth(max(by_threads.values()), by_threads, array_mb, reps)


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
