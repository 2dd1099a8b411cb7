"""Calibration sets as data: the bundled default set, user folders, hashes and splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from molmo_calibration.calibration_set import (
    BUNDLED_SETS_DIR,
    IMAGE_SUFFIXES,
    load_calibration_set,
    write_set_manifest,
)
from molmo_runtime.errors import InputError
from tests.conftest import REPO

DEFAULT = BUNDLED_SETS_DIR / "default"


def test_default_set_loads_with_both_splits_and_a_stable_hash() -> None:
    cs = load_calibration_set("default")
    recorded = json.loads((DEFAULT / "manifest.json").read_text())
    assert cs.name == "default" and cs.sha256 == recorded["sha256"]
    assert len(cs.samples) >= 20
    held, cal = cs.split("heldout"), cs.split("calibration")
    assert held and cal
    # held-out images are whole images the calibration never saw
    assert not {s.image for s in held} & {s.image for s in cal}
    assert load_calibration_set(DEFAULT).sha256 == cs.sha256


def test_default_set_prompts_cover_describe_point_count_and_read() -> None:
    prompts = " ".join(s.prompt.lower() for s in load_calibration_set().samples)
    for word in ("describe", "point", "how many", "count", "read"):
        assert word in prompts, word


def test_every_default_image_is_small_rgb_and_has_a_license_line() -> None:
    license_text = (DEFAULT / "LICENSE.md").read_text()
    images = [p for p in DEFAULT.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    assert len(images) >= 8
    for p in images:
        assert p.stat().st_size <= 150_000, p.name  # package data stays small
        assert f"`{p.name}`" in license_text, f"{p.name} has no license/attribution line"
        with Image.open(p) as im:
            assert im.mode == "RGB" and max(im.size) <= 640


def test_demo_asset_is_small_with_attribution() -> None:
    assets = REPO / "runtime" / "molmo_runtime" / "assets"
    demo = assets / "demo.jpg"
    assert demo.stat().st_size <= 60_000
    assert "demo.jpg" in (assets / "LICENSE.md").read_text()
    with Image.open(demo) as im:
        assert im.format == "JPEG" and im.mode == "RGB"


def _user_set(tmp_path: Path, lines: list[dict[str, str]]) -> Path:
    folder = tmp_path / "myset"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(DEFAULT / name, folder / name)
    (folder / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_user_folder_without_manifest_is_hashed_on_load(tmp_path: Path) -> None:
    folder = _user_set(tmp_path, [{"image": n, "prompt": "Describe this image."}
                                  for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")])
    cs = load_calibration_set(folder)
    assert cs.name == "myset" and len(cs.sha256) == 64
    assert [s.split for s in cs.samples].count("heldout") == 1  # every third image (sorted)
    # the hash follows the content: another prompt gives another hash
    (folder / "prompts.jsonl").write_text(
        (folder / "prompts.jsonl").read_text().replace("Describe", "Explain"))
    assert load_calibration_set(folder).sha256 != cs.sha256


def test_explicit_split_field_wins(tmp_path: Path) -> None:
    folder = _user_set(tmp_path, [
        {"image": "chelsea.jpg", "prompt": "a", "split": "heldout"},
        {"image": "chelsea.jpg", "prompt": "b"},
        {"image": "coffee.jpg", "prompt": "c", "split": "calibration"}])
    assert [s.split for s in load_calibration_set(folder).samples] == \
        ["heldout", "calibration", "calibration"]


def test_modified_file_is_caught_against_its_manifest(tmp_path: Path) -> None:
    folder = _user_set(tmp_path, [{"image": n, "prompt": "Point to it."}
                                  for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")])
    write_set_manifest(folder, name="mine")
    assert load_calibration_set(folder).name == "mine"
    with open(folder / "coffee.jpg", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match=r"coffee\.jpg.*write_set_manifest"):
        load_calibration_set(folder)


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('{"image": "chelsea.jpg"}', "expected"),
    ('{"image": "missing.jpg", "prompt": "x"}', "is not a file"),
    ('{"image": "../chelsea.jpg", "prompt": "x"}', "is not a file"),
    ('{"image": "chelsea.jpg", "prompt": "x", "split": "test"}', "split must be"),
])
def test_bad_prompts_file_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    folder = _user_set(tmp_path, [])
    (folder / "prompts.jsonl").write_text('{"image": "coffee.jpg", "prompt": "ok"}\n' + line)
    with pytest.raises(InputError, match=rf"prompts\.jsonl:2: .*{message}"):
        load_calibration_set(folder)


def test_unknown_set_and_single_split_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="bundled set name"):
        load_calibration_set("no-such-set")
    folder = _user_set(tmp_path, [{"image": "chelsea.jpg", "prompt": "x"}])
    with pytest.raises(InputError, match="both splits"):
        load_calibration_set(folder)
