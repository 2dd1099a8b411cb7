"""The generation loop, embeddings and image-token injection against a tiny numpy fake backend.

The fake "model" has one-hot embeddings and predicts (last token + 1) mod V, and checks the
attention mask / positions it is given, so left-alignment, cache bookkeeping, EOS, stop strings,
streaming and seeded sampling are tested without an export.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from molmo_runtime.backends.base import Backend, DecodeState, check_cache_size
from molmo_runtime.embedding import EmbeddingTable, add_image_tokens
from molmo_runtime.errors import ArtifactError, InputError, MolmoError
from molmo_runtime.graph_io import GraphDims
from molmo_runtime.manifest import Manifest, file_record
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
    return _fake_pipe(tmp_path)


def _fake_pipe(tmp_path: Path) -> MolmoPipeline:
    np.save(tmp_path / "embed_tokens.npy", np.eye(V, dtype=np.float32))
    dims = GraphDims(576, 588, 8, 4, V, 1, 1, 4, V, max_crops=12, max_seq_len=64)
    raw = {"dims": dims.to_dict(), "special_tokens": {"eos": EOS}, "max_seq_len": 64,
           "max_crops": 12, "graphs": {},
           "files": {"embed_tokens.npy": file_record(tmp_path, "embed_tokens.npy")}}
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


# -- per-call state: interleaved streams, threads, no shared result ---------------------------

def test_generate_returns_its_result_without_instance_state(pipe: MolmoPipeline) -> None:
    before = set(vars(pipe))
    result = pipe.generate(None, "x", max_new_tokens=3)
    assert result.text == "efg" and set(vars(pipe)) == before  # nothing smuggled onto the pipe
    assert not hasattr(pipe, "last_result")


def test_stream_result_is_on_the_stream_once_exhausted(pipe: MolmoPipeline) -> None:
    stream = pipe.stream(None, "x", max_new_tokens=3)
    with pytest.raises(MolmoError, match="not finished"):
        stream.result
    assert "".join(stream) == stream.result.text == "efg"


def test_single_cache_backend_refuses_interleaving_in_one_thread(pipe: MolmoPipeline) -> None:
    """The fake keeps one cache (the default DecodeState): a second stream from the thread that
    holds it is an error, not a deadlock or a corrupted answer; closing the first frees it."""
    first = pipe.stream(None, "x", max_new_tokens=5)
    assert next(first) == "e"
    second = pipe.stream(None, "x", max_new_tokens=5)
    with pytest.raises(MolmoError, match="single KV cache"):
        next(second)
    first.close()
    assert "".join(pipe.stream(None, "x", max_new_tokens=5)) == "efghi"


class PerCallBackend(CountingBackend):
    """A backend with per-generation caches (as ORT): each state counts its own length."""

    def new_state(self, batch: int) -> DecodeState:
        backend = self

        class State(DecodeState):
            def __init__(self) -> None:
                self._length = 0

            @property
            def length(self) -> int:
                return self._length

            def decode(self, embeds: np.ndarray, mask: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
                backend.length = self._length  # the fake's checks read backend.length
                logits = backend.decode(embeds, mask, positions)
                self._length = backend.length
                return logits

        return State()


def test_interleaved_streams_stay_independent(pipe: MolmoPipeline) -> None:
    pipe.backend = PerCallBackend()
    a = pipe.stream(None, "x", max_new_tokens=6)
    b = pipe.stream(None, "x", max_new_tokens=4, stop=["h"])
    pieces_a, pieces_b = [], []
    for _ in range(6):
        pieces_a.append(next(a, ""))
        pieces_b.append(next(b, ""))
    assert "".join(pieces_a) == "efghij" and "".join(pieces_b) == "efg"
    assert b.result.finish_reason == "stop"


# -- streaming never shows what the final answer cuts ------------------------------------------

class ChunkProcessor(LetterProcessor):
    """Token i decodes to CHUNKS[i % len]: multi-character pieces, so that stop strings straddle
    chunk boundaries; token 7 is half of a UTF-8 character until the next token completes it."""

    CHUNKS = ["ab", "c", "de", "fgh", "i", "jk", "l", "?", "mno", "p"]

    def decode(self, ids: list[int]) -> str:
        text = ""
        for n, i in enumerate(ids):
            piece = self.CHUNKS[i % len(self.CHUNKS)]
            if piece == "?":  # an incomplete character, completed by any following token
                piece = "\u00e9" if n + 1 < len(ids) else "\ufffd"
            text += piece
        return text


def stream_pieces(pipe: MolmoPipeline, **kwargs: object) -> tuple[list[str], str]:
    stream = pipe.stream(None, "x", **kwargs)
    pieces = list(stream)
    return pieces, stream.result.text


@pytest.mark.parametrize("stop", [["fghi"], ["hij"], ["ghX"], ["i", "hijk"], ["kl\u00e9m"],
                                  ["\u00e9"], ["zz", "jkl"], ["cdefghijklmnop_"]])
def test_stream_holds_back_possible_stop_strings(pipe: MolmoPipeline, stop: list[str]) -> None:
    pipe.processor = ChunkProcessor()
    pieces, text = stream_pieces(pipe, max_new_tokens=12, stop=stop)
    full = pipe.generate(None, "x", max_new_tokens=12, stop=stop)
    assert "".join(pieces) == text == full.text
    assert all(s not in text for s in stop)
    assert "\ufffd" not in "".join(pieces[:-1])  # never shown before the character completes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=3) | st.just("?"), min_size=1, max_size=8),
       st.lists(st.text("abc\u00e9X", min_size=1, max_size=5), min_size=0, max_size=3))
@example(chunks=["bac"], stop=["c", "acb"])  # "acb" only across tokens never generated
def test_stream_equals_generate_for_any_chunks_and_stops(chunks: list[str],
                                                         stop: list[str]) -> None:
    """Random decodes (token -> chunk) and stop strings: the stream's pieces join to exactly the
    final text, and no piece ever goes past it."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _fake_pipe(Path(tmp))
        proc = ChunkProcessor()
        proc.CHUNKS = chunks
        pipe.processor = proc
        stream = pipe.stream(None, "x", max_new_tokens=10, stop=stop)
        shown = ""
        for piece in stream:
            shown += piece
            assert piece and stream_prefix_ok(shown, proc, stop)
        assert shown == stream.result.text == pipe.generate(None, "x", max_new_tokens=10,
                                                            stop=stop).text
        assert shown == expected_answer(proc, stop)


