"""MolmoProcessor against the official processor's outputs (../shared/golden/preprocess): the
token layout, prompt format and dtypes are exact by definition; images are compared per crop by
sha256 (bit-exact recipe, see test_image_processing.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from molmo_runtime.errors import InputError
from molmo_runtime.image_processing import MolmoImageProcessor
from molmo_runtime.processing import IMAGE_SPECIAL_TOKENS, MolmoProcessor

from tests.conftest import golden_path

KEYS = ("input_ids", "images", "image_input_idx", "image_masks")
DTYPES = {"input_ids": np.int64, "images": np.float32, "image_input_idx": np.int32,
          "image_masks": np.float32}


@pytest.fixture(scope="module")
def proc() -> MolmoProcessor:
    return MolmoProcessor.from_pretrained(golden_path("tokenizer"))


def _cases() -> list[dict[str, Any]]:
    try:
        return list(json.loads(golden_path("preprocess", "cases.json").read_text())["cases"])
    except pytest.skip.Exception:
        return []


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_golden_case(proc: MolmoProcessor, case: dict[str, Any]) -> None:
    ref = np.load(golden_path("preprocess", case["npz"]))
    out = proc(images=golden_path("preprocess", case["image_file"]), text=case["prompt"])
    assert set(out) == set(KEYS)
    for key in KEYS:
        assert out[key].dtype == DTYPES[key], key
    for key in ("input_ids", "image_input_idx", "image_masks"):
        np.testing.assert_array_equal(out[key], ref[key])
    shas = [hashlib.sha256(np.ascontiguousarray(c, "<f4").tobytes()).hexdigest()
            for c in out["images"]]
    assert shas == list(ref["images_crop_sha256"])
    n_text = len(ref["text_tokens"])
    np.testing.assert_array_equal(out["input_ids"][-n_text:], ref["text_tokens"])
    assert proc.format_prompt(case["prompt"]) == case["text_string_encoded"]
    assert proc.num_prompt_tokens(case["prompt"], tuple(case["image_hw"])) == case["seq_len"]
    assert proc.num_image_tokens(*case["image_hw"]) == case["n_image_tokens"]


def test_text_only(proc: MolmoProcessor) -> None:
    out = proc(text="Describe this image.")
    assert set(out) == {"input_ids"} and out["input_ids"].dtype == np.int64
    assert out["input_ids"].tolist() == [151643, 2657, 25, 60785, 419, 2168, 13, 21388, 25]
    assert proc.num_prompt_tokens("Describe this image.") == 9


def test_image_inputs_are_interchangeable(proc: MolmoProcessor) -> None:
    from PIL import Image

    path = golden_path("preprocess", "images", "chelsea.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    a = proc(images=path, text="hi")
    for source in (str(path), path.read_bytes(), Image.open(path), pixels, [pixels]):
        b = proc(images=source, text="hi")
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_max_crops_override_reduces_tokens(proc: MolmoProcessor) -> None:
    path = golden_path("preprocess", "images", "hubble_deep_field.jpg")
    full = proc(images=path, text="hi")
    small = proc(images=path, text="hi", max_crops=4)
    assert full["images"].shape[0] == 13 and small["images"].shape[0] <= 5
    assert len(small["input_ids"]) < len(full["input_ids"])
    assert len(small["input_ids"]) == proc.num_prompt_tokens("hi", (872, 1000), max_crops=4)
    assert proc.max_crops == 12  # the override is per call


def test_decode_strips_specials(proc: MolmoProcessor) -> None:
    ids = proc(text="Point to the eyes.")["input_ids"]
    assert proc.decode(ids) == " User: Point to the eyes. Assistant:"
    assert proc.decode([proc.special_tokens.im_patch, proc.special_tokens.eos]) == ""


def test_one_image_per_prompt(proc: MolmoProcessor) -> None:
    px = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(InputError, match="one image"):
        proc(images=[px, px], text="hi")


# --- loading layouts ---------------------------------------------------------------------------

def test_checkpoint_dir_with_hub_preprocessor_config(tmp_path: Path) -> None:
    for f in golden_path("tokenizer").iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor"},
        "image_processor_type": "MolmoImageProcessor", "max_crops": 6,
        "overlap_margins": [4, 4], "base_image_input_size": [336, 336]}))
    p = MolmoProcessor.from_pretrained(tmp_path)
    assert p.max_crops == 6
    assert MolmoProcessor.from_pretrained(tmp_path, max_crops=3).max_crops == 3


def test_artifact_round_trip(proc: MolmoProcessor, tmp_path: Path) -> None:
    p = MolmoProcessor(proc.tokenizer, MolmoImageProcessor(max_crops=5))
    p.save_to_artifact(tmp_path)
    assert (tmp_path / "processor.json").is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert not list(tmp_path.rglob("*.partial"))  # atomic writes leave no temporaries
    stored = json.loads((tmp_path / "processor.json").read_text())
    assert stored["image_processor"]["max_crops"] == 5
    assert stored["special_tokens"]["im_patch"] == 152066
    again = MolmoProcessor.from_pretrained(tmp_path)
    assert again.max_crops == 5 and again.special_tokens == proc.special_tokens
    path = golden_path("preprocess", "images", "coffee.png")
    a, b = p(images=path, text="Describe."), again(images=path, text="Describe.")
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])


def _byte_level_tokenizer_dir(d: Path) -> None:
    """A tokenizer.json-only dir like the demo checkpoint's: bytes 0..255 + specials above."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # The byte-level alphabet: printable Latin-1 bytes stand for themselves, the others map to
    # code points from 256 up, in byte order; token id = byte value.
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    vocab = {(chr(b) if b in keep else chr(next(extra))): b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", *IMAGE_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None,
                                                          "eos_token": "<|endoftext|>"}))


