"""The two antialiased bilinear resizers of the official Molmo processor, bit-exact, in numpy.

Molmo's hub processor resizes a uint8 HxWx3 image to float32 in [0, 1] with either

* ``"torch-bilinear"`` (the current default): torchvision ``Resize(BILINEAR, antialias=True)`` on
  ``uint8 / 255``, i.e. ATen's ``_upsample_bilinear2d_aa`` CPU kernel; or
* ``"tensorflow"`` (the original training code): ``tf.image.resize(BILINEAR, antialias=True)``,
  i.e. TensorFlow's ``scale_and_translate`` with a triangle kernel.

Both are separable: a 1-D resize along one axis, then along the other. Each 1-D resize is "for
every output index, a weighted sum of a few consecutive input samples". The weights and the first
input index depend only on (n_in, n_out), so they are computed once per size pair (cached) as
tap tables ``index[T, n_out]`` / ``weight[T, n_out]``. A pass then loops over the T taps (never
over pixels): each tap is a gather plus a multiply-add over a block of the image, in exactly the
order and float32 rounding of the reference kernels (../shared/docs/molmo_architecture.md §6.4,
../shared/golden/README.md §4.5):

* torch: ``acc = in[0]*w0``; of the remaining m = n-1 taps the first 4*floor(m/4) are added as
  ``f32(acc + f32(in*w))`` and the last ``m mod 4`` are fused multiply-adds (the AVX2/AVX512 ATen
  build vectorises the reduction in blocks of 4 and finishes with an FMA scalar tail). An FMA of
  float32 values is emulated as ``f32(f64(in)*f64(w) + f64(acc))``: the float64 product of two
  float32 values is exact, so only the final rounding matters.
* tensorflow: ``acc = 0; acc = f32(acc + f32(w*in))`` for every tap, no FMA.

Speed: the image is processed in blocks of ~128k values along the axis that is *not* resized,
so the temporaries of a block stay in the CPU's caches. Within a pass the outputs are visited sorted by
their tap pattern (number of taps, which are fused), so every tap applies to contiguous runs of
outputs (slices, no fancy indexing); each finished block is put back in order by one gather. The
last pass also clips, normalises and writes straight into the caller's canvas (``resize_into``).
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

ResizeMethod = Literal["torch-bilinear", "tensorflow"]
RESIZE_METHODS: tuple[str, ...] = ("torch-bilinear", "tensorflow")

# Values per block of work (float32): 512 KiB, half an L2 cache (measured best here).
BLOCK_VALUES = 1 << 17
# A pass whose input has at most this many values runs as a single block (measured faster).
SINGLE_BLOCK_VALUES = 1 << 20
# Runs of at most this many outputs multiply by the broadcast weights (a tile is not worth it).
TILE_MIN = 64

# Kinds of a tap of one output.
NONE, PLAIN, FUSED = 0, 1, 2


@dataclass(frozen=True)
class TapTable:
    """1-D resampling taps for one axis (n_in -> n_out), outputs in natural order.

    ``index[t, i]``: input sample of tap t of output i (clamped into range; its weight is 0 where
    output i has fewer than t+1 taps); ``weight[t, i]`` float32; ``kind[t, i]``: NONE (no such
    tap), PLAIN (``f32(acc + f32(x*w))``; tap 0 is ``f32(x*w)``) or FUSED (``f32(fma)``).
    """

    n_in: int
    n_out: int
    index: np.ndarray  # [T, n_out] intp
    weight: np.ndarray  # [T, n_out] float32
    kind: np.ndarray  # [T, n_out] int8

    @property
    def taps(self) -> int:
        return int(self.index.shape[0])


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


@functools.lru_cache(maxsize=64)
def torch_taps(n_in: int, n_out: int) -> TapTable:
    """Taps of ATen's antialiased bilinear kernel (float32 input, align_corners=False)."""
    f32, f64 = np.float32, np.float64
    scale = f32(n_in) / f32(n_out)  # area_pixel_compute_scale: float32 division
    upscale = bool(scale < 1.0)
    support = f32(1.0) if upscale else scale  # (interp_size / 2) * max(scale, 1), interp_size 2
    max_taps = 2 * int(np.ceil(support)) + 1
    invscale = f32(1.0) if upscale else f32(1.0 / f64(scale))

    i = np.arange(n_out, dtype=np.float64)
    center = (f64(scale) * (i + 0.5)).astype(np.float32)  # [n_out]: double product, one rounding
    lo = (center - support).astype(np.float64) + 0.5  # float32 subtraction, then double + 0.5
    hi = (center + support).astype(np.float64) + 0.5
    xmin = np.maximum(np.trunc(lo), 0).astype(np.intp)
    xsize = np.clip(np.minimum(np.trunc(hi).astype(np.intp), n_in) - xmin, 0, max_taps)

    t = np.arange(max_taps, dtype=np.intp)[:, None]  # [T, 1]
    src = xmin[None, :] + t  # [T, n_out]
    d = src.astype(np.float32) - center[None, :]  # float32 subtraction
    a = np.abs(((d.astype(np.float64) + 0.5) * f64(invscale)).astype(np.float32))
    valid = t < xsize[None, :]
    w = np.where(valid & (a < 1.0), f32(1.0) - a, f32(0.0)).astype(np.float32)
    total = np.zeros(n_out, dtype=np.float32)
    for k in range(max_taps):  # float32 running sum, in tap order
        total = total + w[k]
    nonzero = total != 0
    w = np.where(nonzero, w / np.where(nonzero, total, f32(1.0)), w).astype(np.float32)

    used = max(int(xsize.max(initial=0)), 1)
    # With m = n - 1 taps after the first, taps 1..4*floor(m/4) are plain and the last m mod 4
    # are fused (see the module docstring).
    first_fused = 1 + 4 * (np.maximum(xsize - 1, 0) // 4)  # [n_out]
    tt = t[:used]
    kind = np.where(tt >= first_fused[None, :], FUSED, PLAIN).astype(np.int8)
    kind[0] = PLAIN
    kind[~valid[:used]] = NONE
    table = TapTable(n_in, n_out, np.clip(src[:used], 0, n_in - 1), w[:used], kind)
    _readonly(table.index, table.weight, table.kind)
    return table


@functools.lru_cache(maxsize=64)
def tensorflow_taps(n_in: int, n_out: int) -> TapTable:
    """Taps of TensorFlow's scale_and_translate (triangle kernel, antialias, translation 0)."""
    f32, f64 = np.float32, np.float64
    scale = f32(n_out) / f32(n_in)
    inv_scale = f32(1.0 / f64(scale))
    kernel_scale = max(inv_scale, f32(1.0))
    span_size = min(2 * int(np.ceil(kernel_scale)) + 1, n_in)
    one_over_ks = f32(1.0) / kernel_scale

    x = np.arange(n_out, dtype=np.float32)
    sample = (x + f32(0.5)) * inv_scale  # float32; adding the -0.0 translation is a no-op
    start = np.clip(np.ceil((sample - kernel_scale) - f32(0.5)).astype(np.int64), 0, n_in - 1)
    end = np.clip(np.floor((sample + kernel_scale) - f32(0.5)).astype(np.int64), 0, n_in - 1) + 1

    t = np.arange(span_size, dtype=np.int64)[:, None]
    src = start[None, :] + t  # [T, n_out]
    valid = src < end[None, :]
    pos = (src.astype(np.float32) + f32(0.5)) - sample[None, :]  # two float32 roundings
    a = np.abs(pos * one_over_ks)
    w = np.where(valid & (a < 1.0), f32(1.0) - a, f32(0.0)).astype(np.float32)
    total = np.zeros(n_out, dtype=np.float32)
    for k in range(span_size):
        total = total + w[k]
    ok = np.abs(total) >= f32(1000.0) * np.finfo(np.float32).tiny
    inv_total = f32(1.0) / np.where(ok, total, f32(1.0))
    w = np.where(ok[None, :], w * inv_total[None, :], f32(0.0)).astype(np.float32)

    # TF accumulates every tap of the span, zero weights included, as a plain multiply-add
    # (0 + w*x for the first); the zero-weight tail changes nothing, so it is left out here.
    kind = np.where(valid, PLAIN, NONE).astype(np.int8)
    kind[0] = PLAIN
    table = TapTable(n_in, n_out, np.clip(src, 0, n_in - 1).astype(np.intp), w, kind)
    _readonly(table.index, table.weight, table.kind)
    return table


_TAPS = {"torch-bilinear": torch_taps, "tensorflow": tensorflow_taps}


@dataclass(frozen=True)
class Run:
    """Tap t applied to the sorted outputs [start, stop): the input indices, and the weights
    shaped to broadcast along the pass axis (float64 for fused steps)."""

    start: int
    stop: int
    fused: bool
    index: np.ndarray  # [stop - start] intp
    weight: np.ndarray  # [k, 1] or [1, k]


@dataclass(frozen=True)
class Schedule:
    """A TapTable laid out for one pass along ``axis`` of a 2-D array whose resized axis holds
    ``channels`` interleaved values per position.

    Outputs (position*C + c) are sorted by their tap pattern; ``runs[t]`` covers the sorted
    outputs tap t applies to in a few contiguous runs (outputs without a tap t inside a run have
    weight 0 there, which leaves them unchanged). ``unsort`` gathers the sorted results back into
    natural order (None if the order is already natural)."""

    axis: int
    n_out: int  # outputs along the axis (positions * channels)
    index0: np.ndarray  # [n_out] tap 0
    weight0: np.ndarray  # [n_out] tap 0, shaped to broadcast
    runs: tuple[tuple[Run, ...], ...]  # for taps 1..T-1
    unsort: np.ndarray | None


def _runs(kinds: np.ndarray) -> list[tuple[int, int, bool]]:
    """Contiguous runs of PLAIN/FUSED over ``kinds`` (NONE entries join the run before them)."""
    active = np.flatnonzero(kinds != NONE)
    if not len(active):
        return []
    lo, hi = int(active[0]), int(active[-1]) + 1
    k = kinds[lo:hi]
    last = np.maximum.accumulate(np.where(k != NONE, np.arange(len(k)), 0))
    k = k[last]  # forward-fill: NONE takes the kind before it
    change = np.flatnonzero(np.diff(k)) + 1
    bounds = [0, *change.tolist(), len(k)]
    return [(lo + a, lo + b, bool(k[a] == FUSED)) for a, b in itertools.pairwise(bounds)]


@functools.lru_cache(maxsize=64)
def schedule(method: str, n_in: int, n_out: int, channels: int, axis: int) -> Schedule:
    """How to run ``method``'s taps for n_in -> n_out along ``axis`` with ``channels`` values
    per position (C for a pass along interleaved pixels, 1 along rows)."""
    table = _TAPS[method](n_in, n_out)
    # Sort outputs by their kind pattern (stable), so every tap covers few contiguous runs.
    order = np.lexsort(table.kind[::-1].astype(np.int16))
    c = np.arange(channels)
    order = (order[:, None] * channels + c).reshape(-1)
    index = (table.index[:, :, None] * channels + c).reshape(table.taps, -1)[:, order]
    kind = np.repeat(table.kind, channels, axis=-1)[:, order]
    weight = np.repeat(table.weight, channels, axis=-1)[:, order]
    shape = (-1, 1) if axis == 0 else (1, -1)

    def run(t: int, a: int, b: int, fused: bool) -> Run:
        w = weight[t, a:b].astype(np.float64 if fused else np.float32).reshape(shape)
        r = Run(a, b, fused, np.ascontiguousarray(index[t, a:b]), w)
        _readonly(r.index, r.weight)
        return r

    natural = bool(np.all(order[1:] > order[:-1]))
    sched = Schedule(
        axis=axis, n_out=table.n_out * channels, index0=np.ascontiguousarray(index[0]),
        weight0=np.ascontiguousarray(weight[0]).reshape(shape),
        runs=tuple(tuple(run(t, *r) for r in _runs(kind[t])) for t in range(1, table.taps)),
        unsort=None if natural else np.argsort(order).astype(np.intp))
    _readonly(sched.index0, sched.weight0)
    return sched


# --- one pass --------------------------------------------------------------------------------

class _Tiles:
    """Weights broadcast to the block shape, made once per pass on first use: numpy multiplies
    two contiguous arrays about twice as fast as an array by a broadcast weight vector. The last
    (smaller) block uses a slice of the same tile."""

    def __init__(self, axis: int, step: int):
        self.axis, self.step = axis, step
        self._tiles: dict[int, np.ndarray] = {}

    def __call__(self, weight: np.ndarray, extent: int) -> np.ndarray:
        tile = self._tiles.get(id(weight))
        if tile is None:
            shape = (weight.shape[0], self.step) if self.axis == 0 else (self.step, weight.shape[1])
            tile = self._tiles[id(weight)] = np.ascontiguousarray(np.broadcast_to(weight, shape))
        return tile[:, :extent] if self.axis == 0 else tile[:extent]


def _run_pass(x: np.ndarray, sched: Schedule, out: np.ndarray,
              epilogue: _Epilogue | None = None, method: str | None = None) -> None:
    """Resample 2-D float32 ``x`` along ``sched.axis`` into ``out``, block by block (blocks split
    the other axis); ``epilogue`` clips/normalises each finished block into ``out``. A uint8
    ``x`` is converted block by block the way back-end ``method`` converts it."""
    axis = sched.axis
    other = x.shape[1] if axis == 0 else x.shape[0]
    along = max(x.shape[axis], sched.n_out)
    # A small pass runs as one block (no per-block overhead); a large one in cache-sized blocks.
    step = other if x.size <= SINGLE_BLOCK_VALUES else max(1, BLOCK_VALUES // along)
    if epilogue is not None and axis == 0 and step < other:
        step = max(epilogue.channels, step - step % epilogue.channels)  # channel-aligned blocks
    step = min(step, other)
    tiles = _Tiles(axis, step)
    # Row blocks of a contiguous `out` can be computed in place (no copy at the end).
    direct = epilogue is None and axis == 1 and out.flags.c_contiguous
    for b0 in range(0, other, step):
        b1 = min(other, b0 + step)
        xb = x[:, b0:b1] if axis == 0 else x[b0:b1]
        if xb.dtype == np.uint8:
            xb = _to_float(xb, str(method))
        dest = out[:, b0:b1] if axis == 0 else out[b0:b1]
        # Tap 0: acc = f32(x * w). mode="wrap" skips bounds checks (indices are in range).
        acc = xb.take(sched.index0, axis=axis, mode="wrap",
                      out=dest if direct and sched.unsort is None else None)
        np.multiply(acc, tiles(sched.weight0, b1 - b0), out=acc)
        for runs in sched.runs:
            for r in runs:
                a = acc[r.start:r.stop] if axis == 0 else acc[:, r.start:r.stop]
                g = xb.take(r.index, axis=axis, mode="wrap")
                w = tiles(r.weight, b1 - b0) if r.stop - r.start > TILE_MIN else r.weight
                if r.fused:  # f32(f64(x) * f64(w) + f64(acc)): the float64 product is exact
                    prod = g.astype(np.float64)
                    np.multiply(prod, w, out=prod)
                    np.add(prod, a, out=prod)
                    np.copyto(a, prod, casting="same_kind")
                else:  # f32(acc + f32(x * w))
                    np.multiply(g, w, out=g)
                    np.add(a, g, out=a)
        if sched.unsort is not None:  # back to natural order
            if direct:
                acc.take(sched.unsort, axis=axis, mode="wrap", out=dest)
                continue
            acc = acc.take(sched.unsort, axis=axis, mode="wrap")
        elif direct:
            continue
        if epilogue is not None:
            epilogue(acc, dest, b0 if axis == 0 else None)
        else:
            np.copyto(dest, acc)


class Workspace:
    """Scratch arrays kept between calls (per thread), so preprocessing a stream of images of the
    same size does not pay for fresh memory (page faults) on every call. At most ``max_bytes``
    are retained; larger requests are allocated and dropped as usual."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._local = threading.local()

    def get(self, role: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """An uninitialised array; the same one again for the same (role, shape, dtype) in this
        thread, so a caller must be done with it before asking for that role again."""
        bufs: OrderedDict[tuple[object, ...], np.ndarray] = self._local.__dict__.setdefault(
            "bufs", OrderedDict())
        key = (role, tuple(shape), np.dtype(dtype).str)
        arr = bufs.get(key)
        if arr is not None:
            bufs.move_to_end(key)
            return arr
        arr = np.empty(shape, dtype)
        if arr.nbytes <= self.max_bytes:
            bufs[key] = arr
            while sum(a.nbytes for a in bufs.values()) > self.max_bytes:
                bufs.popitem(last=False)  # least recently used
        return arr

    def clear(self) -> None:
        """Release this thread's retained arrays."""
        self._local.__dict__.pop("bufs", None)


def _new(workspace: Workspace | None, role: str, shape: tuple[int, ...]) -> np.ndarray:
    if workspace is None:
        return np.empty(shape, dtype=np.float32)
    return workspace.get(role, shape)


class _Epilogue:
    """Clip to [0, 1], then optionally ``(x - mean) / std`` (float32, subtract then divide, as the
    official code), written into the destination block. mean/std are per channel; they are tiled
    to the block shape once per pass (numpy is ~2x faster on two contiguous arrays than with a
    broadcast row), which needs column blocks to start at a multiple of ``channels``."""

    def __init__(self, row_values: int, channels: int, mean: np.ndarray | None,
                 std: np.ndarray | None):
        self.channels = channels
        reps = row_values // channels
        self.mean = None if mean is None else np.tile(np.asarray(mean, np.float32), reps)
        self.std = None if std is None else np.tile(np.asarray(std, np.float32), reps)
        self._tiles: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, acc: np.ndarray, dest: np.ndarray, col0: int | None) -> None:
        """``col0``: first column of a column block (a multiple of ``channels``), None for a
        block of whole rows."""
        np.clip(acc, 0.0, 1.0, out=acc)
        if self.mean is None or self.std is None:
            np.copyto(dest, acc)
            return
        rows, cols = acc.shape
        tiles = self._tiles
        if tiles is None or tiles[0].shape[0] < rows or tiles[0].shape[1] < cols:
            span = slice(0, cols)  # same channel phase for every block
            tiles = self._tiles = (
                np.ascontiguousarray(np.broadcast_to(self.mean[span], acc.shape)),
                np.ascontiguousarray(np.broadcast_to(self.std[span], acc.shape)))
        if col0 is None and cols != len(self.mean):
            raise AssertionError("row blocks must cover whole rows")
        mean, std = tiles[0][:rows, :cols], tiles[1][:rows, :cols]
        np.subtract(acc, mean, out=acc)
        np.divide(acc, std, out=dest)


# --- public ----------------------------------------------------------------------------------

def _to_float(x: np.ndarray, method: str, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 -> float32 in [0, 1] exactly as back-end ``method`` converts."""
    y = np.empty(x.shape, np.float32) if out is None else out
    np.copyto(y, x)  # exact
    if method == "torch-bilinear":
        np.divide(y, np.float32(255.0), out=y)  # torchvision: true division by 255
    else:
        np.multiply(y, np.float32(1.0 / 255.0), out=y)  # TF: times the float32 of 1/255
    return y


class ResizeSource:
    """A uint8 [H, W, C] image and its float32 conversion per back-end, computed once and shared
    by every resize of the same image (the global crop and the high-res canvas). Images above
    ``SHARED_FLOAT_PIXELS`` are converted block by block instead (no float32 copy of a huge
    image is kept)."""

    SHARED_FLOAT_PIXELS = 8_000_000

    def __init__(self, image: np.ndarray, workspace: Workspace | None = None):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected a uint8 [H, W, C] array, got {image.dtype} {image.shape}")
        self.image = image
        self.workspace = workspace
        self._float: dict[str, np.ndarray] = {}

    def as_float(self, method: str) -> np.ndarray:
        """[H, W*C] float32 (or, for a huge image, the uint8 [H, W*C] view to convert per
        block)."""
        h, w, c = self.image.shape
        flat = self.image.reshape(h, w * c)
        if h * w > self.SHARED_FLOAT_PIXELS:
            return flat
        x = self._float.get(method)
        if x is None:
            x = self._float[method] = _to_float(
                flat, method, _new(self.workspace, f"float:{method}", (h, w * c)))
        return x


def resize_into(image: np.ndarray | ResizeSource, out: np.ndarray,
                method: ResizeMethod | str = "torch-bilinear", mean: np.ndarray | None = None,
                std: np.ndarray | None = None) -> None:
    """Resize uint8 ``image`` [H, W, C] into float32 ``out`` [h, w, C] (may be a view with
    strided rows, e.g. the inside of a padded canvas), bit-exact with the official back-end
    ``method``, then clip to [0, 1] and, if ``mean``/``std`` are given, ``(x - mean) / std``."""
    src = image if isinstance(image, ResizeSource) else ResizeSource(image)
    h, w, c = src.image.shape
    if out.dtype != np.float32 or out.ndim != 3 or out.shape[2] != c:
        raise ValueError(f"out must be float32 [h, w, {c}], got {out.dtype} {out.shape}")
    height, width = out.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    if method == "torch-bilinear":
        # ATen: width first, then height; a dimension whose size is unchanged is skipped.
        passes = [p for p, changes in (("w", w != width), ("h", h != height)) if changes]
    elif method == "tensorflow":
        passes = ["h", "w"]  # scale_and_translate: rows first, then columns, always both
    else:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")

    out2d = out.view()
    try:  # a view [h, w*C]: rows may be strided (inside a canvas), each row contiguous
        out2d.shape = (height, width * c)
    except AttributeError as e:
        raise ValueError("out must have contiguous rows (a slice of a C-contiguous canvas)") from e
    epilogue = _Epilogue(width * c, c, mean, std)
    x = src.as_float(method)  # [H, W*C] float32, or uint8 for a huge image
    if not passes:  # identity: only the uint8 -> float32 conversion
        epilogue(_to_float(x, method) if x.dtype == np.uint8 else x.copy(), out2d, None)
        return
    for k, which in enumerate(passes):
        if which == "w":
            sched = schedule(method, x.shape[1] // c, width, c, 1)
            shape = (x.shape[0], width * c)
        else:
            sched = schedule(method, x.shape[0], height, 1, 0)
            shape = (height, x.shape[1])
        if k == len(passes) - 1:
            _run_pass(x, sched, out2d, epilogue, method)
        else:
            y = _new(src.workspace, f"pass{k}", shape)
            _run_pass(x, sched, y, method=method)
            x = y


def resize_uint8(image: np.ndarray, height: int, width: int,
                 method: ResizeMethod | str = "torch-bilinear") -> np.ndarray:
    """Resize a uint8 [H, W, C] image to a new float32 [height, width, C] array in [0, 1]."""
    if image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] array, got shape {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    out = np.empty((height, width, image.shape[2]), dtype=np.float32)
    resize_into(image, out, method)
    return out
