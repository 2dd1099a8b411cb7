"""The generation loop, embeddings and image-token injection against a tiny numpy fake backend.

The fake "model" has one-hot embeddings and predicts (last token + 1) mod V, and checks the
attention mask / positions it is given, so left-alignment, cache bookkeeping, EOS, stop strings,
streaming and seeded sampling are tested without an export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molmo_runtime.backends.base import Backend
from molmo_runtime.embedding import EmbeddingTable, add_image_tokens
from molmo_runtime.errors import InputError
from molmo_runtime.graph_io import GraphDims
from molmo_runtime.manifest import Manifest
from molmo_runtime.pipeline import MolmoPipeline

V = 32
EOS = 31


class CountingBackend(Backend):
    name = "fake"

    def __init__(self) -> None:
        self.length = 0
        self.calls: list[tuple[int, int]] = []

    def vision(self, images: np.ndarray) -> np.ndarray:
        return images[:, :, :2] * 2.0

    def connector(self, image_features: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        return np.zeros((image_features.shape[0], 4, V), np.float32)

    def start(self, batch: int) -> None:
        self.length = 0

    @property
    def cache_length(self) -> int:
        return self.length

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        batch, seq, _ = inputs_embeds.shape
        assert attention_mask.shape == (batch, self.length + seq)
        # positions continue from the count of valid tokens so far, per row
        assert (position_ids[:, -1] == attention_mask.sum(1) - 1).all()
        self.calls.append((self.length, seq))
        self.length += seq
        last = inputs_embeds[:, -1].argmax(-1)
        logits = np.full((batch, V), -10.0, np.float32)
        logits[np.arange(batch), (last + 1) % V] = 10.0
        return logits


class LetterProcessor:
    def __call__(self, images: object = None, text: str = "") -> dict[str, np.ndarray]:
        return {"input_ids": np.array([1, 2, 3], np.int64)}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture()
def pipe(tmp_path: Path) -> MolmoPipeline:
    np.save(tmp_path / "embed_tokens.npy", np.eye(V, dtype=np.float32))
    dims = GraphDims(576, 588, 8, 4, V, 1, 1, 4, V, max_crops=12, max_seq_len=64)
    raw = {"dims": dims.to_dict(), "special_tokens": {"eos": EOS}, "max_seq_len": 64,
           "graphs": {}, "files": {}}
    return MolmoPipeline(Manifest(tmp_path, raw), CountingBackend(), LetterProcessor())


def test_right_padded_rows_are_left_aligned(pipe: MolmoPipeline) -> None:
    ids = np.array([[5, 6, 7], [3, 4, -1]])
    out = pipe.generate_from_inputs(ids, max_new_tokens=4)
    assert out.tolist() == [[8, 9, 10, 11], [5, 6, 7, 8]]
    assert pipe.backend.calls == [(0, 3), (3, 1), (4, 1), (5, 1)]


def test_eos_ends_rows_and_fills(pipe: MolmoPipeline) -> None:
    out = pipe.generate_from_inputs(np.array([[28], [20]]), max_new_tokens=10)
    assert out[0].tolist()[:4] == [29, 30, 31, 31]  # row 0 hit EOS, then EOS fill
    assert out.shape == (2, 10)
    out = pipe.generate_from_inputs(np.array([[28]]), max_new_tokens=10)
    assert out.tolist() == [[29, 30, 31]]  # all rows ended: generation stops


def test_stream_equals_generate_and_stop_strings(pipe: MolmoPipeline) -> None:
    streamed = "".join(pipe.stream(None, "x", max_new_tokens=6))
    result = pipe.generate(None, "x", max_new_tokens=6)
    assert streamed == result.text == "efghij" and result.finish_reason == "length"
    result = pipe.generate(None, "x", max_new_tokens=20, stop=["hi"])
    assert result.text == "efg" and result.finish_reason == "stop"
    result = pipe.generate(None, "x", max_new_tokens=40)
    assert result.finish_reason == "eos" and result.token_ids[-1] == EOS - 1


def test_prompt_over_the_limit_fails_before_any_work(pipe: MolmoPipeline) -> None:
    with pytest.raises(InputError, match="max_seq_len 64"):
        pipe.generate_from_inputs(np.array([[1, 2, 3]]), max_new_tokens=62)
    assert pipe.backend.calls == []


def test_bad_padding_is_refused(pipe: MolmoPipeline) -> None:
    with pytest.raises(InputError, match="padding only at the end"):
        pipe.generate_from_inputs(np.array([[-1, 4, 5]]), max_new_tokens=2)


def test_embedding_gathers_rows_and_maps_padding_to_row_0(tmp_path: Path) -> None:
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "e.npy", table)
    out = EmbeddingTable(tmp_path / "e.npy")(np.array([[2, -1, 3]]))
    assert out.tolist() == [[table[2].tolist(), table[0].tolist(), table[3].tolist()]]


def test_image_tokens_are_added_not_replaced() -> None:
    embeds = np.ones((2, 6, 2), np.float32)
    tokens = np.arange(2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2)
    idx = np.array([[[1, -100, 4]], [[-1, 2, 3]]])
    add_image_tokens(embeds, tokens, idx)
    assert embeds[0, 1].tolist() == [1.0, 2.0] and embeds[0, 4].tolist() == [5.0, 6.0]
    assert embeds[1, 2].tolist() == [9.0, 10.0] and embeds[1, 3].tolist() == [11.0, 12.0]
    assert embeds[0, [0, 2, 3, 5]].tolist() == [[1.0, 1.0]] * 4  # untouched positions
