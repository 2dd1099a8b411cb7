"""The TensorRT runner on the graphs users build: the exported demo artifact's engines (fp16
graphs, built by build_engines, executed by the fake TensorRT of tests/gpu/fake_trt), against
the ORT backend on the same artifact. This exercises our plumbing (profiles, bindings, KV-cache
appends, chunked prefill, CUDA-graph replay out of order) with the real exported attention,
whose I/O and dynamic dimensions differ from the hand-built tiny graphs.

Bound: tolerances.TABLE["trt-sim/real_graphs"] (fp16 engine graph vs fp32).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from molmo_export.trt.builder import build_engines  # noqa: E402
from molmo_runtime.backends.ort import OrtBackend  # noqa: E402
from molmo_runtime.backends.trt import TrtBackend  # noqa: E402
from molmo_runtime.manifest import Manifest, load_manifest  # noqa: E402
from molmo_runtime.prefill import prefill  # noqa: E402
from molmo_runtime.tolerances import TABLE  # noqa: E402
from tests.gpu import fake_trt  # noqa: E402

BOUND = TABLE["trt-sim/real_graphs"]
MAX_PROMPT = 32  # the prefill profile's maximum: longer prompts go in chunks


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and np.isfinite(got).all()
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= BOUND.bound(float(np.abs(want).max())), err


@pytest.fixture
def engines(demo_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[fake_trt.FakeCuda, Manifest]:
    cuda = fake_trt.install(monkeypatch)
    art = tmp_path / "demo"
    shutil.copytree(demo_artifact, art)  # the shared test artifact stays untouched
    build_engines(art, "trt-fp16", max_prompt_len=MAX_PROMPT, machine=fake_trt.MACHINE)
    return cuda, load_manifest(art)


def _prompt(m: Manifest, length: int, seed: int) -> np.ndarray:
    table = np.load(m.path("embed_tokens.npy"), mmap_mode="r")
    ids = np.random.default_rng(seed).integers(0, 256, length)
    return np.asarray(table[ids], np.float32)[None]


def test_vision_and_connector(engines: tuple[fake_trt.FakeCuda, Manifest]) -> None:
    _, m = engines
    d, rng = m.dims, np.random.default_rng(0)
    trt, ref = TrtBackend(m, machine=fake_trt.MACHINE), OrtBackend(m)
    images = rng.standard_normal((3, d.patches_per_crop, d.patch_dim)).astype(np.float32)
    feats = ref.vision(images)
    close(trt.vision(images), feats)
    masks = rng.random((3, d.patches_per_crop)).astype(np.float32)
    close(trt.connector(feats, masks), ref.connector(feats, masks))
    trt.close()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_decoder_chunked_prefill_and_decode(engines: tuple[fake_trt.FakeCuda, Manifest],
                                            cuda_graph: bool) -> None:
    """Two generations (a long prompt prefilled in chunks, then a short one, so CUDA-graph
    buckets are replayed out of order), step by step against the ORT backend."""
    cuda, m = engines
    trt = TrtBackend(m, machine=fake_trt.MACHINE, cuda_graph=cuda_graph, graph_bucket=16)
    ref = OrtBackend(m)
    assert trt.max_prefill_tokens == MAX_PROMPT and ref.max_prefill_tokens is None
    for length, prompt, seed in ((60, 45, 1), (20, 9, 2)):
        embeds = _prompt(m, length, seed)
        mask = np.ones((1, length), np.int64)
        positions = np.arange(length, dtype=np.int64)[None]
        with trt.new_state(1) as got_state, ref.new_state(1) as want_state:
            got = prefill(got_state, embeds[:, :prompt], mask[:, :prompt],
                          positions[:, :prompt], trt.max_prefill_tokens)
            close(got, want_state.decode(embeds[:, :prompt], mask[:, :prompt],
                                         positions[:, :prompt]))
            for t in range(prompt, length):
                step = (embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])
                close(got_state.decode(*step), want_state.decode(*step))
            assert got_state.length == want_state.length == length
    if cuda_graph:
        assert len(cuda.graphs) == 4 and cuda.launches > 0  # buckets 48, 64, 16, 32
    trt.close()


def test_pipeline_on_the_simulated_engines(engines: tuple[fake_trt.FakeCuda, Manifest],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline (image, prompt longer than the prefill profile) on the TensorRT
    backend: it opens the engines, prefills in chunks and generates as ORT does."""
    import molmo_runtime.backends.trt as backend
    from molmo_runtime.pipeline import MolmoPipeline

    _, m = engines
    monkeypatch.setattr(backend, "collect_machine_info", lambda device=0: fake_trt.MACHINE)
    image = Path(__file__).resolve().parents[2] / "runtime/molmo_runtime/assets/demo.jpg"
    results, logits = {}, []
    for name in ("ort", "trt"):
        pipe = MolmoPipeline.from_dir(m.directory, backend=name)  # type: ignore[arg-type]
        assert pipe.backend.name == name
        if name == "ort":  # record ORT's logits, to know where greedy choices are clear
            new_state = pipe.backend.new_state

            def recording_state(batch: int, new_state=new_state):  # type: ignore[no-untyped-def]
                state = new_state(batch)
                decode = state.decode

                def recording(*a: np.ndarray) -> np.ndarray:
                    logits.append(decode(*a))
                    return logits[-1]

                state.decode = recording  # type: ignore[method-assign]
                return state

            pipe.backend.new_state = recording_state  # type: ignore[method-assign]
        results[name] = pipe.generate(image, "Point to the cat.", max_new_tokens=6)
    assert results["trt"].timings.prompt_tokens > MAX_PROMPT  # it was chunked
    got, want = results["trt"].token_ids, results["ort"].token_ids
    compared = 0
    for i, lg in enumerate(logits[:len(want)]):
        top2 = np.sort(lg[0])[-2:]
        if top2[1] - top2[0] <= 2 * BOUND.bound(float(np.abs(lg).max())):
            break  # a near tie: fp16 may legitimately choose the other token from here on
        assert got[i] == want[i], (i, got, want)
        compared += 1
    assert compared >= 1, "no greedy choice of ORT had a clear margin"
