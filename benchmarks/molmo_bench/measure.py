"""Timing loops over a MolmoPipeline and its backend (the same code for every stack).

Two measurements:

  generation   preprocess -> vision -> connector -> prefill -> first token, then new_tokens - 1
               decode steps, through the pipeline's own generation loop (MolmoPipeline.
               token_steps) so the numbers are those of the code users run. Stage times come
               from the pipeline's Timings; TTFT total and per-token latency are this module's
               wall clock around the loop (per-token = time between two tokens leaving the loop:
               embedding gather + decoder step + sampling).
  context      decode step latency at a given context: start the backend, prefill `ctx`
               positions, then time single-token backend.decode calls (the decoder step alone).

Warm-ups are run first and never recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from molmo_runtime.errors import InputError
from molmo_runtime.pipeline import MolmoPipeline, Timings
from molmo_runtime.sampling import Sampler, SamplingParams

from molmo_bench.idle import settle
from molmo_bench.inputs import BenchInputs, text_id_bound
from molmo_bench.machine import gpu_memory_used_mb, peak_rss_mb

STAGES = ("preprocess", "vision", "connector", "prefill")


@dataclass(frozen=True)
class BenchSettings:
    new_tokens: int = 64
    runs: int = 3
    warmup: int = 1
    contexts: tuple[int, ...] = (64, 256, 1024)
    context_steps: int = 16
    seed: int = 0

    def check(self, max_seq_len: int, sequence_tokens: int | None) -> None:
        """Clear errors before any timing starts."""
        for name in ("new_tokens", "runs", "context_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        if self.new_tokens < 2:
            raise InputError("--new-tokens must be >= 2: the first token ends TTFT, decode "
                             "latency needs at least one more")
        if self.warmup < 0:
            raise InputError("--warmup must be >= 0")
        if not self.contexts or min(self.contexts) < 1:
            raise InputError("--contexts needs positive context lengths, e.g. 64,256,1024")
        longest = max(self.contexts) + self.context_steps + 1
        if longest > max_seq_len:
            raise InputError(f"--contexts up to {max(self.contexts)} (+ {self.context_steps + 1} "
                             f"decode steps) exceeds this artifact's max_seq_len {max_seq_len}; "
                             "lower --contexts or re-export with a larger --max-seq-len")
        if sequence_tokens is not None and sequence_tokens + self.new_tokens > max_seq_len:
            raise InputError(f"{sequence_tokens} prompt tokens (image tokens included) + "
                             f"--new-tokens {self.new_tokens} exceeds this artifact's max_seq_len "
                             f"{max_seq_len}; use fewer --crops / --prompt-tokens / --new-tokens")


@dataclass(frozen=True)
class GenerationSample:
    """One measured generation."""

    stages_ms: dict[str, float]  # preprocess, vision, connector, prefill (pipeline Timings)
    ttft_ms: float  # wall clock: start of preprocessing -> first token out of the loop
    token_ms: tuple[float, ...]  # wall clock between consecutive tokens
    prefill_tokens: int
    crops: int  # 0 without an image


def percentiles(values: list[float] | tuple[float, ...]) -> dict[str, float]:
    arr = np.asarray(values, np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(arr.mean()), "min_ms": float(arr.min()), "max_ms": float(arr.max())}


def time_generation(pipe: MolmoPipeline, inputs: BenchInputs, new_tokens: int) -> GenerationSample:
    """Greedy generation of exactly `new_tokens` tokens (EOS does not stop it)."""
    timings = Timings()
    start = time.perf_counter()
    batch = inputs.batch(pipe.processor)
    timings.preprocess_ms = (time.perf_counter() - start) * 1000.0
    sampler = Sampler(SamplingParams())  # greedy: argmax over the vocabulary
    token_ms: list[float] = []
    first = last = 0.0
    for i, _ in enumerate(pipe.token_steps(batch, new_tokens, sampler, timings)):
        now = time.perf_counter()
        if i == 0:
            first = now
        else:
            token_ms.append((now - last) * 1000.0)
        last = now
    stages = {"preprocess": timings.preprocess_ms, "vision": timings.vision_ms,
              "connector": timings.connector_ms, "prefill": timings.prefill_ms}
    crops = int(batch["images"].shape[1]) if batch.get("images") is not None else 0
    return GenerationSample(stages, (first - start) * 1000.0, tuple(token_ms),
                            timings.prompt_tokens, crops)


def decode_steps_at_context(pipe: MolmoPipeline, context: int, steps: int, warmup: int,
                            rng: np.random.Generator,
                            after_step: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of `steps` single-token backend.decode calls after a `context` prefill.
    `after_step` (a bandwidth probe) runs after each timed step, and then each step starts with
    the process idle (molmo_bench/idle.py)."""
    backend = pipe.backend
    high = text_id_bound(pipe.manifest.special_tokens)
    backend.start(1)
    prompt = rng.integers(0, high, (1, context))
    backend.decode(pipe.embeddings(prompt), np.ones((1, context), np.int64),
                   np.arange(context, dtype=np.int64)[None])
    mask = np.ones((1, context + warmup + steps), np.int64)
    times = []
    for i in range(warmup + steps):
        total = context + i + 1
        embeds = pipe.embeddings(rng.integers(0, high, (1, 1)))  # [1, 1, D]
        position = np.array([[total - 1]], np.int64)
        if after_step is not None:
            settle()
        start = time.perf_counter()
        backend.decode(embeds, mask[:, :total], position)
        elapsed = (time.perf_counter() - start) * 1000.0
        if i >= warmup:
            times.append(elapsed)
            if after_step is not None:
                after_step()
    return times


