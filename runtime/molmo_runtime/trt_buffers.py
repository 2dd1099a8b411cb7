"""Pure shape / offset / profile arithmetic of the TensorRT backend. Torch-free, GPU-free.

Everything the TensorRT runner computes before it touches the device lives here, so it is
unit-tested on any machine: dtypes of engine tensors, buffer capacities from optimization
profiles, the layout of the preallocated KV cache, the strided copy that appends a step's
`present.*` outputs to that cache, which profile serves a call, how crops are chunked, and the
padded decode shapes used when the decode step is replayed as a CUDA graph.

Shape ranges are `(min, opt, max)` triples of shapes, keyed by input tensor name: one dict per
optimization profile, as `molmo_export.trt.profiles` computes them and as an engine reports them
(`ICudaEngine.get_tensor_profile_shape`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from molmo_runtime.errors import InputError
from molmo_runtime.graph_io import GraphDims, GraphSpec

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
Profile = dict[str, ShapeRange]

ALIGNMENT = 256  # bytes; cudaMalloc's own alignment, kept for sub-allocations of one block

# TensorRT DataType member name -> numpy dtype name. BF16/FP8/INT4/FP4 have no numpy dtype; the
# graphs never expose them at their I/O (they live inside the engine only).
_TRT_TO_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def numpy_dtype(trt_dtype_name: str) -> np.dtype:
    """numpy dtype of an engine I/O tensor, from the TensorRT DataType name ("HALF", ...)."""
    try:
        return np.dtype(_TRT_TO_NUMPY[trt_dtype_name])
    except KeyError:
        raise InputError(
            f"engine I/O tensor of TensorRT type {trt_dtype_name} has no numpy equivalent; "
            "rebuild the engines with molmo-export (graph I/O must be float32/float16/int64)"
        ) from None


def volume(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return (nbytes + alignment - 1) // alignment * alignment


# -- profiles --------------------------------------------------------------------------------------

def shape_in_range(shape: Sequence[int], rng: ShapeRange) -> bool:
    lo, _, hi = rng
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def select_profile(profiles: Sequence[Mapping[str, ShapeRange]],
                   shapes: Mapping[str, Sequence[int]], graph: str = "engine") -> int:
    """Index of the profile that accepts every shape, preferring the tightest one.

    "Tightest" = smallest sum of max volumes: a 1-token decode step goes to the decode profile
    (seq max 1) rather than the prefill profile that also admits seq = 1. Raises InputError
    naming the limits when no profile accepts the shapes.
    """
    fitting = [i for i, p in enumerate(profiles)
               if all(name in p and shape_in_range(shape, p[name])
                      for name, shape in shapes.items())]
    if not fitting:
        limits = "; ".join(
            f"profile {i}: " + ", ".join(f"{n} {p[n][0]}..{p[n][2]}" for n in shapes if n in p)
            for i, p in enumerate(profiles))
        got = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
        raise InputError(
            f"{graph}: shapes {got} are outside the engine's optimization profiles ({limits}); "
            "shorten the input, or rebuild the engines with larger limits (build_engines "
            "max_batch / max_prompt_len; the cache length is the export's --max-seq-len)")
    return min(fitting, key=lambda i: (sum(volume(r[2]) for r in profiles[i].values()), i))


def max_dim_sizes(spec: GraphSpec, profiles: Sequence[Mapping[str, ShapeRange]]) -> dict[str, int]:
    """Largest value every named (dynamic) dimension takes in any profile."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for p in profiles:
            if t.name not in p:
                continue
            for axis, d in enumerate(t.dims):
                if isinstance(d, str):
                    sizes[d] = max(sizes.get(d, 0), p[t.name][2][axis])
    return sizes


def capacity_shapes(spec: GraphSpec, profiles: Sequence[Mapping[str, ShapeRange]],
                    fixed: Mapping[str, int] | None = None) -> dict[str, Shape]:
    """Largest shape of every I/O tensor over all profiles: what its buffer must hold.

    fixed: dimensions already known (e.g. {"batch": 1} once a generation has started).
    """
    sizes = {**max_dim_sizes(spec, profiles), **(fixed or {})}
    return {t.name: t.shape_for(sizes) for t in (*spec.inputs, *spec.outputs)}


