"""parse_points: Molmo's <point>/<points> answers -> pixel coordinates of the original image."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from molmo_runtime.errors import InputError
from molmo_runtime.points import Point, parse_points


def test_single_point() -> None:
    text = ' <point x="61.5" y="40.4" alt="cat">cat</point>'
    assert parse_points(text, 200, 100) == [Point(123.0, 40.4, "cat")]


def test_several_points_in_index_order_with_their_label() -> None:
    text = (' Counting the <points x1="10.2" y1="33.0" x2="55.7" y2="41.9" alt="cats">cats'
            '</points> shows a total of 2.')
    pts = parse_points(text, 1000, 500)
    assert [(round(p.x, 6), round(p.y, 6), p.label) for p in pts] == [
        (102.0, 165.0, "cats"), (557.0, 209.5, "cats")]


def test_many_points_sorted_by_number_not_text() -> None:
    attrs = " ".join(f'x{i}="{i}" y{i}="{i}"' for i in (10, 2, 1))
    pts = parse_points(f"<points {attrs} alt='dots'>dots</points>", 100, 100)
    assert [p.x for p in pts] == [1.0, 2.0, 10.0]


def test_label_falls_back_to_alt_and_mixed_tags() -> None:
    text = ('<point x="10" y="20" alt="a dog"></point> and '
            '<point x="50.0" y="50.0" alt="x">a cat</point>')
    assert [p.label for p in parse_points(text, 10, 10)] == ["a dog", "a cat"]


def test_coordinates_above_100_are_dropped_like_the_reference() -> None:
    text = '<points x1="101.0" y1="5" x2="20" y2="30" alt="a">a</points>'
    assert parse_points(text, 100, 100) == [Point(20.0, 30.0, "a")]
    assert parse_points('<point x="100" y="100">c</point>', 64, 32) == [Point(64.0, 32.0, "c")]


def test_no_points() -> None:
    assert parse_points("There are none.", 100, 100) == []
    assert parse_points("", 100, 100) == []


@pytest.mark.parametrize("text", [
    '<point x="abc" y="5">a</point>', '<point x="5">a</point>', '<point y="5" x=>a</point>',
    "<point x='nan' y='inf'>a</point>", '<point x="-3" y="5">a</point>', "<points",
    "<point x=\"1\" y=\"2\"", "</point></points><<<>>>", "<point" * 5000, "\x00\ufffd<point>",
])
def test_malformed_text_never_raises(text: str) -> None:
    assert isinstance(parse_points(text, 640, 480), list)


def test_single_quotes_attribute_order_and_case() -> None:
    pts = parse_points("<POINT alt='cup' y='25' x='75'>cup</POINT>", 400, 200)
    assert pts == [Point(300.0, 50.0, "cup")]


def test_bare_pairs_without_tags_fall_back_to_the_reference_pattern() -> None:
    assert parse_points('x="50" y="25"', 10, 20) == [Point(5.0, 5.0, "")]


def test_bad_image_size_is_a_caller_error() -> None:
    with pytest.raises(InputError):
        parse_points('<point x="1" y="1">a</point>', 0, 10)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>/="\' xy123.0pointsalt\n')), max_size=300))
def test_property_random_tag_soup_never_raises(text: str) -> None:
    for p in parse_points(text, 321, 123):
        assert 0 <= p.x <= 321 and 0 <= p.y <= 123
