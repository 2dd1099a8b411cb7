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

Speed: the image is processed in blocks of ~64k values along the axis that is *not* resized, so
every temporary stays in the CPU's L2 cache; the last pass also clips, normalises and writes
straight into the caller's canvas (``resize_into``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

ResizeMethod = Literal["torch-bilinear", "tensorflow"]
RESIZE_METHODS: tuple[str, ...] = ("torch-bilinear", "tensorflow")

# Values per block of work (float32): 256 KiB, a fraction of a typical L2 cache.
BLOCK_VALUES = 1 << 18
# Along axis 0, taps that only a few outputs have are applied to those rows only.
SUBSET_FRACTION = 0.5

# uint8 -> float32 conversions of the two back-ends (a 256-entry lookup table each).
_U8 = np.arange(256, dtype=np.float32)
# torchvision convert_image_dtype: true division by 255 (correctly rounded).
_TORCH_U8_TO_F32 = _U8 / np.float32(255.0)
# tf.image.convert_image_dtype: multiplication by the float32 constant 1/255.
_TF_U8_TO_F32 = _U8 * np.float32(1.0 / 255.0)
for _lut in (_TORCH_U8_TO_F32, _TF_U8_TO_F32):
    _lut.setflags(write=False)


@dataclass(frozen=True)
class TapTable:
    """1-D resampling taps for one axis (n_in -> n_out).

    ``index[t, i]``: input sample of tap t of output i (clamped into range; its weight is 0 where
    output i has fewer than t+1 taps). ``weight`` float32, ``weight64`` the same as float64.
    ``fused[t]`` / ``plain[t]``: the outputs whose tap t is a fused / a plain multiply-add
    (outputs without a tap t are in neither).
    """

    n_in: int
    n_out: int
    index: np.ndarray  # [T, n_out] intp
    weight: np.ndarray  # [T, n_out] float32
    weight64: np.ndarray  # [T, n_out] float64
    fused: tuple[np.ndarray, ...]  # T entries of [k] intp
    plain: tuple[np.ndarray, ...]

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
    src, w, valid = src[:used], w[:used], valid[:used]
    # With m = n - 1 taps after the first, taps 1..4*floor(m/4) are plain and the last m mod 4
    # are fused (see the module docstring).
    first_fused = 1 + 4 * (np.maximum(xsize - 1, 0) // 4)  # [n_out]
    tt = np.arange(used)[:, None]
    fused = valid & (tt >= first_fused[None, :])
    plain = valid & ~fused & (tt >= 1)
    table = TapTable(
        n_in, n_out, np.clip(src, 0, n_in - 1), w, w.astype(np.float64),
        tuple(np.flatnonzero(fused[k]) for k in range(used)),
        tuple(np.flatnonzero(plain[k]) for k in range(used)))
    _readonly(table.index, table.weight, table.weight64, *table.fused, *table.plain)
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

    everything = np.arange(n_out, dtype=np.intp)
    none = np.empty(0, dtype=np.intp)
    # TF accumulates every tap of the span (zero weights included) as a plain multiply-add.
    table = TapTable(n_in, n_out, np.clip(src, 0, n_in - 1).astype(np.intp), w,
                     w.astype(np.float64), (none,) * span_size, (everything,) * span_size)
    _readonly(table.index, table.weight, table.weight64, everything, none)
    return table


@functools.lru_cache(maxsize=64)
def interleaved_taps(method: str, n_in: int, n_out: int, channels: int) -> TapTable:
    """The taps of ``method`` on rows of ``channels``-interleaved values (i -> i*C + c), for
    resampling axis 1 of an [H, W*C] array."""
    table = _TAPS[method](n_in, n_out)
    c = np.arange(channels)

    def spread(ix: np.ndarray) -> np.ndarray:
        return (ix[..., None] * channels + c).reshape(*ix.shape[:-1], -1)

    out = TapTable(
        table.n_in * channels, table.n_out * channels, spread(table.index),
        np.repeat(table.weight, channels, axis=-1), np.repeat(table.weight64, channels, axis=-1),
        tuple(spread(f) for f in table.fused), tuple(spread(p) for p in table.plain))
    _readonly(out.index, out.weight, out.weight64, *out.fused, *out.plain)
    return out


_TAPS = {"torch-bilinear": torch_taps, "tensorflow": tensorflow_taps}


# --- one pass --------------------------------------------------------------------------------

def _plain_step(acc: np.ndarray, gathered: np.ndarray, w: np.ndarray) -> None:
    """acc = f32(acc + f32(gathered * w)) in place; ``gathered`` is scratch."""
    np.multiply(gathered, w, out=gathered)
    np.add(acc, gathered, out=acc)


def _fused_step(acc: np.ndarray, gathered: np.ndarray, w64: np.ndarray) -> None:
    """acc = f32(fma(gathered, w, acc)) in place, through an exact float64 product."""
    prod = np.multiply(gathered, w64)  # float64
    np.add(prod, acc, out=prod)
    np.copyto(acc, prod, casting="same_kind")


def _accumulate(xb: np.ndarray, tab: TapTable, axis: int) -> np.ndarray:
    """Resample float32 block ``xb`` along ``axis`` (0 or 1) with the taps of ``tab``."""
    shape = (-1, 1) if axis == 0 else (1, -1)

    def weights(t: int, rows: np.ndarray | None, fused: bool) -> np.ndarray:
        table = tab.weight64 if fused else tab.weight
        return (table[t] if rows is None else table[t][rows]).reshape(shape)

    def on_rows(acc_rows: np.ndarray, t: int, rows: np.ndarray, fused: bool) -> None:
        step = _fused_step if fused else _plain_step
        step(acc_rows, np.take(xb, tab.index[t][rows], axis=axis), weights(t, rows, fused))

    def put(acc: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
        if axis == 0:
            acc[rows] = values
        else:
            acc[:, rows] = values

    acc = np.take(xb, tab.index[0], axis=axis)
    np.multiply(acc, weights(0, None, False), out=acc)
    n = tab.n_out
    for t in range(1, tab.taps):
        fused, plain = tab.fused[t], tab.plain[t]
        if not len(fused) and not len(plain):
            continue
        if len(fused) + len(plain) < SUBSET_FRACTION * n:
            # Few outputs have a tap t: work on those only.
            for rows, is_fused in ((plain, False), (fused, True)):
                if len(rows):
                    sub = np.take(acc, rows, axis=axis)
                    on_rows(sub, t, rows, is_fused)
                    put(acc, rows, sub)
            continue
        # The larger group runs over all outputs (an output without a tap t has weight 0 there,
        # so it is left unchanged); the other group's outputs are saved first and redone.
        major_fused = len(fused) >= len(plain)
        minor = plain if major_fused else fused
        saved = np.take(acc, minor, axis=axis) if len(minor) else None
        step = _fused_step if major_fused else _plain_step
        step(acc, np.take(xb, tab.index[t], axis=axis), weights(t, None, major_fused))
        if saved is not None:
            on_rows(saved, t, minor, not major_fused)
            put(acc, minor, saved)
    return acc


def _run_pass(x: np.ndarray, tab: TapTable, axis: int, lut: np.ndarray | None,
              out: np.ndarray | None, epilogue: _Epilogue | None) -> np.ndarray:
    """Resample 2-D ``x`` along ``axis`` block by block (blocks split the other axis).

    ``lut``: x is uint8 and converted per block. ``out``: destination (else a new array);
    ``epilogue``: clip + normalise each finished block into ``out``."""
    n_rows, n_cols = x.shape
    out_shape = (tab.n_out, n_cols) if axis == 0 else (n_rows, tab.n_out)
    if out is None:
        out = np.empty(out_shape, dtype=np.float32)
    longest = max(tab.n_in, tab.n_out)
    step = max(1, BLOCK_VALUES // longest)
    other = n_cols if axis == 0 else n_rows
    for b0 in range(0, other, step):
        b1 = min(other, b0 + step)
        xb = x[:, b0:b1] if axis == 0 else x[b0:b1]
        xb = np.take(lut, xb) if lut is not None else xb
        acc = _accumulate(xb, tab, axis)
        dest = out[:, b0:b1] if axis == 0 else out[b0:b1]
        if epilogue is not None:
            epilogue(acc, dest, (slice(None), slice(b0, b1)) if axis == 0 else
                     (slice(None), slice(None)))
        else:
            dest[...] = acc
    return out


class _Epilogue:
    """Clip to [0, 1], then optionally ``(x - mean) / std`` (float32, subtract then divide, as the
    official code), written into the destination block. mean/std are per channel, tiled along the
    row so numpy's inner loops stay long."""

    def __init__(self, row_values: int, channels: int, mean: np.ndarray | None,
                 std: np.ndarray | None):
        reps = row_values // channels
        self.mean = None if mean is None else np.tile(mean.astype(np.float32), reps)[None, :]
        self.std = None if std is None else np.tile(std.astype(np.float32), reps)[None, :]

    def __call__(self, acc: np.ndarray, dest: np.ndarray, cols: tuple[slice, slice]) -> None:
        np.clip(acc, 0.0, 1.0, out=acc)
        if self.mean is None or self.std is None:
            dest[...] = acc
            return
        np.subtract(acc, self.mean[cols], out=acc)
        np.divide(acc, self.std[cols], out=dest)


# --- public ----------------------------------------------------------------------------------

def resize_into(image: np.ndarray, out: np.ndarray, method: ResizeMethod = "torch-bilinear",
                mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
    """Resize uint8 ``image`` [H, W, C] into float32 ``out`` [h, w, C] (may be a strided view,
    e.g. the inside of a padded canvas), bit-exact with the official back-end ``method``, then
    clip to [0, 1] and, if ``mean``/``std`` are given, normalise ``(x - mean) / std``."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] array, got {image.dtype} {image.shape}")
    if out.dtype != np.float32 or out.ndim != 3 or out.shape[2] != image.shape[2]:
        raise ValueError(f"out must be float32 [h, w, {image.shape[2]}], got {out.dtype} "
                         f"{out.shape}")
    (h, w, c), (height, width) = image.shape, out.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    if method == "torch-bilinear":
        lut = _TORCH_U8_TO_F32
        # ATen: width first, then height; a dimension whose size is unchanged is skipped.
        passes = [p for p, changes in (("w", w != width), ("h", h != height)) if changes]
    elif method == "tensorflow":
        lut = _TF_U8_TO_F32
        passes = ["h", "w"]  # scale_and_translate: rows first, then columns, always both
    else:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")

    out2d = out.view()
    try:  # a view [h, w*C]: rows may be strided (inside a canvas), each row contiguous
        out2d.shape = (height, width * c)
    except AttributeError as e:
        raise ValueError("out must have contiguous rows (a slice of a C-contiguous canvas)") from e
    epilogue = _Epilogue(width * c, c, mean, std)
    x: np.ndarray = image.reshape(h, w * c)
    x_lut: np.ndarray | None = lut
    if not passes:  # identity: only the uint8 -> float32 conversion
        epilogue(np.take(lut, x), out2d, (slice(None), slice(None)))
        return
    for k, which in enumerate(passes):
        last = k == len(passes) - 1
        if which == "w":
            tab, axis = interleaved_taps(method, x.shape[1] // c, width, c), 1
        else:
            tab, axis = _TAPS[method](x.shape[0], height), 0
        x = _run_pass(x, tab, axis, x_lut, out2d if last else None, epilogue if last else None)
        x_lut = None


def resize_uint8(image: np.ndarray, height: int, width: int,
                 method: ResizeMethod = "torch-bilinear") -> np.ndarray:
    """Resize a uint8 [H, W, C] image to a new float32 [height, width, C] array in [0, 1]."""
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    out = np.empty((height, width, image.shape[2] if image.ndim == 3 else 0), dtype=np.float32)
    resize_into(image, out, method)
    return out
