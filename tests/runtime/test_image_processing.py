"""MolmoImageProcessor against the official processor's outputs (../shared/golden/preprocess) and
the spec's closed forms (../shared/docs/molmo_architecture.md §6).

Tolerances (why): the golden README §4.5 shows the numpy recipe reproduces the official
``images`` bit for bit, and re-runs of the official code are bitwise identical, so every crop is
compared by sha256 (exact) and the arrays with max abs diff 0. ``image_masks`` (k/196 values),
``image_input_idx`` and tilings are exact by nature.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from molmo_runtime.errors import InputError
from molmo_runtime.image_io import load_image
from molmo_runtime.tolerances import TABLE
from molmo_runtime.image_processing import (
    CropPlan,
    ImageTokenIds,
    MolmoImageProcessor,
    fit_size,
    image_token_count,
    select_tiling,
)

from tests.conftest import golden_path

IMAGES_ATOL = TABLE["preprocess/golden_images"].atol  # exact on every CPU; anything else is a bug
BACKENDS = {"torch-bilinear": "", "tensorflow": "tensorflow"}


def _cases(backend: str) -> list[dict[str, Any]]:
    try:
        index = golden_path("preprocess", BACKENDS[backend], "cases.json")
    except pytest.skip.Exception:
        return []
    cases = json.loads(index.read_text())["cases"]
    # Extra-prompt cases reuse the base case's images (bitwise, per cases.json).
    return [c for c in cases if not str(c.get("images_storage", "")).startswith("same")]


def _crop_sha(crop: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(crop, dtype="<f4").tobytes()).hexdigest()


def _compare_case(case: dict[str, Any], backend: str) -> dict[str, Any]:
    folder = golden_path("preprocess", BACKENDS[backend])
    ref = np.load(folder / case["npz"])
    pixels = load_image(golden_path("preprocess", case["image_file"]))
    assert list(pixels.shape[:2]) == case["image_hw"]
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == case["decoded_rgb_sha256"], \
        "the image decoder differs from the golden one (check Pillow/libjpeg) - not a resize bug"
    proc = MolmoImageProcessor(resize_method=backend)
    out = proc(pixels)
    plan: CropPlan = out["plan"]
    assert list(plan.tiling) == case["tiling_rows_cols"]
    assert out["images"].shape == (case["n_crops"], 576, 588)
    assert out["images"].dtype == np.float32
    np.testing.assert_array_equal(out["image_masks"], ref["image_masks"])
    assert out["image_masks"].dtype == np.float32
    idx = out["image_input_idx"]  # the processor adds the BOS shift; here it is applied by hand
    np.testing.assert_array_equal(np.where(idx < 0, idx, idx + 1), ref["image_input_idx"])
    assert idx.dtype == np.int32
    if "images" in ref.files:
        want, got = ref["images"], out["images"]
    else:
        sel = ref["images_partial_crop_index"]
        want, got = ref["images_partial"], out["images"][sel]
    shas = [_crop_sha(c) for c in out["images"]]
    return {"max_abs": float(np.abs(want - got).max()),
            "exact": sum(a == b for a, b in zip(shas, ref["images_crop_sha256"])),
            "crops": len(shas)}


@pytest.mark.parametrize("case", _cases("torch-bilinear"), ids=lambda c: c["name"])
def test_golden_torch_backend(case: dict[str, Any]) -> None:
    r = _compare_case(case, "torch-bilinear")
    assert r["max_abs"] <= IMAGES_ATOL
    assert r["exact"] == r["crops"], f"{r['crops'] - r['exact']} crops differ by sha256"


@pytest.mark.parametrize("case", _cases("tensorflow"), ids=lambda c: c["name"])
def test_golden_tensorflow_backend(case: dict[str, Any]) -> None:
    r = _compare_case(case, "tensorflow")
    assert r["max_abs"] <= IMAGES_ATOL
    assert r["exact"] == r["crops"]


def test_golden_index_covers_every_case() -> None:
    index = json.loads(golden_path("preprocess", "cases.json").read_text())
    names = {c["name"] for c in _cases("torch-bilinear")}
    base = {c["name"] for c in index["cases"] if not str(c.get("images_storage", "")).startswith(
        "same")}
    assert names == base and len(base) == 10


# --- geometry (spec §6.3, §6.4, §6.8) ------------------------------------------------------------

@pytest.mark.parametrize("hw, tiling, canvas, resized, offset, global_resized, tokens", [
    ((480, 640), (2, 3), (560, 784), (560, 746), (0, 19), (251, 336), 740),
    ((336, 336), (1, 1), (336, 336), (336, 336), (0, 0), (336, 336), 316),
    ((1080, 1920), (3, 4), (784, 1008), (567, 1007), (108, 0), (189, 336), 1196),
    ((768, 1024), (3, 4), (784, 1008), (756, 1008), (14, 0), (252, 336), 1196),
    ((4000, 3000), (4, 3), (1008, 784), (1008, 756), (0, 14), (336, 252), 1204),
])
def test_worked_examples_of_the_spec(hw: tuple[int, int], tiling: tuple[int, int],
                                     canvas: tuple[int, int], resized: tuple[int, int],
                                     offset: tuple[int, int], global_resized: tuple[int, int],
                                     tokens: int) -> None:
    plan = MolmoImageProcessor().plan(*hw)
    assert plan.tiling == tiling and plan.canvas == canvas and plan.resized == resized
    assert plan.offset == offset and plan.global_resized == global_resized
    assert plan.n_image_tokens == tokens == image_token_count(*hw)
    r, c = 8 * tiling[0] + 4, 8 * tiling[1] + 4
    assert plan.pooled == (r, c) and plan.n_image_tokens == 160 + r * (c + 1)


def test_fit_size_uses_float32_like_the_official_code() -> None:
    # f32(336/640) = 0.52499998 and 480 * that truncates to 251 (float64 would give 252).
    assert fit_size(480, 640, 336, 336) == (251, 336)


@pytest.mark.parametrize("h, w, expected", [
    (100, 100, (1, 1)), (224, 224, (1, 1)), (1, 1, (1, 1)), (112, 112, (1, 1)),
    (50, 80, (1, 1)), (512, 512, (2, 2)), (150, 1200, (1, 5)), (872, 1000, (3, 4)),
])
def test_select_tiling_small_and_large(h: int, w: int, expected: tuple[int, int]) -> None:
    assert select_tiling(h - 112, w - 112, 224, 12) == expected


def _official_image_input_idx(rows: int, cols: int) -> np.ndarray:
    """The official construction (patch ordering per crop, row-major transpose, inverse
    permutation), re-derived from the spec's description: the cross-check of the closed form."""
    lm = rm = 4
    tl = 12
    window = 24 - lm - rm
    order, on = [], 0
    for i in range(rows):
        y0 = 0 if i == 0 else lm // 2
        ch = window + (lm if i == 0 else 0) + (rm if i == rows - 1 else 0)
        for j in range(cols):
            x0 = 0 if j == 0 else lm // 2
            cw = window + (lm if j == 0 else 0) + (rm if j == cols - 1 else 0)
            ph, pw = (ch + 1) // 2, (cw + 1) // 2
            crop = np.full((tl, tl), -1, dtype=np.int64)
            crop[y0:y0 + ph, x0:x0 + pw] = np.arange(on, on + ph * pw).reshape(ph, pw)
            order.append(crop)
            on += ph * pw
    po = np.stack(order).reshape(-1)
    valid = po >= 0
    # Crop-major numbering -> left-to-right raster order of the stitched grid.
    rh = np.stack(order).reshape(rows, cols, tl, tl).transpose(0, 2, 1, 3).reshape(-1)
    po[valid] = rh[rh >= 0]
    po = np.where(po >= 0, po + tl * tl, -1)
    po = np.concatenate([np.arange(tl * tl), po])
    # Tokens, then the official inverse permutation onto the <im_patch> positions.
    h, w = rows * window + lm + rm, cols * window + lm + rm
    patch, col = 1, 2
    row_g = [patch] * tl + [col]
    row_h = [patch] * ((w + 1) // 2) + [col]
    tokens = np.array([0] + row_g * tl + [0] + [0] + row_h * ((h + 1) // 2) + [0])
    positions = np.flatnonzero(tokens == patch)
    valid = po >= 0
    assert len(positions) == int(valid.sum())
    sorted_ix = np.zeros(len(positions), dtype=np.int64)
    sorted_ix[po[valid]] = np.arange(int(valid.sum()))
    ex = np.full(po.shape, -1)
    ex[valid] = sorted_ix
    keep = (ex >= 0).astype(np.int64)
    out = positions[ex * keep] * keep - 100 * (1 - keep)
    return out.reshape(-1, tl * tl)


@pytest.mark.parametrize("tiling", [(i, j) for i in range(1, 13) for j in range(1, 13)
                                    if i * j <= 12])
def test_closed_form_image_input_idx_matches_the_official_construction(
        tiling: tuple[int, int]) -> None:
    proc = MolmoImageProcessor()
    rows, cols = tiling
    plan = CropPlan(height=1, width=1, tiling=tiling, canvas=(0, 0), resized=(0, 0),
                    offset=(0, 0), global_resized=(0, 0), global_offset=(0, 0),
                    pooled=(8 * rows + 4, 8 * cols + 4), global_pooled=(12, 12))
    np.testing.assert_array_equal(proc.image_input_idx(plan), _official_image_input_idx(*tiling))
    ids = ImageTokenIds(im_start=7, im_end=8, im_patch=5, im_col=6)
    tokens = proc.image_tokens(plan, ids)
    idx = proc.image_input_idx(plan)
    assert (tokens[idx[idx >= 0]] == 5).all()  # every feature lands on an <im_patch>
    assert len(np.unique(idx[idx >= 0])) == int((tokens == 5).sum())  # each patch token once


def test_token_block_layout() -> None:
    proc = MolmoImageProcessor()
    plan = proc.plan(300, 451)  # chelsea: 1x2 tiling
    ids = ImageTokenIds(im_start=1, im_end=2, im_patch=3, im_col=4)
    tokens = proc.image_tokens(plan, ids)
    assert tokens.dtype == np.int64 and len(tokens) == plan.n_image_tokens == 412
    assert tokens[0] == 1 and tokens[157] == 2 and tokens[158] == 1 and tokens[-1] == 2
    g = tokens[1:157].reshape(12, 13)
    assert (g[:, :12] == 3).all() and (g[:, 12] == 4).all()


# --- max_crops -------------------------------------------------------------------------------

def test_max_crops_caps_crops_and_tokens() -> None:
    pixels = np.zeros((1080, 1920, 3), dtype=np.uint8)
    previous = None
    for max_crops in range(1, 13):
        proc = MolmoImageProcessor(max_crops=max_crops)
        plan = proc.plan(1080, 1920)
        assert plan.n_crops <= max_crops + 1
        assert plan.n_image_tokens <= proc.max_image_tokens()
        if previous is not None:
            assert plan.n_image_tokens >= previous  # more crops allowed -> never fewer tokens
        previous = plan.n_image_tokens
    out = MolmoImageProcessor(max_crops=2)(pixels)
    assert out["images"].shape[0] == out["image_masks"].shape[0] == 3


def test_max_image_tokens_closed_form() -> None:
    assert MolmoImageProcessor().max_image_tokens() == 1460  # tiling (12, 1): 160 + 100 * 13
    assert MolmoImageProcessor(max_crops=1).max_image_tokens() == 316


# --- outputs on odd inputs ---------------------------------------------------------------------

def test_tiny_image_gets_one_tile_and_valid_masks() -> None:
    out = MolmoImageProcessor()(np.full((1, 1, 3), 200, dtype=np.uint8))
    assert out["plan"].tiling == (1, 1)
    assert out["images"].shape == (2, 576, 588)
    assert np.isfinite(out["images"]).all()
    # Upscaled 1x1 -> 336x336 fills the canvas: every patch is real.
    assert (out["image_masks"][0] == 1.0).all() and (out["image_masks"][1] == -1).all()


def test_too_thin_images_raise_one_clear_error() -> None:
    proc = MolmoImageProcessor()
    for shape in [(1, 2000, 3), (20000, 20, 3), (2, 1000, 3)]:
        with pytest.raises(InputError, match="too thin"):
            proc(np.zeros(shape, dtype=np.uint8))
    assert proc.plan(3, 1000).tiling  # 3x1000 still fits (short side >= 1 px)


def test_padding_and_normalisation_constants() -> None:
    out = MolmoImageProcessor()(np.zeros((50, 80, 3), dtype=np.uint8))
    pad = (np.float32(0) - np.float32([0.48145466, 0.4578275, 0.40821073])) / \
        np.float32([0.26862954, 0.26130258, 0.27577711])
    # The top-left patch of the global crop is padding (50x80 -> 210x336, 63 rows on top).
    patch = out["images"][0, 0].reshape(14, 14, 3)
    np.testing.assert_array_equal(patch, np.broadcast_to(pad, patch.shape))


def test_no_padding_mask_setting_omits_image_masks() -> None:
    out = MolmoImageProcessor(image_padding_mask=False)(np.zeros((64, 64, 3), dtype=np.uint8))
    assert "image_masks" not in out


# --- settings (processor.json) ------------------------------------------------------------------

def test_settings_round_trip_and_hub_config(tmp_path: Path) -> None:
    proc = MolmoImageProcessor(max_crops=6, resize_method="tensorflow")
    again = MolmoImageProcessor.from_dict(json.loads(json.dumps(proc.to_dict())))
    assert again == proc
    hub = {"auto_map": {"AutoImageProcessor": "x"}, "image_processor_type": "MolmoImageProcessor",
           "max_crops": 12, "overlap_margins": [4, 4], "base_image_input_size": [336, 336],
           "image_token_length_w": 12, "image_token_length_h": 12, "image_patch_size": 14,
           "image_padding_mask": True, "do_normalize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hub keys are all known
        assert MolmoImageProcessor.from_dict(hub) == MolmoImageProcessor()
    with pytest.warns(UserWarning, match="unknown"):
        MolmoImageProcessor.from_dict({"max_crops": 3, "frobnicate": 1})
    proc.save_to_artifact(tmp_path)
    stored = json.loads((tmp_path / "processor.json").read_text())
    assert MolmoImageProcessor.from_dict(stored["image_processor"]) == proc


@pytest.mark.parametrize("bad", [
    {"max_crops": 0}, {"max_crops": 2.5}, {"resize_method": "pil"}, {"overlap_margins": (3, 3)},
    {"base_image_input_size": (336, 320)}, {"image_token_length_w": 10}, {"image_std": (0, 1, 1)},
    {"image_mean": (0.5, 0.5)},
])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        MolmoImageProcessor(**bad)


def test_replace_returns_a_validated_copy() -> None:
    proc = MolmoImageProcessor()
    assert proc.replace(max_crops=4).max_crops == 4 and proc.max_crops == 12
    with pytest.raises(InputError):
        proc.replace(max_crops=-1)
