"""The shapes task (torch-free): scenes, questions, answers in Molmo's formats, scoring, the
held-out set and the task gate's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from molmo_calibration.shapes.evaluate import TaskScores
from molmo_calibration.shapes.gate import TaskComparison
from molmo_calibration.shapes.score import score
from molmo_calibration.shapes.task import (
    HELDOUT_SEED,
    NONE_ANSWER,
    QUESTION_KINDS,
    Question,
    Scene,
    Shape,
    ask,
    heldout_set,
    make_scene,
    percent,
    render,
)
from molmo_runtime.points import parse_points


def test_scenes_are_seeded_and_varied() -> None:
    a = [make_scene(np.random.default_rng(s)) for s in range(40)]
    b = [make_scene(np.random.default_rng(s)) for s in range(40)]
    assert a == b
    assert np.array_equal(render(a[0])[0], render(b[0])[0])
    assert len({(s.width, s.height) for s in a}) > 30  # sizes and aspect ratios vary
    assert {len(s.shapes) for s in a} == {1, 2, 3, 4}
    assert {s.style for s in a} == {"noise", "stripes", "gradient"}


def test_reference_answers_score_correct_and_centres_are_visible() -> None:
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(60):
        scene = make_scene(rng)
        _, labels = render(scene)  # raises if a centre is covered
        for kind in QUESTION_KINDS:
            q = ask(scene, kind, rng)
            if q is None:
                continue
            seen.add(kind)
            assert score(q, scene, labels, " " + q.answer) == (True, True), q
    assert seen == set(QUESTION_KINDS)


def _two_circles() -> tuple[Scene, np.ndarray]:
    scene = Scene(100, 80, (Shape("circle", "red", 20.0, 20.0, 10.0),
                            Shape("circle", "blue", 70.0, 50.0, 12.0),
                            Shape("square", "green", 70.0, 15.0, 8.0)), 5, "noise")
    return scene, render(scene)[1]


def test_pointing_answers_use_molmos_formats_and_the_runtime_parser_reads_them() -> None:
    scene, labels = _two_circles()
    rng = np.random.default_rng(0)
    q = ask(scene, "point_all", rng)
    while q is None or q.prompt != "Point to all circles.":
        q = ask(scene, "point_all", rng)
    assert q.answer == ('<points x1="20" y1="25" x2="70" y2="62" alt="circles">circles'
                        '</points>')
    pts = parse_points(q.answer, scene.width, scene.height)
    assert [(p.x, p.y, p.label) for p in pts] == [(20.0, 20.0, "circles"), (70.0, 49.6, "circles")]
    single = parse_points('<point x="70" y="19" alt="green square">green square</point>', 100, 80)
    assert [(p.x, p.y) for p in single] == [(70.0, 15.2)]
    assert percent(70.0, 100) == 70


def test_wrong_answers_score_wrong() -> None:
    scene, labels = _two_circles()
    point = Question("point", "Point to the red circle.", "", (0,))
    assert score(point, scene, labels, '<point x="20" y="25" alt="red circle">red circle</point>') \
        == (True, True)
    assert score(point, scene, labels, '<point x="70" y="62" alt="red circle">r</point>') \
        == (True, False)  # on the blue circle
    assert score(point, scene, labels, "the red circle") == (False, False)
    both = Question("point_all", "Point to all circles.", "", (0, 1))
    twice = '<points x1="20" y1="25" x2="21" y2="25" alt="circles">circles</points>'
    assert score(both, scene, labels, twice) == (True, False)  # one shape matched twice
    assert score(both, scene, labels, NONE_ANSWER) == (True, False)
    none = Question("point_all", "Point to all triangles.", "", ())
    assert score(none, scene, labels, NONE_ANSWER) == (True, True)
    count = Question("count", "How many circles are there?", "2", (0, 1), "2")
    assert score(count, scene, labels, " 3") == (True, False)
    assert score(count, scene, labels, "two") == (False, False)
    color = Question("color", "What color is the square?", "green", (2,), "green")
    assert score(color, scene, labels, "purple") == (False, False)
    describe = Question("describe", "Describe this image.", "", (0, 2, 1))
    assert score(describe, scene, labels,
                 "a blue circle, a red circle and a green square.") == (True, True)
    assert score(describe, scene, labels, "a red circle and a green square.") == (True, False)


def test_heldout_set_is_large_fixed_and_mixed() -> None:
    items = heldout_set(600)
    assert len(items) == 600 and items == heldout_set(600, seed=HELDOUT_SEED)
    kinds = [q.kind for _, q in items]
    for kind in ("point", "point_all", "count", "color"):
        assert kinds.count(kind) >= 50, kind
    assert heldout_set(5, seed=1) != items[:5]


def test_task_scores_and_gate() -> None:
    s = TaskScores(HELDOUT_SEED)
    for kind, ok in [("point", True), ("point", False), ("point_all", True), ("count", True),
                     ("color", True), ("color", True), ("describe", False)]:
        s.add(kind, True, ok)
    assert s.accuracy("pointing") == pytest.approx(2 / 3)
    assert s.accuracy("colour") == 1.0 and s.questions == 7
    assert TaskScores.from_dict(s.to_dict()).to_dict() == s.to_dict()
    worse = TaskScores(HELDOUT_SEED)
    for kind, ok in [("point", False), ("point", False), ("point_all", True), ("count", True),
                     ("color", True), ("color", True), ("describe", False)]:
        worse.add(kind, True, ok)
    gate = TaskComparison(s.to_dict(), worse.to_dict(), max_drop=0.01)
    assert gate.drops()["pointing"] == pytest.approx(1 / 3, abs=1e-4)
    assert len(gate.failures()) == 1 and "pointing" in gate.failures()[0]
    assert not TaskComparison(s.to_dict(), s.to_dict(), max_drop=0.0).failures()
