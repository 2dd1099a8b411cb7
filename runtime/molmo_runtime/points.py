"""Parse Molmo's pointing answers into pixel coordinates.

Molmo answers pointing and counting prompts with XML-like tags whose coordinates are percentages
(0-100, one decimal) of the original image's width (x) and height (y):

    <point x="61.5" y="40.4" alt="cat">cat</point>
    <points x1="10.2" y1="33.0" x2="55.7" y2="41.9" alt="cats">cats</points>

"Original image" means the pixel array given to the processor (EXIF orientation is not applied,
see image_io), so ``x_px = x / 100 * width``, ``y_px = y / 100 * height``.

Like the reference parser (allenai/molmo ``olmo/util.py`` ``extract_points``) a point with a
coordinate above 100 is dropped as invalid. The parser never raises on model output: malformed
tags, unknown attributes, missing closing tags or garbage yield the points that can be read
and nothing else. Text without any tag falls back to bare ``x="…" y="…"`` pairs (no label).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from molmo_runtime.errors import InputError

# Attributes cannot contain < or >, the label cannot contain <: every scan is linear.
_TAG = re.compile(r"<(points?)\b([^<>]*)>(?:([^<]*)</\1\s*>)?", re.IGNORECASE)
_ATTR = re.compile(r"""([A-Za-z_][\w-]*)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_COORD_KEY = re.compile(r"([xy])(\d*)$", re.IGNORECASE)
# The reference's pair pattern, used only when the text has no <point(s)> tag at all.
_BARE_PAIR = re.compile(r'x\d*="\s*([0-9]+(?:\.[0-9]+)?)"\s+y\d*="\s*([0-9]+(?:\.[0-9]+)?)"')
_MAX_PERCENT = 100.0


@dataclass(frozen=True)
class Point:
    """A point in pixels of the original image; ``label`` is the tag's text (or its alt)."""

    x: float
    y: float
    label: str = ""


def _percent(value: str) -> float | None:
    try:
        v = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(v) or v < 0 or v > _MAX_PERCENT:
        return None  # the reference drops coordinates above 100 as invalid output
    return v


def parse_points(text: str, image_width: float, image_height: float) -> list[Point]:
    """All points in ``text``, in order of appearance, in pixel coordinates of an image of
    ``image_width`` x ``image_height`` pixels."""
    if not (image_width > 0 and image_height > 0) or not (
            math.isfinite(image_width) and math.isfinite(image_height)):
        raise InputError(f"image size must be positive, got {image_width}x{image_height}")
    if not isinstance(text, str):
        return []
    points: list[Point] = []

    def add(xs: str, ys: str, label: str) -> None:
        x, y = _percent(xs), _percent(ys)
        if x is not None and y is not None:
            points.append(Point(x / 100.0 * image_width, y / 100.0 * image_height, label))

    found_tag = False
    for m in _TAG.finditer(text):
        found_tag = True
        attrs: dict[str, str] = {}
        for a in _ATTR.finditer(m.group(2)):
            attrs.setdefault(a.group(1).lower(), a.group(2) if a.group(2) is not None
                             else a.group(3))
        inner = (m.group(3) or "").strip()
        label = inner or attrs.get("alt", "").strip()
        coords: dict[str, dict[str, str]] = {}  # index -> {"x": .., "y": ..}
        for key, value in attrs.items():
            k = _COORD_KEY.match(key)
            if k:
                coords.setdefault(k.group(2), {})[k.group(1).lower()] = value
        for index in sorted(coords, key=lambda s: int(s) if s else 0):
            pair = coords[index]
            if "x" in pair and "y" in pair:
                add(pair["x"], pair["y"], label)
    if not found_tag:
        for m in _BARE_PAIR.finditer(text):
            add(m.group(1), m.group(2), "")
    return points


__all__ = ["Point", "parse_points"]
