"""MolmoImageProcessor: the official Molmo image preprocessing in numpy, bit-exact.

Algorithm (../shared/docs/molmo_architecture.md §6), for a uint8 [H, W, 3] image:

1. Tiling: pick (rows, cols), rows*cols <= max_crops, for the image minus the overlap margins
   (``select_tiling``, float32 like the official code).
2. High-res canvas: resize the image (aspect kept, float32 size arithmetic) into a
   (rows*224 + 112) x (cols*224 + 112) canvas, pad with black (centred), normalise with the CLIP
   mean/std; cut rows*cols overlapping 336x336 crops (stride 224, so neighbours share 112 px).
3. Global crop: the whole image resized and padded into 336x336 the same way; it is crop 0.
4. Patchify each crop to [576, 588] (24x24 patches of 14x14x3, flattened as (dy, dx, channel)).
5. ``image_masks``: per patch of each high-res crop, the fraction of real (unpadded) pixels.
   **Quirk kept:** the rows are the high-res crops' masks followed by one row of -1, while crop 0
   of ``images`` is the global crop: row k belongs to high-res crop k+1 but is paired with crop k.
   The released checkpoints were trained with this shift.
6. ``image_input_idx``: for each crop's 12x12 pooled features, the position in the image token
   block of the ``<im_patch>`` token that receives it, or -100 for features in the overlap
   margins (closed form of §6.8).

Image tokens per image: ``160 + R*(C+1)`` with R = 8*rows + 4, C = 8*cols + 4 (316 for a 1x1
tiling, up to 1460 for 12x1). ``max_crops`` caps rows*cols: fewer crops means fewer image tokens
and lower latency (vision encoder and prefill), at some loss of detail on large images.

Never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molmo_runtime.errors import InputError
from molmo_runtime.image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageSource, load_image
from molmo_runtime.resize import RESIZE_METHODS, ResizeSource, Workspace, resize_into

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORED_INDEX = -100  # image_input_idx of a feature that is dropped (overlap margin)

# Keys a hub preprocessor_config.json / processor.json may carry that are metadata, not settings.
_METADATA_KEYS = frozenset({
    "auto_map", "image_processor_type", "processor_class", "format", "schema_version",
    "feature_extractor_type", "_processor_class",
})


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of the image-block special tokens (from the tokenizer)."""

    im_start: int
    im_end: int
    im_patch: int
    im_col: int


@dataclass(frozen=True)
class CropPlan:
    """Everything about an image's crops and tokens that depends only on its size."""

    height: int
    width: int
    tiling: tuple[int, int]  # (rows, cols) of high-res crops
    canvas: tuple[int, int]  # high-res canvas (H, W) in pixels
    resized: tuple[int, int]  # image size inside the canvas
    offset: tuple[int, int]  # (top, left) padding inside the canvas
    global_resized: tuple[int, int]  # image size inside the 336x336 global crop
    global_offset: tuple[int, int]
    pooled: tuple[int, int]  # (R, C) pooled token grid of the stitched high-res crops
    global_pooled: tuple[int, int]  # (12, 12)

    @property
    def n_crops(self) -> int:
        """Crops fed to the vision encoder: 1 global + rows*cols high-res."""
        return 1 + self.tiling[0] * self.tiling[1]

    @property
    def n_image_tokens(self) -> int:
        """Length of the image token block: 160 + R*(C+1) for the default geometry."""
        (gr, gc), (r, c) = self.global_pooled, self.pooled
        return (2 + gr * (gc + 1)) + (2 + r * (c + 1))

    @property
    def n_valid_features(self) -> int:
        """Features that land on an ``<im_patch>`` token (the others are -100)."""
        (gr, gc), (r, c) = self.global_pooled, self.pooled
        return gr * gc + r * c


