"""Draw a model's points on its image (`molmo-run --draw out.png`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from molmo_runtime.errors import InputError
from molmo_runtime.fileio import atomic_open
from molmo_runtime.image_io import ImageSource, load_image
from molmo_runtime.points import Point

_IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def draw_points(image: ImageSource, points: Sequence[Point], out: str | os.PathLike[str],
                min_side: int = 320) -> Path:
    """Write `image` with a marker at every point (pixel coordinates of the image) to `out`.

    Small images are enlarged (nearest neighbour) to at least `min_side` pixels on the short
    side so the markers stay readable. Refuses to overwrite an existing file; written
    atomically."""
    from PIL import Image, ImageDraw

    path = Path(out)
    fmt = _IMAGE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"--draw {path}: use a .png, .jpg or .webp file name")
    if path.exists():
        raise InputError(f"--draw {path}: the file exists; choose another name or remove it "
                         "(nothing was written)")
    pixels = load_image(image)
    h, w = pixels.shape[:2]
    scale = max(1, -(-min_side // min(h, w)))
    canvas: Any = Image.fromarray(pixels).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    r = max(4, min(w, h) * scale // 40)
    for pt in points:
        x, y = pt.x * scale, pt.y * scale
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), width=max(2, r // 2))
        draw.ellipse([x - r // 2, y - r // 2, x + r // 2, y + r // 2], fill=(255, 0, 255))
        if pt.label:
            draw.text((x + r + 2, y - r), pt.label, fill=(255, 255, 255),
                      stroke_width=2, stroke_fill=(0, 0, 0))
    with atomic_open(path, "wb") as f:
        canvas.save(f, format=fmt)
    return path


__all__ = ["draw_points"]
