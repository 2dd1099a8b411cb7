"""molmo-run --draw: the answer's points drawn on the image (torch-free)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from molmo_runtime.draw import draw_points
from molmo_runtime.errors import InputError
from molmo_runtime.points import Point


def test_points_are_drawn_where_they_are(tmp_path: Path) -> None:
    image = np.full((50, 80, 3), 128, np.uint8)
    out = draw_points(image, [Point(20.0, 10.0, "a"), Point(70.0, 40.0)], tmp_path / "p.png")
    drawn = np.asarray(Image.open(out).convert("RGB"))
    scale = 320 // 50 + 1  # enlarged to a short side of at least 320 px
    assert drawn.shape == (50 * scale, 80 * scale, 3)
    for x, y in ((20, 10), (70, 40)):
        assert tuple(drawn[y * scale, x * scale]) == (255, 0, 255)  # the marker's centre
    assert tuple(drawn[25 * scale, 45 * scale]) == (128, 128, 128)  # elsewhere untouched


def test_refuses_to_overwrite_and_unknown_suffix(tmp_path: Path) -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"user data")
    with pytest.raises(InputError, match="exists"):
        draw_points(image, [], mine)
    assert mine.read_bytes() == b"user data"
    with pytest.raises(InputError, match=".png"):
        draw_points(image, [], tmp_path / "out.gif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]