def select_tiling(h: int, w: int, patch_size: int, max_num_crops: int) -> tuple[int, int]:
    """The official tiling choice, in float32 (h, w may be <= 0 for tiny images; the numpy
    inf/negative semantics of the official code are reproduced, warnings silenced)."""
    tilings = [(i, j) for i in range(1, max_num_crops + 1) for j in range(1, max_num_crops + 1)
               if i * j <= max_num_crops]
    tilings.sort(key=lambda t: (t[0] * t[1], t[0]))  # ties favour fewer crops, then fewer rows
    candidates = np.array(tilings, dtype=np.int32)  # [n, 2]
    size = np.array([h, w], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale_d = (candidates * patch_size).astype(np.float32) / size  # [n, 2]
    scale = np.min(scale_d, axis=-1)  # [n]
    if np.all(scale < 1):
        ix = int(np.argmax(scale))  # forced to downscale: downscale least
    else:
        ix = int(np.argmin(np.where(scale < 1.0, np.float32(1e10), scale)))  # upscale least
    return int(candidates[ix, 0]), int(candidates[ix, 1])


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image scaled to fit (target_h, target_w), aspect kept, as the official code
    computes it: float32 scale, float32 product, truncated. (480x640 -> 336x336 gives 251x336;
    float64 arithmetic would give 252.)"""
    f32 = np.float32
    scale = min(f32(target_w) / f32(width), f32(target_h) / f32(height))
    return int(f32(height) * scale), int(f32(width) * scale)


@functools.lru_cache(maxsize=4)
def _mask_fraction_table(patch: int) -> np.ndarray:
    """[patch*patch + 1] float32: the official mean of a patch's bool pixel mask with k True
    pixels (computed with the very numpy reduction the official code uses)."""
    n = patch * patch
    rows = np.tri(n + 1, n, -1, dtype=bool)[:, ::-1]  # row k has k True entries
    table: np.ndarray = np.asarray(rows.astype(np.float32).mean(axis=-1), dtype=np.float32)
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class MolmoImageProcessor:
    """Settings of the Molmo image processor (the hub ``preprocessor_config.json`` values as
    defaults) and the preprocessing itself. Frozen: use :meth:`replace` for a variant, e.g.
    ``proc.replace(max_crops=4)``.

    ``resize_method``: ``"torch-bilinear"`` (current hub default) or ``"tensorflow"`` (the
    original training code's resize; differs by up to ~3e-4 after normalisation).
    ``max_image_pixels``: images with more pixels are refused before decoding.
    """

    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    base_image_input_size: tuple[int, int] = (336, 336)
    image_patch_size: int = 14
    image_token_length_w: int = 12
    image_token_length_h: int = 12
    image_padding_mask: bool = True
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize_method: str = "torch-bilinear"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Scratch arrays reused between calls (not a setting; see resize.Workspace).
    _workspace: Workspace = field(default_factory=Workspace, init=False, repr=False,
                                  compare=False)

    def __post_init__(self) -> None:
        def as_tuple(name: str, n: int, kind: type) -> None:
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value,) * n
            try:
                value = tuple(kind(v) for v in value)
            except (TypeError, ValueError) as e:
                raise InputError(f"MolmoImageProcessor.{name}: expected {n} numbers, got "
                                 f"{getattr(self, name)!r}") from e
            if len(value) != n:
                raise InputError(f"MolmoImageProcessor.{name}: expected {n} values, got {value}")
            object.__setattr__(self, name, value)

        as_tuple("overlap_margins", 2, int)
        as_tuple("base_image_input_size", 2, int)
        as_tuple("image_mean", 3, float)
        as_tuple("image_std", 3, float)
        for name in ("max_crops", "image_patch_size", "image_token_length_w",
                     "image_token_length_h", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"MolmoImageProcessor.{name} must be a positive integer, "
                                 f"got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.resize_method not in RESIZE_METHODS:
            raise InputError(f"MolmoImageProcessor.resize_method must be one of {RESIZE_METHODS}, "
                             f"got {self.resize_method!r}")
        if any(s == 0 for s in self.image_std):
            raise InputError("MolmoImageProcessor.image_std must not contain 0")
        # The geometry the official code supports (it asserts the same): square crops made of
        # whole patches, even margins (2x2 pooling), 2x2 pooling giving the token grid.
        size_h, size_w = self.base_image_input_size
        p = self.image_patch_size
        left, right = self.overlap_margins
        if size_h != size_w or size_h % p:
            raise InputError(f"base_image_input_size {self.base_image_input_size} must be square "
                             f"and a multiple of image_patch_size {p}")
        crop_patches = size_h // p
        if crop_patches % 2:
            raise InputError(f"base_image_input_size / image_patch_size = {crop_patches} must be "
                             "even (2x2 pooling)")
        if left % 2 or right % 2 or left < 0 or right < 0 or left + right >= crop_patches:
            raise InputError(f"overlap_margins {self.overlap_margins} must be even, >= 0 and "
                             f"leave a window inside a {crop_patches}-patch crop")
        if (crop_patches + 1) // 2 != self.image_token_length_h or \
                (crop_patches + 1) // 2 != self.image_token_length_w:
            raise InputError(f"image_token_length_w/h must be {(crop_patches + 1) // 2} for "
                             f"{crop_patches} patches per crop side (2x2 pooling)")

    # --- settings (processor.json) ---------------------------------------------------------

    def replace(self, **changes: Any) -> MolmoImageProcessor:
        """A copy with some settings changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; ``from_dict(to_dict())`` round-trips."""
        out: dict[str, Any] = {"image_processor_type": "MolmoImageProcessor"}
        for f in dataclasses.fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, settings: dict[str, Any], **overrides: Any) -> MolmoImageProcessor:
        """From processor.json or a hub ``preprocessor_config.json`` (unknown keys warn)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in settings.items():
            if key in known:
                kwargs[key] = value
            elif key not in _METADATA_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"MolmoImageProcessor: ignoring unknown settings {sorted(unknown)}",
                          stacklevel=2)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def save_to_artifact(self, artifact_dir: str | os.PathLike[str]) -> None:
        """Write ``processor.json`` (these settings only; ``MolmoProcessor.save_to_artifact``
        adds the prompt format and the tokenizer), atomically."""
        from molmo_runtime.fileio import write_json_atomic

        write_json_atomic(Path(artifact_dir) / "processor.json", {
            "processor_class": "MolmoImageProcessor", "schema_version": 1,
            "image_processor": self.to_dict()})

    # --- geometry ----------------------------------------------------------------------------

    @property
    def _crop_size(self) -> int:
        return self.base_image_input_size[0]

    @property
    def _window_patches(self) -> int:
        return self._crop_size // self.image_patch_size - sum(self.overlap_margins)

    def plan(self, height: int, width: int) -> CropPlan:
        """Tiling, sizes and token counts for an image of ``height`` x ``width`` pixels.

        Raises InputError for images too thin to resize (an aspect ratio beyond ~1:336, where
        the official code fails inside torch with a zero-sized resize)."""
        if height < 1 or width < 1:
            raise InputError(f"image of size {height}x{width} has no pixels")
        p = self.image_patch_size
        margin_px = p * sum(self.overlap_margins)
        window_px = self._window_patches * p
        rows, cols = select_tiling(height - margin_px, width - margin_px, window_px,
                                   self.max_crops)
        canvas = (rows * window_px + margin_px, cols * window_px + margin_px)
        resized = fit_size(height, width, *canvas)
        size = self._crop_size
        global_resized = fit_size(height, width, size, size)
        for (rh, rw), what in ((resized, "high-res canvas"), (global_resized, "global crop")):
            if rh < 1 or rw < 1:
                raise InputError(
                    f"image of {height}x{width} pixels (HxW) is too thin: fitted into the "
                    f"{what} its short side would be 0 pixels. Molmo supports aspect ratios up "
                    "to about 1:336; pad or crop the image first")

        def offset(outer: tuple[int, int], inner: tuple[int, int]) -> tuple[int, int]:
            return (outer[0] - inner[0]) // 2, (outer[1] - inner[1]) // 2

        crop_patches = size // p
        left, right = self.overlap_margins
        pooled_h = (rows * self._window_patches + left + right + 1) // 2
        pooled_w = (cols * self._window_patches + left + right + 1) // 2
        return CropPlan(
            height=height, width=width, tiling=(rows, cols), canvas=canvas, resized=resized,
            offset=offset(canvas, resized), global_resized=global_resized,
            global_offset=offset((size, size), global_resized), pooled=(pooled_h, pooled_w),
            global_pooled=((crop_patches + 1) // 2, (crop_patches + 1) // 2))

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens an image of this size produces (without decoding it)."""
        return self.plan(height, width).n_image_tokens

    def max_image_tokens(self) -> int:
        """The most image tokens any image can produce with these settings."""
        left, right = self.overlap_margins
        g = (self._crop_size // self.image_patch_size + 1) // 2
        best = 0
        for i in range(1, self.max_crops + 1):
            for j in range(1, self.max_crops // i + 1):
                r = (i * self._window_patches + left + right + 1) // 2
                c = (j * self._window_patches + left + right + 1) // 2
                best = max(best, r * (c + 1))
        return 2 + g * (g + 1) + 2 + best

    # --- preprocessing -----------------------------------------------------------------------

    def load(self, image: ImageSource) -> np.ndarray:
        """Decode/validate ``image`` to uint8 [H, W, 3] with this processor's pixel limit."""
        return load_image(image, max_pixels=self.max_image_pixels)

    def __call__(self, image: ImageSource) -> dict[str, Any]:
        return self.preprocess(image)

    def preprocess(self, image: ImageSource) -> dict[str, Any]:
        """Preprocess one image.

        Returns a dict with ``images`` [crops, 576, 588] float32, ``image_masks`` [crops, 576]
        float32 (absent if ``image_padding_mask`` is false, like the official code),
        ``image_input_idx`` [crops, 144] int32 (positions inside the image token block, i.e.
        before the BOS shift; -100 = dropped) and ``plan`` (:class:`CropPlan`).
        """
        arr = self.load(image)
        plan = self.plan(arr.shape[0], arr.shape[1])
        src = ResizeSource(arr, self._workspace)  # float32 conversion shared by both resizes
        size = self._crop_size
        p = self.image_patch_size
        n_patch = size // p
        images = np.empty((plan.n_crops, n_patch * n_patch, p * p * 3), dtype=np.float32)

        # Global crop (crop 0).
        glob = self._resize_pad_normalize(src, (size, size), plan.global_resized,
                                          plan.global_offset, "global")
        _patchify(glob, images[0], p)
        rows, cols = plan.tiling
        if (rows, cols) == (1, 1) and plan.canvas == (size, size):
            # A single high-res crop is the same resize of the same image into the same
            # canvas as the global crop (identical computation): reuse it.
            images[1] = images[0]
        else:
            # High-res crops 1..rows*cols, row-major, stride = window.
            canvas = self._resize_pad_normalize(src, plan.canvas, plan.resized, plan.offset,
                                                "canvas")
            window_px = self._window_patches * p
            k = 1
            for i in range(rows):
                for j in range(cols):
                    y0, x0 = i * window_px, j * window_px
                    _patchify(canvas[y0:y0 + size, x0:x0 + size], images[k], p)
                    k += 1

        out: dict[str, Any] = {"images": images}
        if self.image_padding_mask:
            out["image_masks"] = self._image_masks(plan)
        out["image_input_idx"] = self.image_input_idx(plan)
        out["plan"] = plan
        return out

    def _resize_pad_normalize(self, src: ResizeSource, canvas: tuple[int, int],
                              resized: tuple[int, int], offset: tuple[int, int],
                              role: str) -> np.ndarray:
        """The official resize_and_pad + normalisation: float32 [canvas_h, canvas_w, 3]."""
        (ch, cw), (rh, rw), (top, left) = canvas, resized, offset
        out = self._workspace.get(role, (ch, cw, 3))  # scratch: valid until the next call
        mean = std = None
        pad_value = np.zeros(3, dtype=np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pad_value = (np.float32(0.0) - mean) / std  # padding is 0 before normalisation
        # Padding strips around the resized area, then the resized, clipped, normalised image.
        for strip in (out[:top], out[top + rh:], out[top:top + rh, :left],
                      out[top:top + rh, left + rw:]):
            _fill(strip, pad_value)
        resize_into(src, out[top:top + rh, left:left + rw], self.resize_method, mean, std)
        return out

    def _image_masks(self, plan: CropPlan) -> np.ndarray:
        """[crops, n_patches] float32: per high-res crop and patch the fraction of real pixels,
        then the official trailing row of -1 (see the module docstring, quirk 5)."""
        p = self.image_patch_size
        size = self._crop_size
        n_patch = size // p
        window_px = self._window_patches * p
        (top, left), (rh, rw) = plan.offset, plan.resized
        rows, cols = plan.tiling
        table = _mask_fraction_table(p)
        starts = np.arange(n_patch) * p  # [n_patch] patch starts within a crop

        def covered(crop_start: int, lo: int, hi: int) -> np.ndarray:
            a = crop_start + starts
            n: np.ndarray = np.clip(np.minimum(a + p, hi) - np.maximum(a, lo), 0, p)
            return n  # [n_patch] pixel rows (or columns) of each patch inside the image

        masks = np.full((plan.n_crops, n_patch * n_patch), -1.0, dtype=np.float32)
        k = 0
        for i in range(rows):
            ry = covered(i * window_px, top, top + rh)
            for j in range(cols):
                rx = covered(j * window_px, left, left + rw)
                masks[k] = table[(ry[:, None] * rx[None, :]).reshape(-1)]
                k += 1
        return masks

    def image_input_idx(self, plan: CropPlan) -> np.ndarray:
        """[crops, 144] int32: token position (in the image block) fed by each pooled feature,
        or -100. Closed form of the official double permutation (spec §6.8)."""
        gh, gw = plan.global_pooled
        c_tot = plan.pooled[1]
        left, right = self.overlap_margins
        n_pool = (self._crop_size // self.image_patch_size + 1) // 2  # 12
        rows, cols = plan.tiling
        out = np.full((plan.n_crops, gh * gw), IGNORED_INDEX, dtype=np.int32)
        rr, cc = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        out[0] = (1 + rr * (gw + 1) + cc).reshape(-1)
        base = 2 + gh * (gw + 1) + 1  # after the global block and the high-res <im_start>

        def kept(t: int, n: int, margin_lo: int, margin_hi: int) -> tuple[int, int, int]:
            """(first kept pooled index, count, stitched offset) of tile t of n along an axis."""
            start = 0 if t == 0 else margin_lo // 2
            window = self._window_patches
            crop = window + (margin_lo if t == 0 else 0) + (margin_hi if t == n - 1 else 0)
            count = crop // 2  # crops are an even number of patches (validated)
            first_count = (window + margin_lo) // 2  # tile 0 when n > 1
            off = 0 if t == 0 else first_count + (t - 1) * (window // 2)
            return start, count, off

        k = 1
        for i in range(rows):
            y_start, y_count, y_off = kept(i, rows, left, right)
            for j in range(cols):
                x_start, x_count, x_off = kept(j, cols, left, right)
                idx = np.full((n_pool, n_pool), IGNORED_INDEX, dtype=np.int32)
                gr = y_off + np.arange(y_count)[:, None]
                gc = x_off + np.arange(x_count)[None, :]
                idx[y_start:y_start + y_count, x_start:x_start + x_count] = \
                    base + gr * (c_tot + 1) + gc
                out[k] = idx.reshape(-1)
                k += 1
        assert int((out >= 0).sum()) == plan.n_valid_features
        return out

    def image_tokens(self, plan: CropPlan, ids: ImageTokenIds) -> np.ndarray:
        """The image token block [n_image_tokens] int64: global crop then the high-res grid,
        each ``<im_start> rows x (cols x <im_patch>, <im_col>) <im_end>``."""
        def block(r: int, c: int) -> np.ndarray:
            grid = np.full((r, c + 1), ids.im_patch, dtype=np.int64)
            grid[:, c] = ids.im_col
            return np.concatenate([[ids.im_start], grid.reshape(-1), [ids.im_end]])

        tokens = np.concatenate([block(*plan.global_pooled), block(*plan.pooled)])
        assert tokens.shape[0] == plan.n_image_tokens
        return tokens.astype(np.int64)


def _fill(region: np.ndarray, value: np.ndarray) -> None:
    """region[...] = value (per channel), as [rows, cols*C] so numpy's inner loop is long."""
    rows, cols, c = region.shape
    if rows and cols:
        flat = region.view()
        flat.shape = (rows, cols * c)  # rows of a C-contiguous canvas slice stay contiguous
        flat[...] = np.tile(value, cols)


def _patchify(crop: np.ndarray, out: np.ndarray, p: int) -> None:
    """[S, S, 3] -> out [(S/p)^2, p*p*3]: patches row-major, each flattened (dy, dx, channel)."""
    s = crop.shape[0]
    n = s // p
    src = crop.reshape(n, p, n, p * 3).transpose(0, 2, 1, 3)  # [n, n, p, p*3]
    np.copyto(out.reshape(n, n, p, p * 3), src)


def image_token_count(height: int, width: int, max_crops: int = 12) -> int:
    """Image tokens for an image of this size with default settings (no decoding)."""
    return _default_processor(max_crops).num_image_tokens(height, width)


@functools.lru_cache(maxsize=16)
def _default_processor(max_crops: int) -> MolmoImageProcessor:
    return MolmoImageProcessor(max_crops=max_crops)


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CropPlan",
    "ImageTokenIds",
    "MolmoImageProcessor",
    "fit_size",
    "image_token_count",
    "select_tiling",
]