def stream_prefix_ok(shown: str, proc: ChunkProcessor, stop: list[str]) -> bool:
    return expected_answer(proc, stop).startswith(shown)


def expected_answer(proc: ChunkProcessor, stop: list[str]) -> str:
    """The answer by the stopping rule, computed without the pipeline: after each new token the
    text so far is searched; the first time any stop string occurs, it is cut before the
    earliest occurrence. (Searching the text of all 10 tokens instead would find stop strings
    that only tokens never generated complete, e.g. "acb" across "bac|bac".)"""
    for n in range(1, 11):  # the fake predicts 4, 5, ... after the prompt 1 2 3
        text = proc.decode(list(range(4, 4 + n)))
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            return text[:min(cuts)]
    return text


# -- bad values through the API -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=2.0), "top_p"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_k=True), "top_k"),
    (dict(temperature=1.0, seed=-1), "seed"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(stop=[b"x"]), "stop"),
    (dict(prompt=b"What is this?"), "decode it first"),
    (dict(prompt=None), "prompt must be str"),
    (dict(prompt="caf\udce9"), "lone surrogate"),
])
def test_bad_values_are_input_errors_before_any_work(pipe: MolmoPipeline, kwargs: dict,
                                                     match: str) -> None:
    args = {"prompt": "x", **kwargs}
    prompt = args.pop("prompt")
    for call in (pipe.generate, pipe.stream):
        with pytest.raises(InputError, match=match):
            call(None, prompt, **args)
    assert pipe.backend.calls == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=np.array([[1, 2, V]])), "outside this model's vocabulary"),
    (dict(input_ids=np.array([[1, -2, 3]])), "outside this model's vocabulary"),
    (dict(input_ids=np.array([[1.0, 2.0]])), "must be integers"),
    (dict(input_ids=np.array([1, 2])), r"\[batch, length\]"),
    (dict(images=np.full((1, 1, 576, 588), np.nan, np.float32)), "NaN"),
    (dict(image_input_idx=np.array([[[0, 1, 1, -100]]])), "more than once"),
    (dict(image_input_idx=np.array([[[0, 1, 2, 3]]])), "past that prompt"),
    (dict(image_masks=None), "image_masks"),
    (dict(images=np.zeros((1, 1, 576, 500), np.float32)), "images must be"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arrays_are_input_errors_before_any_work(pipe: MolmoPipeline, kwargs: dict,
                                                     match: str) -> None:
    args = dict(input_ids=np.array([[1, 2, 3]]), images=np.zeros((1, 1, 576, 588), np.float32),
                image_masks=np.ones((1, 1, 576), np.float32),
                image_input_idx=np.array([[[0, 1, 2, -100]]]), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        pipe.generate_from_inputs(**args)
    assert pipe.backend.calls == []


def test_nan_pixels_are_an_input_error(pipe: MolmoPipeline) -> None:
    with pytest.raises(InputError, match="NaN"):
        pipe.generate(np.full((8, 8, 3), np.nan, np.float32), "x", max_new_tokens=2)
    assert pipe.backend.calls == []


def test_kv_cache_size_is_checked_before_allocating() -> None:
    dims = GraphDims(576, 588, 8, 4, V, num_layers=28, num_kv_heads=4, head_dim=128,
                     vocab_rows=V, max_crops=12, max_seq_len=10**9)
    with pytest.raises(ArtifactError, match=r"needs 106811.5 GiB.*--max-seq-len"):
        check_cache_size(dims, 1, 4)
    small = GraphDims(576, 588, 8, 4, V, 28, 4, 128, V, 12, max_seq_len=4096)
    assert check_cache_size(small, 1, 4) == 2 * 28 * 4 * 4096 * 128 * 4  # 448 MiB: fits
    with pytest.raises(ArtifactError, match="fewer rows"):
        check_cache_size(small, 64, 4, limit_bytes=2**30)
