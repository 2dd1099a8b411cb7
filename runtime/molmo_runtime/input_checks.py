"""Checks of what callers hand to MolmoPipeline, before any work: each bad value raises an
InputError that names the value and the fix. Torch-free.

Python's own errors would come too late or say too little: a bytes prompt would be tokenized as
its repr, NaN temperature samples garbage, an id past the embedding table is an IndexError deep in
numpy, a duplicate image position adds one crop's feature twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from molmo_runtime.errors import InputError


def check_int(name: str, value: Any, minimum: int) -> int:
    """An int (numpy ints too; not bool, not float) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float = math.inf, *,
                low_open: bool = False) -> float:
    """A finite real number (not bool) in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    x = float(value)
    below = x <= low if low_open else x < low
    if not math.isfinite(x) or below or x > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
            f"{'>' if low_open else '>='} {low:g}"
        raise InputError(f"{name} must be a finite number {'in ' if math.isfinite(high) else ''}"
                         f"{span}, got {value!r}")
    return x


def check_prompt(prompt: Any) -> str:
    """A str that is valid Unicode (encodable as UTF-8: no lone surrogates)."""
    if isinstance(prompt, (bytes, bytearray)):
        raise InputError("prompt must be str, got bytes: decode it first, e.g. "
                         "prompt.decode('utf-8')")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"prompt is not valid text: {prompt[e.start:e.end]!r} at index {e.start} is a lone "
            "surrogate (often from bytes that are not UTF-8, e.g. on a command line in another "
            "encoding); pass UTF-8 text") from None
    return prompt


def check_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings: a list/tuple of str (one str alone is one stop string); empty ones ignored."""
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a list of str, got {stop!r}")
    for s in stop:
        check_prompt(s)
    return tuple(s for s in stop if s)


def check_input_ids(input_ids: Any, vocab_rows: int) -> np.ndarray:
    """[B, L] integer ids in [0, vocab_rows), right-padded with -1 -> int64 array."""
    ids = np.asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, length] with length >= 1, got shape "
                         f"{ids.shape}")
    bad = (ids < -1) | (ids >= vocab_rows)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"input_ids holds {int(bad.sum())} id(s) outside this model's "
                         f"vocabulary [0, {vocab_rows}) (first: {int(ids[where])} at {where}); "
                         "-1 is the only padding value: tokenize with this artifact's tokenizer")
    return ids.astype(np.int64)


def check_image_arrays(images: Any, image_masks: Any, image_input_idx: Any, batch: int,
                       lengths: np.ndarray, patches: tuple[int, int], max_crops: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The processor's image arrays with a batch axis, checked against the prompts they go with.

    images [B, C, P, D] finite floats; image_masks [B, C, P]; image_input_idx [B, C, T]
    integer positions inside each row's prompt (negative = dropped feature), no position twice.
    """
    if image_masks is None or image_input_idx is None:
        raise InputError("images need image_masks and image_input_idx too (the processor "
                         "returns all three)")
    imgs = np.asarray(images)
    if imgs.dtype.kind != "f":
        raise InputError(f"images must be float pixel patches, got dtype {imgs.dtype}")
    if imgs.ndim != 4 or imgs.shape[0] != batch or tuple(imgs.shape[2:]) != patches:
        raise InputError(f"images must be [batch={batch}, crops, {patches[0]}, {patches[1]}], "
                         f"got shape {imgs.shape}")
    crops = imgs.shape[1]
    if not 1 <= crops <= max_crops + 1:
        raise InputError(f"images hold {crops} crops; this artifact takes 1..{max_crops + 1}")
    if not np.isfinite(imgs).all():
        raise InputError("images contain NaN or infinity; pass the processor's output for a "
                         "real image")
    masks = np.asarray(image_masks)
    if masks.shape != imgs.shape[:3] or masks.dtype.kind not in "fiub":
        raise InputError(f"image_masks must be numbers of shape {imgs.shape[:3]}, got "
                         f"{masks.dtype} {masks.shape}")
    if not np.isfinite(masks).all():
        raise InputError("image_masks contain NaN or infinity")
    idx = np.asarray(image_input_idx)
    if idx.dtype.kind not in "iu" or idx.ndim != 3 or idx.shape[:2] != (batch, crops):
        raise InputError(f"image_input_idx must be integers of shape [{batch}, {crops}, tokens], "
                         f"got {idx.dtype} {idx.shape}")
    flat = idx.reshape(batch, -1)
    for b in range(batch):
        valid = flat[b][flat[b] >= 0]
        if valid.size and valid.max() >= lengths[b]:
            raise InputError(f"image_input_idx row {b} points at position {int(valid.max())}, "
                             f"past that prompt's {int(lengths[b])} tokens")
        values, counts = np.unique(valid, return_counts=True)
        if (counts > 1).any():
            raise InputError(f"image_input_idx row {b} names position "
                             f"{int(values[counts > 1][0])} more than once; each image token "
                             "position takes one feature (use the processor's output)")
    return imgs.astype(np.float32, copy=False), masks.astype(np.float32, copy=False), idx
