"""One MolmoPipeline (ORT backend) shared by threads and by interleaved streams: every answer is
exactly the one the same call gives alone, and nothing is left on the pipeline.

Exact equality is the right bound: each generation runs the same ORT kernels on the same inputs
with its own KV cache, so thread scheduling changes nothing but timing (the ORT CPU kernels'
work split depends on the session's thread count, which is fixed, not on which thread runs).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from molmo_runtime.pipeline import GenerationResult, MolmoPipeline
from tests.conftest import REPO

PHOTO = REPO / "runtime" / "molmo_runtime" / "assets" / "demo.jpg"
NEW_TOKENS = 10
# (image, prompt, sampling): greedy and seeded sampling, with and without the image.
CALLS = [
    (PHOTO, "Point to the cat.", {}),
    (None, "Tell me a story.", {"temperature": 1.0, "top_k": 40, "seed": 3}),
    (PHOTO, "Describe this image.", {"temperature": 0.8, "top_p": 0.9, "seed": 11}),
    (None, "Count to ten.", {}),
]


@pytest.fixture(scope="module")
def pipe(demo_artifact: Path) -> MolmoPipeline:
    return MolmoPipeline.from_dir(demo_artifact, backend="ort", threads=1)


def _key(r: GenerationResult) -> tuple[str, tuple[int, ...], str]:
    return r.text, tuple(r.token_ids), r.finish_reason


@pytest.fixture(scope="module")
def alone(pipe: MolmoPipeline) -> list[tuple[str, tuple[int, ...], str]]:
    return [_key(pipe.generate(img, prompt, NEW_TOKENS, **kw)) for img, prompt, kw in CALLS]


def test_four_threads_give_the_single_thread_answers(pipe: MolmoPipeline, alone: list) -> None:
    rounds = 3
    barrier = threading.Barrier(4)

    def worker(t: int) -> list[tuple[int, tuple[str, tuple[int, ...], str]]]:
        barrier.wait()  # start together, so the generations overlap
        out = []
        for r in range(rounds):
            i = (t + r) % len(CALLS)  # each thread walks the calls from another start
            img, prompt, kw = CALLS[i]
            out.append((i, _key(pipe.generate(img, prompt, NEW_TOKENS, **kw))))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for f in [pool.submit(worker, t) for t in range(4)] for r in f.result()]
    assert len(results) == 4 * rounds
    wrong = [(i, got) for i, got in results if got != alone[i]]
    assert not wrong, f"{len(wrong)} of {len(results)} threaded answers differ: {wrong[:2]}"
    assert not hasattr(pipe, "last_result")


def test_interleaved_streams_stay_independent(pipe: MolmoPipeline, alone: list) -> None:
    streams = [pipe.stream(img, prompt, NEW_TOKENS, **kw) for img, prompt, kw in CALLS]
    texts = [""] * len(streams)
    live = set(range(len(streams)))
    while live:  # one piece of each in turn
        for i in sorted(live):
            piece = next(streams[i], None)
            if piece is None:
                live.discard(i)
            else:
                texts[i] += piece
    for i, stream in enumerate(streams):
        assert texts[i] == stream.result.text
        assert _key(stream.result) == alone[i], f"stream {i} differs from its answer alone"


def test_abandoned_stream_gives_its_cache_back(pipe: MolmoPipeline, alone: list) -> None:
    stream = pipe.stream(*CALLS[0][:2], NEW_TOKENS)
    next(stream)
    stream.close()
    pool = pipe.backend._pool  # type: ignore[attr-defined]
    assert len(pool) >= 1 and all(isinstance(a, np.ndarray) for a in pool[-1])
    assert _key(pipe.generate(*CALLS[0][:2], NEW_TOKENS)) == alone[0]
