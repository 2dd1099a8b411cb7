"""MolmoPipeline: image + prompt -> answer, points and timings, from an artifact directory.

    processor (numpy) ─► vision ─► connector ─► embeddings + image tokens (numpy)
      ─► decoder prefill ─► [sampler ─► decoder step]* ─► text, points

One generation loop (`token_steps`) serves generate, stream and generate_from_inputs. Each call
keeps its state to itself (see MolmoPipeline's docstring for the thread contract).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from molmo_runtime.backends.base import Backend
from molmo_runtime.embedding import EmbeddingTable, add_image_tokens
from molmo_runtime.errors import InputError, MolmoError
from molmo_runtime.input_checks import (
    check_image_arrays,
    check_input_ids,
    check_int,
    check_prompt,
    check_stop,
)
from molmo_runtime.manifest import Manifest, VerifyMode, load_manifest
from molmo_runtime.prefill import prefill
from molmo_runtime.sampling import Sampler, SamplingParams
from molmo_runtime.stop_strings import find_stop, safe_end

BackendName = Literal["auto", "ort", "trt"]


@dataclass
class Timings:
    """Milliseconds per stage; `decode_ms` holds one entry per generated token after the first."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    connector_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0

    @property
    def ttft_ms(self) -> float:
        return self.preprocess_ms + self.vision_ms + self.connector_ms + self.prefill_ms

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.decode_ms)
        return 1000.0 * len(self.decode_ms) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"preprocess_ms": self.preprocess_ms, "vision_ms": self.vision_ms,
                "connector_ms": self.connector_ms, "prefill_ms": self.prefill_ms,
                "ttft_ms": self.ttft_ms, "decode_tokens": len(self.decode_ms),
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "prompt_tokens": self.prompt_tokens}

    def summary(self) -> str:
        return (f"preprocess {self.preprocess_ms:.1f} ms | vision {self.vision_ms:.1f} ms | "
                f"connector {self.connector_ms:.1f} ms | prefill {self.prefill_ms:.1f} ms "
                f"({self.prompt_tokens} tokens) | TTFT {self.ttft_ms:.1f} ms | decode "
                f"{self.decode_tokens_per_s:.1f} tok/s ({len(self.decode_ms)} tokens)")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    points: list[Any]
    timings: Timings
    finish_reason: str  # "eos", "stop", "length"


class _Clock:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1000.0, now
        return ms


def _open_backend(manifest: Manifest, backend: BackendName, providers: list[str] | None,
                  threads: int | None) -> Backend:
    if backend == "auto":
        backend = "trt" if manifest.raw.get("engines") else "ort"
    if backend == "trt":
        from molmo_runtime.backends.trt import TrtBackend

        return TrtBackend(manifest)
    if backend == "ort":
        from molmo_runtime.backends.ort import OrtBackend

        return OrtBackend(manifest, providers=providers, threads=threads)
    raise InputError(f"backend must be 'auto', 'ort' or 'trt', got {backend!r}")