def test_tokenizer_json_dir(tmp_path: Path) -> None:
    _byte_level_tokenizer_dir(tmp_path / "tok")
    p = MolmoProcessor.from_pretrained(tmp_path / "tok")
    sp = p.special_tokens
    assert sp.eos == sp.bos == 256 and (sp.im_start, sp.image) == (257, 261)
    out = p(images=np.zeros((40, 60, 3), np.uint8), text="Hi")
    text = " User: Hi Assistant:"
    assert out["input_ids"][-len(text):].tolist() == list(text.encode())
    assert out["input_ids"][0] == 256 and out["input_ids"][1] == sp.im_start
    assert p.decode(out["input_ids"]) == text
    # Saved into an artifact and reloaded from there (tokenizer/ subfolder).
    p.save_to_artifact(tmp_path / "artifact")
    q = MolmoProcessor.from_pretrained(tmp_path / "artifact")
    assert q.special_tokens == sp
    # Only special_tokens_map.json (no tokenizer_config.json) also works.
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    assert MolmoProcessor.from_pretrained(tmp_path / "tok").special_tokens == sp


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        MolmoProcessor.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # the exporter relies on this for tokenizer-less dirs
        MolmoProcessor.from_pretrained(tmp_path)


def test_processing_never_imports_torch(tmp_path: Path) -> None:
    _byte_level_tokenizer_dir(tmp_path)
    code = (
        "import sys, numpy as np\n"
        "from molmo_runtime.processing import MolmoProcessor\n"
        "from molmo_runtime.points import parse_points\n"
        f"p = MolmoProcessor.from_pretrained({str(tmp_path)!r})\n"
        "p(images=np.zeros((30, 900, 3), np.uint8), text='hi')\n"
        "MolmoProcessor.from_pretrained\n"
        "import molmo_runtime.image_processing as ip\n"
        "ip.MolmoImageProcessor(resize_method='tensorflow')(np.zeros((9, 9, 3), np.uint8))\n"
        "parse_points('<point x=\"1\" y=\"2\">a</point>', 10, 10)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
