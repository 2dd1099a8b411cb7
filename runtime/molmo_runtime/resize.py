"""The two antialiased bilinear resizers of the official Molmo processor, bit-exact, in numpy.

Molmo's hub processor resizes a uint8 HxWx3 image to float32 in [0, 1] with either

* ``"torch-bilinear"`` (the current default): torchvision ``Resize(BILINEAR, antialias=True)`` on
  ``uint8 / 255``, i.e. ATen's ``_upsample_bilinear2d_aa`` CPU kernel; or
* ``"tensorflow"`` (the original training code): ``tf.image.resize(BILINEAR, antialias=True)``,
  i.e. TensorFlow's ``scale_and_translate`` with a triangle kernel.

Both are separable: a 1-D resize along one axis, then along the other. Each 1-D resize is "for
every output index, a weighted sum of a few consecutive input samples". The weights and the first
input index depend only on (n_in, n_out), so they are computed once per size pair (cached) as
tap tables ``index[T, n_out]`` / ``weight[T, n_out]``; the pass then loops over the T taps (never
over pixels), each tap being a row gather plus a multiply-add over the whole image, in exactly the
order and float32 rounding the reference kernels use (../shared/docs/molmo_architecture.md §6.4,
../shared/golden/README.md §4.5):

* torch: ``acc = in[0]*w0``; of the remaining m = n-1 taps the first 4*floor(m/4) are added as
  ``f32(acc + f32(in*w))`` and the last ``m mod 4`` are fused multiply-adds (the AVX2/AVX512 ATen
  build vectorises the reduction in blocks of 4 and finishes with an FMA scalar tail). An FMA of
  float32 values is emulated as ``f32(f64(in)*f64(w) + f64(acc))``: the float64 product of two
  float32 values is exact, so only the final rounding matters.
* tensorflow: ``acc = 0; acc = f32(acc + f32(w*in))`` for every tap, no FMA.

The passes always run along axis 0 of a 2-D ``[n, K]`` array (K = the other image axis x 3
channels), so each gather moves whole contiguous rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

ResizeMethod = Literal["torch-bilinear", "tensorflow"]
RESIZE_METHODS: tuple[str, ...] = ("torch-bilinear", "tensorflow")

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
    """Precomputed 1-D resampling taps for one axis (n_in -> n_out).

    ``index[t, i]`` is the input sample of tap t of output i (clamped into range; its weight is 0
    where output i has fewer than t+1 taps), ``weight`` the float32 weight, ``weight64`` the same
    weights as float64 (for the FMA emulation). ``fused_rows[t]`` / ``plain_rows[t]`` (torch only)
    are the outputs whose tap t must be fused / not fused; outputs without a tap t are in neither.
    """

    n_in: int
    n_out: int
    index: np.ndarray  # [T, n_out] intp
    weight: np.ndarray  # [T, n_out] float32
    weight64: np.ndarray  # [T, n_out] float64
    fused_rows: tuple[np.ndarray, ...]  # T entries, each [k] intp
    plain_rows: tuple[np.ndarray, ...]

    @property
    def taps(self) -> int:
        return int(self.index.shape[0])


def _freeze(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


@functools.lru_cache(maxsize=64)
def torch_taps(n_in: int, n_out: int) -> TapTable:
    """Tap table of ATen's antialiased bilinear kernel (float32 input, align_corners=False)."""
    f32, f64 = np.float32, np.float64
    scale = f32(n_in) / f32(n_out)  # area_pixel_compute_scale: float32 division
    upscale = bool(scale < 1.0)
    support = f32(1.0) if upscale else scale  # interp_size/2 * max(scale, 1), bilinear: 2/2
    max_taps = 2 * int(np.ceil(support)) + 1
    invscale = f32(1.0) if upscale else f32(1.0 / f64(scale))

    i = np.arange(n_out, dtype=np.float64)
    center = (f64(scale) * (i + 0.5)).astype(np.float32)  # [n_out], double product, one rounding
    lo = (center - support).astype(np.float64) + 0.5  # float32 subtraction, double + 0.5
    hi = (center + support).astype(np.float64) + 0.5
    xmin = np.maximum(np.trunc(lo), 0).astype(np.intp)
    xsize = np.clip(np.minimum(np.trunc(hi).astype(np.intp), n_in) - xmin, 0, max_taps)

    t = np.arange(max_taps, dtype=np.intp)[:, None]  # [T, 1]
    src = xmin[None, :] + t  # [T, n_out]
    d = src.astype(np.float32) - center[None, :]  # float32 subtraction
    a = ((d.astype(np.float64) + 0.5) * f64(invscale)).astype(np.float32)
    a = np.abs(a)
    w = np.where(a < 1.0, f32(1.0) - a, f32(0.0)).astype(np.float32)
    valid = t < xsize[None, :]
    w = np.where(valid, w, f32(0.0))
    total = np.zeros(n_out, dtype=np.float32)
    for k in range(max_taps):  # float32 running sum, in tap order
        total = total + w[k]
    safe_total = np.where(total != 0, total, f32(1.0))
    w = np.where(total != 0, w / safe_total, w).astype(np.float32)  # float32 division

    n_taps_used = max(int(xsize.max(initial=0)), 1)
    src, w, valid = src[:n_taps_used], w[:n_taps_used], valid[:n_taps_used]
    index = np.clip(src, 0, n_in - 1)

    # Which taps are fused: with m = n - 1 further taps after the first, taps 1..4*floor(m/4) are
    # plain and the last m mod 4 are FMAs.
    m = xsize - 1
    first_fused = 1 + 4 * (np.maximum(m, 0) // 4)  # [n_out]
    tt = np.arange(n_taps_used)[:, None]
    fused = valid & (tt >= first_fused[None, :]) & (tt >= 1)
    plain = valid & ~fused & (tt >= 1)
    fused_rows = tuple(np.flatnonzero(fused[k]) for k in range(n_taps_used))
    plain_rows = tuple(np.flatnonzero(plain[k]) for k in range(n_taps_used))
    w64 = w.astype(np.float64)
    _freeze(index, w, w64, *fused_rows, *plain_rows)
    return TapTable(n_in, n_out, index, w, w64, fused_rows, plain_rows)


@functools.lru_cache(maxsize=64)
def tensorflow_taps(n_in: int, n_out: int) -> TapTable:
    """Tap table of TensorFlow's scale_and_translate (triangle kernel, antialias, translation 0)."""
    f32, f64 = np.float32, np.float64
    scale = f32(n_out) / f32(n_in)
    inv_scale = f32(1.0 / f64(scale))
    kernel_scale = max(inv_scale, f32(1.0))
    span_size = min(2 * int(np.ceil(kernel_scale)) + 1, n_in)
    one_over_ks = f32(1.0) / kernel_scale

    x = np.arange(n_out, dtype=np.float32)
    sample = (x + f32(0.5)) * inv_scale  # float32; adding the -0.0 translation is a no-op
    start = np.ceil((sample - kernel_scale) - f32(0.5)).astype(np.int64)
    end = np.floor((sample + kernel_scale) - f32(0.5)).astype(np.int64)
    start = np.clip(start, 0, n_in - 1)
    end = np.clip(end, 0, n_in - 1) + 1

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

    index = np.clip(src, 0, n_in - 1).astype(np.intp)
    w64 = w.astype(np.float64)
    empty = tuple(np.empty(0, dtype=np.intp) for _ in range(span_size))
    _freeze(index, w, w64)
    return TapTable(n_in, n_out, index, w, w64, empty, empty)


def _plain_tap(acc: np.ndarray, gathered: np.ndarray, w: np.ndarray) -> None:
    """acc = f32(acc + f32(gathered * w)), in place (gathered is scratch)."""
    np.multiply(gathered, w[:, None], out=gathered)
    np.add(acc, gathered, out=acc)


def _fused_tap(acc: np.ndarray, gathered: np.ndarray, w64: np.ndarray) -> None:
    """acc = fma(gathered, w, acc) rounded to float32, emulated in float64, in place."""
    prod = np.multiply(gathered, w64[:, None])  # float64, exact
    np.add(prod, acc, out=prod)
    np.copyto(acc, prod, casting="same_kind")


def _torch_pass(x: np.ndarray, taps: TapTable) -> np.ndarray:
    """Resize axis 0 of float32 ``x`` [n_in, K] -> [n_out, K] with ATen's accumulation order."""
    acc = np.take(x, taps.index[0], axis=0)  # [n_out, K]
    np.multiply(acc, taps.weight[0][:, None], out=acc)
    for t in range(1, taps.taps):
        fused, plain = taps.fused_rows[t], taps.plain_rows[t]
        if len(fused) == 0 and len(plain) == 0:
            continue
        gathered = np.take(x, taps.index[t], axis=0)  # [n_out, K]
        # Outputs without a tap t have weight 0 there, so a whole-array step leaves them
        # unchanged. The majority kind of step runs on the whole array; the rows that need the
        # other kind are saved first and redone separately (borders of the image, mostly).
        if len(fused) >= len(plain):
            minority, w_min = plain, taps.weight[t]
            rows_acc = acc[minority]
            rows_in = gathered[minority]
            _fused_tap(acc, gathered, taps.weight64[t])
            if len(minority):
                _plain_tap(rows_acc, rows_in, w_min[minority])
                acc[minority] = rows_acc
        else:
            minority = fused
            rows_acc = acc[minority]
            rows_in = gathered[minority]
            _plain_tap(acc, gathered, taps.weight[t])
            if len(minority):
                _fused_tap(rows_acc, rows_in, taps.weight64[t][minority])
                acc[minority] = rows_acc
    return acc


def _tensorflow_pass(x: np.ndarray, taps: TapTable) -> np.ndarray:
    """Resize axis 0 of float32 ``x`` [n_in, K] with TF's plain float32 multiply-add."""
    acc = np.take(x, taps.index[0], axis=0)
    np.multiply(acc, taps.weight[0][:, None], out=acc)  # 0 + w*in == f32(w*in)
    for t in range(1, taps.taps):
        gathered = np.take(x, taps.index[t], axis=0)
        _plain_tap(acc, gathered, taps.weight[t])
    return acc


def resize_uint8(image: np.ndarray, height: int, width: int,
                 method: ResizeMethod = "torch-bilinear") -> np.ndarray:
    """Resize a uint8 [H, W, 3] image to float32 [height, width, 3] in [0, 1], bit-exact with the
    official back-end ``method`` (then clipped to [0, 1] as the official code does)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] array, got {image.dtype} {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    h, w, c = image.shape
    if method == "torch-bilinear":
        lut, taps_fn, pass_fn = _TORCH_U8_TO_F32, torch_taps, _torch_pass
        # ATen: width first, then height; an unchanged dimension is skipped entirely.
        resize_w, resize_h, width_first = w != width, h != height, True
    elif method == "tensorflow":
        lut, taps_fn, pass_fn = _TF_U8_TO_F32, tensorflow_taps, _tensorflow_pass
        # scale_and_translate: rows (height) first, then columns; both always executed.
        resize_w, resize_h, width_first = True, True, False
    else:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")

    def along_height(x: np.ndarray) -> np.ndarray:  # x: [H, W', C]
        hh, ww, cc = x.shape
        return pass_fn(x.reshape(hh, ww * cc), taps_fn(hh, height)).reshape(height, ww, cc)

    def along_width(x: np.ndarray) -> np.ndarray:  # x: [W, H', C] (width leading)
        ww, hh, cc = x.shape
        return pass_fn(x.reshape(ww, hh * cc), taps_fn(ww, width)).reshape(width, hh, cc)

    if width_first:
        if resize_w:
            xt = np.take(lut, image.transpose(1, 0, 2))  # [W, H, C] float32, one pass
            out = np.ascontiguousarray(along_width(xt).transpose(1, 0, 2))  # [H, W', C]
        else:
            out = np.take(lut, image)
        if resize_h:
            out = along_height(out)
    else:
        x = np.take(lut, image)
        if resize_h:
            x = along_height(x)
        if resize_w:
            xt = np.ascontiguousarray(x.transpose(1, 0, 2))
            x = np.ascontiguousarray(along_width(xt).transpose(1, 0, 2))
        out = x
    np.clip(out, 0.0, 1.0, out=out)
    assert out.shape == (height, width, c)
    return out