def chunks(n: int, max_chunk: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n items, each at most max_chunk long (crops per engine run)."""
    if max_chunk < 1:
        raise ValueError("max_chunk must be >= 1")
    return [(s, min(s + max_chunk, n)) for s in range(0, n, max_chunk)]


# -- KV cache --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KvCacheLayout:
    """All layers' K and V caches as sub-allocations of one device block.

    Each is [batch, kv_heads, max_seq_len, head_dim], dense; offsets are 256-byte aligned.
    """

    shape: Shape
    itemsize: int
    key_offsets: tuple[int, ...]
    value_offsets: tuple[int, ...]
    tensor_bytes: int
    total_bytes: int


def kv_cache_layout(dims: GraphDims, batch: int, itemsize: int) -> KvCacheLayout:
    shape = (batch, dims.num_kv_heads, dims.max_seq_len, dims.head_dim)
    tensor_bytes = volume(shape) * itemsize
    stride = align_up(tensor_bytes)
    keys = tuple(2 * i * stride for i in range(dims.num_layers))
    values = tuple((2 * i + 1) * stride for i in range(dims.num_layers))
    return KvCacheLayout(shape, itemsize, keys, values, tensor_bytes,
                         2 * dims.num_layers * stride)


@dataclass(frozen=True)
class Copy2D:
    """A pitched copy: `height` rows of `width` bytes, as cudaMemcpy2DAsync takes it."""

    dst_offset: int  # bytes from the start of the destination tensor
    dst_pitch: int
    src_offset: int
    src_pitch: int
    width: int
    height: int


def present_to_cache_copy(dims: GraphDims, batch: int, past: int, seq: int,
                          itemsize: int) -> Copy2D:
    """The copy that writes a step's present K (or V) into the cache at positions [past, past+seq).

    present is dense [batch, kv_heads, seq, head_dim]; the cache is [batch, kv_heads, max_seq_len,
    head_dim]. For each of the batch*kv_heads (row) pairs the seq*head_dim new elements are
    contiguous in both, so the whole append is one 2-D copy of batch*kv_heads rows.
    """
    if past < 0 or seq < 1 or past + seq > dims.max_seq_len:
        raise InputError(
            f"cannot append {seq} positions after {past}: the KV cache holds "
            f"{dims.max_seq_len} (max_seq_len); shorten the prompt or max_new_tokens, or "
            "re-export with a larger --max-seq-len")
    row = dims.head_dim * itemsize
    return Copy2D(dst_offset=past * row, dst_pitch=dims.max_seq_len * row,
                  src_offset=0, src_pitch=seq * row, width=seq * row,
                  height=batch * dims.num_kv_heads)


# -- decode inputs ---------------------------------------------------------------------------------

def changed_span(old: np.ndarray | None, new: np.ndarray) -> tuple[int, int] | None:
    """Elements [lo, hi) of flat `new` that differ from what the device buffer holds (`old`).

    The device buffer holds `old` flattened at its start; uploading new[lo:hi] at element offset
    lo makes it hold `new`. For a batch-1 attention mask that only grew this is just the new
    columns, so decode never re-sends the whole mask. None when nothing changed.
    """
    new = new.reshape(-1)
    if old is None:
        return (0, new.size) if new.size else None
    old = old.reshape(-1)
    common = min(old.size, new.size)
    diff = np.flatnonzero(old[:common] != new[:common])
    lo = int(diff[0]) if diff.size else common
    return (lo, new.size) if lo < new.size else None


def decode_bucket(total: int, granularity: int, max_total: int) -> int:
    """Attention length a graph-captured decode step runs at: total rounded up to a bucket.

    A captured CUDA graph replays fixed shapes, and `total` grows by one per step, so the decode
    step is captured once per bucket of `granularity` positions and runs with the mask padded
    (see padded_decode_mask). Extra positions cost attention bandwidth only, at most
    granularity - 1 of them.
    """
    if not 1 <= total <= max_total:
        raise InputError(f"attention length {total} is outside 1..{max_total} (max_seq_len)")
    return min(-(-total // granularity) * granularity, max_total)


def padded_decode_mask(mask: np.ndarray, bucket: int) -> np.ndarray:
    """[B, past + 1] mask of one decode step -> [B, bucket] with the same attention result.

    The graph reads the cache's first bucket - 1 positions as the past and puts the new token at
    position bucket - 1. So: the valid past keeps its mask, positions past .. bucket-2 are masked
    (0; they hold zeros or stale K/V, never NaN, because the cache is zeroed when allocated), and
    the last column is the new token's mask.
    """
    batch, total = mask.shape
    if total > bucket:
        raise ValueError(f"mask of length {total} does not fit bucket {bucket}")
    out = np.zeros((batch, bucket), dtype=mask.dtype)
    out[:, :total - 1] = mask[:, :total - 1]
    out[:, bucket - 1] = mask[:, total - 1]
    return out