class MolmoPipeline:
    """Image + prompt -> answer, with an artifact's backend. See docs/runtime.md.

    Threads: one pipeline may serve several threads at once, and a thread may interleave several
    `stream()`s. Every generation keeps its state (KV cache, sampler, timings, text) to itself
    and returns it; the pipeline holds no per-generation state. With the ORT backend generations
    run concurrently (ORT sessions serve concurrent runs; each generation has its own KV cache,
    so N at once hold N caches); backends with a single cache (TensorRT) run them one at a time.
    Preprocessing (the image processor reuses scratch buffers) is serialised by a lock.
    Every answer equals the one the same call gives alone.
    """

    def __init__(self, manifest: Manifest, backend: Backend, processor: Any | None) -> None:
        self.manifest = manifest
        self.backend = backend
        self.processor = processor
        self.embeddings = EmbeddingTable(manifest.path("embed_tokens.npy"))
        self.eos_id = int(manifest.special_tokens["eos"])
        self._preprocess_lock = threading.Lock()

    @classmethod
    def from_dir(cls, artifact_dir: str | os.PathLike[str], backend: BackendName = "auto",
                 providers: list[str] | None = None, threads: int | None = None,
                 verify: VerifyMode = "cached",
                 allow_unverified: bool = False) -> MolmoPipeline:
        """Open an artifact. `verify`: "cached" (default) checks sizes and hashes each file
        state once (molmo_runtime.hash_cache), "full" re-hashes everything, "size" only sizes,
        "none" skips. An artifact that failed its export verification is refused unless
        `allow_unverified`."""
        manifest = load_manifest(artifact_dir, verify=verify, allow_unverified=allow_unverified)
        processor = None
        if manifest.raw.get("has_tokenizer", True):
            from molmo_runtime.processing import MolmoProcessor

            processor = MolmoProcessor.from_artifact(manifest)
        return cls(manifest, _open_backend(manifest, backend, providers, threads), processor)

    # -- public API ---------------------------------------------------------------------------

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 200,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop: Sequence[str] = (),
                 seed: int | None = None) -> GenerationResult:
        """Answer `prompt` about `image` (a path, bytes, PIL image or uint8 array; None for a
        text-only prompt). Returns the NEW text and token ids only (the prompt is not repeated;
        the reference model's generate returns prompt + new ids, see docs/runtime.md).

        temperature 0 is greedy (top_k, top_p and seed then have no effect); the answer ends at
        EOS, at the first of the `stop` strings (cut before it) or after max_new_tokens.
        Bad values raise InputError before any work.
        """
        stream = self.stream(image, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed)
        for _ in stream:
            pass
        return stream.result

    def stream(self, image: Any, prompt: str, max_new_tokens: int = 200,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               stop: Sequence[str] = (), seed: int | None = None) -> TextStream:
        """As generate, but yield the answer's text as it is decoded; the pieces join to exactly
        `generate`'s text (text that could still turn into a stop string is held back until it
        cannot). The returned TextStream's `.result` is the GenerationResult once it is
        exhausted; closing it early (or dropping it) frees its KV cache."""
        if self.processor is None:
            raise MolmoError(f"{self.manifest.directory} has no tokenizer: use "
                             "generate_from_inputs with token ids")
        prompt = check_prompt(prompt)
        stops = check_stop(stop)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        params = SamplingParams(temperature, top_k, top_p, seed)
        return TextStream(self._generation(image, prompt, max_new_tokens, params, stops))

    def generate_from_inputs(self, input_ids: np.ndarray, images: np.ndarray | None = None,
                             image_masks: np.ndarray | None = None,
                             image_input_idx: np.ndarray | None = None,
                             max_new_tokens: int = 20, temperature: float = 0.0,
                             top_k: int | None = None, top_p: float | None = None,
                             seed: int | None = None, stop_at_eos: bool = True) -> np.ndarray:
        """Arrays already preprocessed, with a batch axis (right-padded with -1 as the official
        processor batches them) -> generated ids [B, N], the NEW tokens only (the reference
        model's generate returns [B, T + N], prompt included). Rows that end early are filled
        with EOS; N < max_new_tokens when every row has ended. Ids outside the vocabulary,
        non-finite pixels and repeated image positions raise InputError."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        ids = check_input_ids(input_ids, int(self.embeddings.table.shape[0]))
        batch = {"input_ids": ids}
        if images is not None:
            dims = self.manifest.dims
            lengths = (ids != -1).sum(1)
            batch["images"], batch["image_masks"], batch["image_input_idx"] = check_image_arrays(
                images, image_masks, image_input_idx, ids.shape[0], lengths,
                (dims.patches_per_crop, dims.patch_dim), self.manifest.max_crops)
        steps: list[np.ndarray] = []
        done = np.zeros(ids.shape[0], bool)
        for step in self.token_steps(batch, max_new_tokens, sampler, Timings()):
            step = np.where(done, self.eos_id, step)
            steps.append(step)
            if stop_at_eos:
                done |= step == self.eos_id
                if done.all():
                    break
        return np.stack(steps, 1) if steps else np.zeros((len(done), 0), np.int64)

    # -- one generation -----------------------------------------------------------------------

    def _generation(self, image: Any, prompt: str, max_new_tokens: int, params: SamplingParams,
                    stops: tuple[str, ...]) -> Generator[str, None, GenerationResult]:
        """Yield the text pieces of one answer and return its GenerationResult. Everything it
        changes is local: this is what makes the pipeline safe to share."""
        assert self.processor is not None
        timings = Timings()
        clock = _Clock()
        width = height = None
        with self._preprocess_lock:
            if image is not None:
                from molmo_runtime.image_io import load_image

                pixels = load_image(image)  # [H, W, 3] uint8
                height, width = pixels.shape[:2]
                inputs = self.processor(images=pixels, text=prompt)
            else:
                inputs = self.processor(text=prompt)
        timings.preprocess_ms = clock.lap()
        batch = {k: v[None] for k, v in inputs.items()}  # add the batch axis
        sampler = Sampler(params)
        ids: list[int] = []
        text, finish = "", "length"
        sent = 0  # characters of `text` already yielded
        for step in self.token_steps(batch, max_new_tokens, sampler, timings):
            token = int(step[0])
            if token == self.eos_id:
                finish = "eos"
                break
            ids.append(token)
            text = self.processor.decode(ids)
            cut = find_stop(text, stops)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            # The tokenizer's decode of a prefix of ids is a prefix of the full decode, except
            # for trailing U+FFFD of an incomplete UTF-8 sequence: safe_end never passes those.
            end = safe_end(text, stops)
            if end > sent:
                yield text[sent:end]
                sent = end
        if len(text) > sent:
            yield text[sent:]
        points: list[Any] = []
        if width is not None and height is not None:
            from molmo_runtime.points import parse_points

            points = parse_points(text, width, height)
        return GenerationResult(text, ids, points, timings, finish)

    # -- the generation loop ------------------------------------------------------------------

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.manifest.max_seq_len
        if prompt_len + max_new_tokens > limit:
            raise InputError(
                f"prompt of {prompt_len} tokens (image tokens included) + max_new_tokens "
                f"{max_new_tokens} exceeds this artifact's max_seq_len {limit}: lower "
                "max_new_tokens, shorten the prompt, use fewer crops (--max-crops at export), "
                "or re-export with a larger --max-seq-len")

    def _prefill_inputs(self, batch: dict[str, np.ndarray], timings: Timings,
                        clock: _Clock) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Left-align the rows, embed, add image tokens -> (embeds, mask, positions)."""
        ids = np.asarray(batch["input_ids"], np.int64)  # [B, L], -1 = padding at the end
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, length], got shape {ids.shape}")
        valid = ids != -1
        lengths = valid.sum(1)
        batch_size, seq = ids.shape
        if (lengths == 0).any() or (valid != (np.arange(seq)[None] < lengths[:, None])).any():
            raise InputError("each row of input_ids needs tokens first and -1 padding only "
                             "at the end")
        shift = seq - lengths  # left padding per row, so every row ends at the last position
        cols = (np.arange(seq)[None, :] - shift[:, None]) % seq
        left = np.take_along_axis(ids, cols, 1)
        mask = (left != -1).astype(np.int64)
        embeds = self.embeddings(left)  # [B, L, D]
        if batch.get("images") is not None:
            images = np.asarray(batch["images"], np.float32)  # [B, C, 576, 588]
            crops = images.shape[1]
            features = self.backend.vision(images.reshape(-1, *images.shape[2:]))
            timings.vision_ms = clock.lap()
            masks = np.asarray(batch["image_masks"], np.float32).reshape(batch_size * crops, -1)
            tokens = self.backend.connector(features, masks)  # [B*C, 144, D]
            timings.connector_ms = clock.lap()
            idx = np.asarray(batch["image_input_idx"]).reshape(batch_size, crops, -1)
            idx = np.where(idx >= 0, idx + shift[:, None, None], -1)
            add_image_tokens(embeds, tokens.reshape(batch_size, crops, *tokens.shape[1:]), idx)
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
        return embeds, mask, positions

    def token_steps(self, batch: dict[str, np.ndarray], max_new_tokens: int,
                    sampler: Sampler, timings: Timings) -> Iterator[np.ndarray]:
        """The generation loop under generate, stream and generate_from_inputs: yield the next
        token of every row ([B] int64), max_new_tokens times at most, with no stopping rule of
        its own (the caller stops iterating). `batch` holds the processor's arrays with a batch
        axis; `timings` is filled in as the stages run (benchmarks time the loop from outside)."""
        ids = np.asarray(batch["input_ids"])
        self._check_length(ids.shape[-1], max_new_tokens)
        clock = _Clock()
        # This generation's own KV cache, opened first: a single-cache backend is then held for
        # the vision and connector runs too. Closed when the loop ends or is abandoned.
        with self.backend.new_state(ids.shape[0]) as state:
            embeds, mask, positions = self._prefill_inputs(batch, timings, clock)
            batch_size, seq = mask.shape
            timings.prompt_tokens = seq
            # Preallocated mask for the whole generation: decode slices it, never regrows it.
            full_mask = np.ones((batch_size, seq + max_new_tokens), np.int64)
            full_mask[:, :seq] = mask
            logits = prefill(state, embeds, mask, positions,  # chunked when too long
                             self.backend.max_prefill_tokens)
            timings.prefill_ms = clock.lap()
            next_pos = positions[:, -1:] + 1  # [B, 1]
            for i in range(max_new_tokens):
                token = sampler(logits)
                yield token
                if i + 1 == max_new_tokens:
                    break
                clock.lap()
                step_embeds = self.embeddings(token[:, None])  # [B, 1, D]
                total = seq + i + 1
                logits = state.decode(step_embeds, full_mask[:, :total], next_pos)
                next_pos = next_pos + 1
                timings.decode_ms.append(clock.lap())


class TextStream(Iterator[str]):
    """The text pieces of one generation (MolmoPipeline.stream); `result` once exhausted."""

    def __init__(self, generation: Generator[str, None, GenerationResult]) -> None:
        self._generation = generation
        self._result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._generation)
        except StopIteration as end:
            if end.value is not None:  # the generation's return; later next() calls carry None
                self._result = end.value
            raise

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise MolmoError("the stream has not finished: iterate it to the end before "
                             "reading .result")
        return self._result

    def close(self) -> None:
        """Stop generating and free the KV cache (also done when the stream is dropped)."""
        self._generation.close()
