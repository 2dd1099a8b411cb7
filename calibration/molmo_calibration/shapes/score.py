"""Scoring a model's answer to a shapes question: (well formed, correct).

    point      well formed: exactly one point parses. Correct: it falls on the named shape's
               visible pixels.
    point_all  well formed: the points parse ("There are none." for no points). Correct: as many
               points as shapes of that kind and every shape matched once (each point on a
               different one of them).
    count      well formed: an integer. Correct: exact match.
    color      well formed: a colour name of the task. Correct: exact match.
    describe   well formed: "a <colour> <kind>" items joined by ", " / " and ", ending in ".".
               Correct: the same shapes (in any order).

Points are read with the runtime's parser (molmo_runtime.points), in pixels of the image.
"""

from __future__ import annotations

import re

import numpy as np

from molmo_calibration.shapes.task import COLORS, KINDS, NONE_ANSWER, Question, Scene
from molmo_runtime.points import parse_points

_ITEM = re.compile(rf"^a ({'|'.join(COLORS)}) ({'|'.join(KINDS)})$")


def _shape_at(labels: np.ndarray, x: float, y: float) -> int:
    h, w = labels.shape
    col, row = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
    return int(labels[row, col])


def _description_items(text: str) -> list[str] | None:
    if not text.endswith("."):
        return None
    parts = re.split(r", | and ", text[:-1])
    return parts if all(_ITEM.match(p) for p in parts) else None


def score(question: Question, scene: Scene, labels: np.ndarray, answer: str) -> tuple[bool, bool]:
    """-> (well_formed, correct) of `answer` (the decoded text the model generated)."""
    text = answer.strip()
    if question.kind in ("point", "point_all"):
        points = parse_points(text, scene.width, scene.height)
        if question.kind == "point":
            if len(points) != 1:
                return False, False
            return True, _shape_at(labels, points[0].x, points[0].y) == question.targets[0]
        if not points:
            return text == NONE_ANSWER, text == NONE_ANSWER and not question.targets
        hit = [_shape_at(labels, p.x, p.y) for p in points]
        return True, sorted(hit) == sorted(question.targets)
    if question.kind == "count":
        if not re.fullmatch(r"\d+", text):
            return False, False
        return True, text == question.value
    if question.kind == "color":
        return text in COLORS, text == question.value
    if question.kind == "describe":
        items = _description_items(text)
        if items is None:
            return False, False
        want = sorted(f"a {scene.shapes[j].name}" for j in question.targets)
        return True, sorted(items) == want
    raise ValueError(f"unknown question kind {question.kind!r}")