Step = tuple[str, int]  # ("warmup", i) | ("run", i) | ("context", length)


def plan(settings: BenchSettings) -> list[Step]:
    """The measurement steps of one stack, in order. Two stacks can run them interleaved, step
    by step, so that both see the same machine load."""
    return ([("warmup", i) for i in range(settings.warmup)]
            + [("run", i) for i in range(settings.runs)]
            + [("context", c) for c in settings.contexts])


class StackBench:
    """Every measurement of one stack (runtime backend or torch reference), one step at a time."""

    def __init__(self, name: str, pipe: MolmoPipeline, inputs: BenchInputs,
                 settings: BenchSettings, log: Any = print) -> None:
        self.name, self.pipe, self.inputs, self.settings, self.log = (name, pipe, inputs,
                                                                      settings, log)
        self.samples: list[GenerationSample] = []
        self.by_context: dict[str, dict[str, float]] = {}
        self.rng = np.random.default_rng(settings.seed)
        self.gpu_peak: float | None = gpu_memory_used_mb()

    def step(self, kind: str, index: int) -> None:
        st = self.settings
        if kind == "warmup":
            self.log(f"[{self.name}] warm-up {index + 1}/{st.warmup}")
            time_generation(self.pipe, self.inputs, st.new_tokens)
        elif kind == "run":
            sample = time_generation(self.pipe, self.inputs, st.new_tokens)
            self.samples.append(sample)
            self.log(f"[{self.name}] run {index + 1}/{st.runs}: TTFT {sample.ttft_ms:.1f} ms, "
                     f"decode {1000.0 * len(sample.token_ms) / sum(sample.token_ms):.2f} tok/s")
        elif kind == "context":
            times = decode_steps_at_context(self.pipe, index, st.context_steps,
                                            max(1, st.warmup), self.rng)
            self.by_context[str(index)] = percentiles(times)
            self.log(f"[{self.name}] decode step at context {index}: "
                     f"{self.by_context[str(index)]['p50_ms']:.2f} ms (median)")
        else:
            raise ValueError(f"unknown step {kind!r}")
        self.gpu_peak = _max_or_none(self.gpu_peak, gpu_memory_used_mb())

    def result(self) -> dict[str, Any]:
        return summarize(self.samples, self.by_context, peak_rss_mb(), self.gpu_peak)


def _max_or_none(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def summarize(samples: list[GenerationSample], by_context: dict[str, dict[str, float]],
              rss_mb: float, gpu_mb: float | None) -> dict[str, Any]:
    """Medians over runs for TTFT; all decode tokens of all runs pooled for percentiles."""
    ttft = {stage: float(np.median([s.stages_ms[stage] for s in samples])) for stage in STAGES}
    ttft["total"] = float(np.median([s.ttft_ms for s in samples]))
    tokens = [t for s in samples for t in s.token_ms]
    stats = percentiles(tokens)
    decode = {"tokens_per_s": 1000.0 * len(tokens) / sum(tokens), "tokens": len(tokens),
              # 1000 / median latency: robust to stalls on a busy machine (tokens_per_s is not)
              "tokens_per_s_p50": 1000.0 / stats["p50_ms"], **stats}
    contexts = [int(c) for c in by_context]
    growth = (by_context[str(max(contexts))]["p50_ms"] / by_context[str(min(contexts))]["p50_ms"]
              if len(contexts) > 1 else 1.0)
    return {
        "ttft_ms": ttft,
        "ttft_runs_ms": [{**s.stages_ms, "total": s.ttft_ms} for s in samples],
        "prefill_tokens": samples[0].prefill_tokens,
        "crops": samples[0].crops,
        "decode": decode,
        "decode_runs_tokens_per_s": [1000.0 * len(s.token_ms) / sum(s.token_ms) for s in samples],
        "decode_step_ms_by_context": {c: v["p50_ms"] for c, v in by_context.items()},
        "decode_step_by_context": by_context,
        "context_growth": growth,  # decode step at the longest / at the shortest context
        "peak_rss_mb": rss_mb,
        "gpu_memory_mb": gpu_mb,
    }
