"""MolmoTokenizer built with the `tokenizers` library against the official Molmo-7B-D tokenizer's
outputs (../shared/golden/tokenizer/tokenization_examples.json; ids are exact by definition)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from molmo_runtime.errors import ArtifactError
from molmo_runtime.processing import MolmoTokenizer, TokenizerNotFoundError

from tests.conftest import golden_path


@pytest.fixture(scope="module")
def golden_tokenizer() -> MolmoTokenizer:
    return MolmoTokenizer.from_dir(golden_path("tokenizer"))


@pytest.fixture(scope="module")
def examples() -> dict[str, Any]:
    return json.loads(golden_path("tokenizer", "tokenization_examples.json").read_text())


def test_every_example_encodes_to_the_official_ids(golden_tokenizer: MolmoTokenizer,
                                                   examples: dict[str, Any]) -> None:
    assert len(examples["examples"]) == 12
    for ex in examples["examples"]:
        assert golden_tokenizer.encode(ex["text"]) == ex["ids"], ex["text"]
        assert golden_tokenizer.tokens(ex["text"]) == ex["tokens"], ex["text"]
        decoded = golden_tokenizer.decode(ex["ids"], skip_special_tokens=False)
        assert decoded == ex["decode_roundtrip"]


def test_special_token_ids(golden_tokenizer: MolmoTokenizer, examples: dict[str, Any]) -> None:
    for token, token_id in examples["special"].items():
        assert golden_tokenizer.tokenizer.token_to_id(token) == token_id
    sp = golden_tokenizer.special
    assert (sp.im_start, sp.im_end, sp.im_patch, sp.im_col, sp.image) == (
        152064, 152065, 152066, 152067, 152068)
    assert sp.eos == examples["eos_token_id"] == 151643
    assert examples["bos_token_id"] is None and sp.bos == sp.eos  # no BOS: EOS is prepended
    assert golden_tokenizer.vocab_size == examples["len_tokenizer"] == 152069


def test_decode_strips_special_tokens(golden_tokenizer: MolmoTokenizer) -> None:
    ids = [152064, 152066] + golden_tokenizer.encode(" hello world") + [151643]
    assert golden_tokenizer.decode(ids) == " hello world"
    assert golden_tokenizer.decode([-1, *golden_tokenizer.encode("a")]) == "a"  # batch padding


def test_saved_tokenizer_json_reloads_identically(golden_tokenizer: MolmoTokenizer,
                                                  examples: dict[str, Any],
                                                  tmp_path: Path) -> None:
    golden_tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = MolmoTokenizer.from_dir(tmp_path)
    assert again.special == golden_tokenizer.special
    for ex in examples["examples"]:
        assert again.encode(ex["text"]) == ex["ids"]


def test_added_tokens_json_alone_is_enough(tmp_path: Path, examples: dict[str, Any]) -> None:
    src = golden_path("tokenizer")
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = MolmoTokenizer.from_dir(tmp_path)
    assert tok.special == MolmoTokenizer.from_dir(src).special
    assert tok.decode([152064, *tok.encode("hi")]) == "hi"  # image tokens count as special


def test_missing_and_wrong_tokenizers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError):
        MolmoTokenizer.from_dir(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<|endoftext|>": 2}, merges=[]))
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ArtifactError, match="image tokens"):
        MolmoTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        MolmoTokenizer.from_dir(tmp_path)


def test_declared_ids_must_match(tmp_path: Path) -> None:
    src = golden_path("tokenizer")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    decoder["152999"] = decoder.pop("152068")  # a gap before <|image|>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="152999"):
        MolmoTokenizer.from_dir(tmp_path)
