"""Load an image (path, bytes, file object, PIL image or numpy array) as uint8 [H, W, 3] RGB.

What the official Molmo processor does, and this module reproduces:

* PIL input: ``np.array(image.convert("RGB"))``. RGBA/LA/PA lose their alpha (no compositing),
  palette and greyscale images are expanded, CMYK/YCbCr/LAB/HSV go through PIL's conversion.
  16-bit (``I;16*``), 32-bit (``I``) and float (``F``) images are **clipped** to 0..255 by that
  conversion, not rescaled; a warning says so when it clips anything (scale them yourself and
  pass a uint8 array if you want the full range used).
* EXIF orientation is **not** applied: the hub processor calls ``ImageOps.exif_transpose`` but
  discards its result, so the model sees (and points on) the pixel array as stored.
* numpy input: ``image.astype(np.uint8)``. Here only arrays whose values already are integers in
  0..255 are accepted (for those the cast is exact and identical to the official one); a float
  image in [0, 1] would silently become black, so it is refused with the fix. [H, W] and
  [H, W, 1] arrays are treated as greyscale, [H, W, 4] as RGBA (alpha dropped, like PIL).

Bad input raises :class:`molmo_runtime.errors.InputError` naming the image and what to do:
missing/empty/unreadable files, truncated files, non-images, and images above ``max_pixels``
(default :data:`DEFAULT_MAX_IMAGE_PIXELS`). The pixel count is checked from the file header,
before anything is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union, cast

import numpy as np

from molmo_runtime.errors import InputError

if TYPE_CHECKING:
    from PIL import Image as PILImage

# 64 megapixels: a 9248x6936 phone photo fits; a decoded 64 MP image is 192 MB of uint8 and the
# resize touches a few times that in float32, which is still fine on an 8 GB Jetson.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes],
                    "PILImage.Image", np.ndarray]

# Modes whose conversion to RGB clips values above 255 (PIL does not rescale them).
_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def _pil() -> Any:
    from PIL import (
        Image,  # a base dependency; imported on first use to keep imports cheap
    )

    return Image


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               name: str | None = None) -> np.ndarray:
    """Return ``source`` as a C-contiguous uint8 [H, W, 3] RGB array (see the module docstring).

    ``name`` is used in error messages (defaults to the path, or the kind of object given).
    """
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, max_pixels=max_pixels, name=name or "numpy image")
    Image = _pil()
    if isinstance(source, Image.Image):
        return pil_to_rgb(source, max_pixels=max_pixels, name=name or "PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or f"image bytes ({len(data)} bytes)"
        if not data:
            raise InputError(f"{label}: empty input (0 bytes); pass the bytes of a PNG/JPEG/... file")
        return _decode(io.BytesIO(data), label, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise InputError(f"{label}: no such image file; check the path")
        if not path.is_file():
            raise InputError(f"{label}: not a regular file; pass the path of an image file")
        if path.stat().st_size == 0:
            raise InputError(f"{label}: the file is empty (0 bytes); re-download or re-export it")
        with open(path, "rb") as f:
            return _decode(f, label, max_pixels)
    if hasattr(source, "read"):
        return _decode(cast(IO[bytes], source), name or "image file object", max_pixels)
    raise InputError(
        f"unsupported image type {type(source).__name__}; pass a file path, bytes, a file object, "
        "a PIL.Image or a uint8 numpy array [H, W, 3]")


def _check_pixels(width: int, height: int, label: str, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InputError(f"{label}: image has no pixels ({width}x{height}); pass a non-empty image")
    if width * height > max_pixels:
        raise InputError(
            f"{label}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (decompression-bomb guard); downscale the image first, or "
            "raise max_pixels (MolmoImageProcessor(max_image_pixels=...)) if you trust it")


def _decode(fp: IO[bytes], label: str, max_pixels: int) -> np.ndarray:
    Image = _pil()
    with warnings.catch_warnings():
        # PIL's own bomb warning fires at its global limit; we check our own limit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise InputError(f"{label}: refused by Pillow's decompression-bomb guard ({e}); "
                             "downscale the image first") from e
        except Image.UnidentifiedImageError as e:
            raise InputError(f"{label}: not an image file Pillow can read (or an unsupported "
                             "format); convert it to PNG or JPEG") from e
        except Exception as e:
            raise InputError(f"{label}: cannot read the image header ({type(e).__name__}: {e}); "
                             "the file is corrupt, re-export it as PNG or JPEG") from e
        with img:
            _check_pixels(img.width, img.height, label, max_pixels)
            return _convert(img, label)


def pil_to_rgb(img: PILImage.Image, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               name: str = "PIL image") -> np.ndarray:
    """``np.array(img.convert("RGB"))`` with the size guard and clear errors."""
    _check_pixels(img.width, img.height, name, max_pixels)
    return _convert(img, name)


def _convert(img: PILImage.Image, label: str) -> np.ndarray:
    try:
        if img.mode in _HIGH_BIT_MODES:
            extrema = img.getextrema()  # (min, max) for these single-band modes; decodes
            lo, hi = (float(v) for v in cast("tuple[float, float]", extrema))
            if hi > 255 or lo < 0:
                warnings.warn(
                    f"{label}: {img.mode} image with values in [{lo}, {hi}] is clipped to 0..255 "
                    "by the RGB conversion (as the official Molmo processor does); rescale it to "
                    "uint8 yourself to use its full range", stacklevel=3)
        rgb = img.convert("RGB")  # decodes (truncated data fails here)
        arr = np.asarray(rgb, dtype=np.uint8)
    except InputError:
        raise
    except MemoryError as e:
        raise InputError(f"{label}: out of memory decoding {img.width}x{img.height}; "
                         "downscale the image first") from e
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        hint = ("the file is truncated or corrupt; re-download or re-export it"
                if isinstance(e, (OSError, SyntaxError, EOFError)) else
                f"mode {img.mode!r} cannot be converted to RGB; convert it to RGB first")
        raise InputError(f"{label}: cannot decode the image ({reason}); {hint}") from e
    if arr.shape != (img.height, img.width, 3):
        raise InputError(f"{label}: decoded to an unexpected shape {arr.shape}; "
                         "convert it to an RGB PNG or JPEG")
    return np.ascontiguousarray(arr)


def array_to_rgb(image: np.ndarray, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 name: str = "numpy image") -> np.ndarray:
    """Validate a numpy image and return it as uint8 [H, W, 3] (see the module docstring)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(
            f"{name}: expected an image array of shape [H, W, 3] (or [H, W], [H, W, 1], "
            f"[H, W, 4]), got shape {arr.shape}; channels-first [3, H, W] arrays need "
            "arr.transpose(1, 2, 0)")
    height, width = int(arr.shape[0]), int(arr.shape[1])
    _check_pixels(width, height, name, max_pixels)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{name}: unsupported dtype {arr.dtype}; pass uint8 pixel values")
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InputError(f"{name}: the image contains NaN or infinity")
            if not np.array_equal(arr, np.floor(arr)):
                raise InputError(
                    f"{name}: {arr.dtype} image with fractional values; the Molmo processor "
                    "expects 0..255 pixel values: pass (img * 255).round().astype(np.uint8) for "
                    "an image in [0, 1]")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 255:
            raise InputError(f"{name}: pixel values span [{lo}, {hi}], outside 0..255; rescale "
                             "the image to uint8 first")
        arr = arr.astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)  # greyscale -> RGB, as PIL's L -> RGB
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]  # RGBA -> RGB drops alpha, as PIL does
    return np.ascontiguousarray(arr)
