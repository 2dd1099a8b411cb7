"""The quality report: how far a quantized artifact is from its fp32 source, stage by stage.

Measured on the held-out samples of the calibration set, running the whole quantized chain
(each quantized stage is fed the previous quantized stage's output, as a user would run it):

    vision_features   cosine / max abs of the vision encoder output        [crops, 576, F]
    image_tokens      cosine / max abs of the connector output             [crops, 144, D]
    prefill_logits    cosine / max abs of the prefill logits               [vocab]
    decoder           top-1 agreement and KL(fp32 || quantized) over the prefill and N
                      teacher-forced decode steps (the quantized decoder is fed the fp32 greedy
                      tokens, so every position compares like with like); greedy agreement: share
                      of the fp32 greedy tokens that the quantized model's own greedy decode
                      reproduces before it first differs, and the share of samples identical
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from molmo_calibration import metrics
from molmo_calibration.evaluate import Trace
from molmo_calibration.shapes.gate import TaskComparison
from molmo_runtime.errors import MolmoError

STAGES = ("vision_features", "image_tokens", "prefill_logits")


class QualityError(MolmoError):
    """A quantized artifact is further from fp32 than the thresholds allow."""

    def __init__(self, message: str, report: QualityReport) -> None:
        super().__init__(message)
        self.report = report


class QualityWarning(UserWarning):
    """Issued instead of QualityError when the caller allowed a degraded artifact."""


@dataclass(frozen=True)
class Thresholds:
    vision_cosine: float = 0.99  # worst held-out sample's vision-feature cosine
    decoder_top1: float = 0.97  # top-1 agreement over prefill + teacher-forced steps

    def failures(self, stages: dict[str, StageStats], decoder: DecoderStats,
                 task: TaskComparison | None = None) -> list[str]:
        """Where the task was measured it decides the decoder's gate: what the model answers,
        not whether near-ties in its logits fall the same way."""
        out = []
        vision = stages.get("vision_features")
        if vision is not None and vision.cosine_min < self.vision_cosine:
            out.append(f"vision-feature cosine {vision.cosine_min:.4f} < {self.vision_cosine}")
        if task is not None:
            out += task.failures()
        elif decoder.top1 < self.decoder_top1:
            out.append(f"decoder top-1 agreement {decoder.top1:.2%} < {self.decoder_top1:.0%}")
        return out


@dataclass(frozen=True)
class StageStats:
    cosine_min: float  # worst sample
    cosine_mean: float
    max_abs: float  # over every sample and element
    ref_max_abs: float  # scale of the fp32 tensor, to read max_abs against

    @classmethod
    def of(cls, pairs: list[tuple[np.ndarray, np.ndarray]]) -> StageStats:
        cos = [metrics.cosine(r, t) for r, t in pairs]
        return cls(float(min(cos)), float(np.mean(cos)),
                   max(metrics.max_abs(r, t) for r, t in pairs),
                   max(float(np.max(np.abs(r))) for r, _ in pairs))


@dataclass(frozen=True)
class DecoderStats:
    samples: int
    positions: int  # compared logit rows (prefill + teacher-forced steps)
    prefill_top1: float
    top1: float
    kl_mean: float  # nats
    kl_max: float
    greedy_prefix: float
    greedy_exact: float
    # Where top-1 flips, how close fp32's own top-2 was: flips only at near-ties (gap below the
    # typical logit error) are rounding noise on a flat distribution (random weights), not damage.
    flip_gap_max: float  # largest fp32 top-1/top-2 logit gap among disagreeing positions
    logit_err_median: float  # median over positions of max |logit_fp32 - logit_quantized|


@dataclass(frozen=True)
class SampleResult:
    name: str
    vision_cosine: float | None
    prefill_top1: bool
    top1: float
    kl_mean: float
    greedy_prefix: float


def compare(ref: list[Trace], forced: list[Trace], free: list[Trace],
            names: list[str]) -> tuple[dict[str, StageStats], DecoderStats, list[SampleResult]]:
    """fp32 traces vs the quantized model's teacher-forced and free-running traces."""
    stages: dict[str, StageStats] = {}
    vision = [(r.features, f.features) for r, f in zip(ref, forced) if r.features is not None]
    tokens = [(r.image_tokens, f.image_tokens) for r, f in zip(ref, forced)
              if r.image_tokens is not None]
    if vision:
        stages["vision_features"] = StageStats.of(vision)  # type: ignore[arg-type]
        stages["image_tokens"] = StageStats.of(tokens)  # type: ignore[arg-type]
    stages["prefill_logits"] = StageStats.of([(r.step_logits[0], f.step_logits[0])
                                              for r, f in zip(ref, forced)])
    ref_rows = np.concatenate([r.step_logits for r in ref])  # [positions, vocab]
    forced_rows = np.concatenate([f.step_logits for f in forced])
    kl = metrics.kl_divergence(ref_rows, forced_rows)
    agree = metrics.top1_agreement(ref_rows, forced_rows)
    top2 = np.sort(ref_rows, axis=-1)[:, -2:]
    gaps = top2[:, 1] - top2[:, 0]  # [positions]
    prefix = [metrics.common_prefix_fraction(r.token_ids, g.token_ids) for r, g in zip(ref, free)]
    decoder = DecoderStats(
        samples=len(ref), positions=int(ref_rows.shape[0]),
        prefill_top1=float(np.mean([metrics.top1_agreement(r.step_logits[0], f.step_logits[0])
                                    for r, f in zip(ref, forced)])),
        top1=float(agree.mean()),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()),
        greedy_prefix=float(np.mean(prefix)),
        greedy_exact=float(np.mean([p == 1.0 for p in prefix])),
        flip_gap_max=float(gaps[agree == 0].max()) if (agree == 0).any() else 0.0,
        logit_err_median=float(np.median(np.abs(ref_rows - forced_rows).max(axis=-1))))
    per_sample = [SampleResult(
        name=n,
        vision_cosine=None if r.features is None or f.features is None
        else metrics.cosine(r.features, f.features),
        prefill_top1=bool(metrics.top1_agreement(r.step_logits[0], f.step_logits[0])),
        top1=float(metrics.top1_agreement(r.step_logits, f.step_logits).mean()),
        kl_mean=float(metrics.kl_divergence(r.step_logits, f.step_logits).mean()),
        greedy_prefix=p) for n, r, f, p in zip(names, ref, forced, prefix)]
    return stages, decoder, per_sample


@dataclass(frozen=True)
class QualityReport:
    target: str
    methods: dict[str, str]  # graph -> method used
    calibration: dict[str, Any]  # set, set_sha256, samples
    new_tokens: int
    stages: dict[str, StageStats]
    decoder: DecoderStats
    thresholds: Thresholds
    failures: list[str]
    samples: list[SampleResult] = field(default_factory=list)
    # decoder method -> its DecoderStats, where several were measured to choose one
    candidates: dict[str, DecoderStats] = field(default_factory=dict)
    task: TaskComparison | None = None  # shapes-task accuracy, for models trained on it
    reference: str | None = None  # what stood in for the fp32 graphs (None: the graphs)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "methods": self.methods, "calibration": self.calibration,
                "new_tokens": self.new_tokens, "passed": self.passed, "failures": self.failures,
                "thresholds": asdict(self.thresholds),
                "stages": {k: asdict(v) for k, v in self.stages.items()},
                "decoder": asdict(self.decoder),
                "candidates": {k: asdict(v) for k, v in self.candidates.items()},
                "samples": [asdict(s) for s in self.samples],
                "task": None if self.task is None else self.task.to_dict(),
                **({"reference": self.reference} if self.reference else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def summary(self) -> dict[str, Any]:
        """The few numbers the artifact's manifest carries."""
        vision = self.stages.get("vision_features")
        return {"passed": self.passed,
                "vision_cosine_min": None if vision is None else round(vision.cosine_min, 6),
                "decoder_top1": round(self.decoder.top1, 6),
                "prefill_top1": round(self.decoder.prefill_top1, 6),
                "kl_mean": round(self.decoder.kl_mean, 8),
                "greedy_prefix": round(self.decoder.greedy_prefix, 6),
                "heldout_samples": self.decoder.samples,
                "task": None if self.task is None else {
                    "fp32": self.task.fp32["tasks"], "quantized": self.task.quantized["tasks"],
                    "questions": self.task.quantized["questions"],
                    "max_drop": self.task.max_drop},
                "report": "quality_report.json"}

    def to_markdown(self) -> str:
        d, t = self.decoder, self.thresholds
        lines = [f"## Quantization quality: {self.target} vs fp32", "",
                 f"Calibration set `{self.calibration.get('set')}` "
                 f"(sha256 {str(self.calibration.get('set_sha256', ''))[:12]}…, "
                 f"{self.calibration.get('samples')} calibration samples); measured on "
                 f"{d.samples} held-out samples, {self.new_tokens} new tokens each.", "",
                 *([f"fp32 reference: {self.reference} (on the tokens the quantized model "
                    "generated; its greedy prefix is exact up to the first difference).", ""]
                   if self.reference else []),
                 "| graph | method |", "|---|---|",
                 *(f"| {g} | {m} |" for g, m in self.methods.items()), "",
                 "| stage | cosine (worst) | cosine (mean) | max abs | fp32 max abs |",
                 "|---|---:|---:|---:|---:|",
                 *(f"| {name} | {s.cosine_min:.5f} | {s.cosine_mean:.5f} | {s.max_abs:.4g} | "
                   f"{s.ref_max_abs:.4g} |" for name, s in self.stages.items())]
        if "vision_features" in self.stages:
            lines += ["", f"Threshold: vision-feature cosine (worst sample) ≥ {t.vision_cosine}."]
        lines += ["", "| decoder | value | threshold |", "|---|---:|---:|",
                  f"| top-1 agreement, prefill + teacher-forced ({d.positions} positions) | "
                  f"{d.top1:.2%} | ≥ {t.decoder_top1:.0%} |",
                  f"| top-1 agreement, prefill only | {d.prefill_top1:.2%} | |",
                  f"| KL(fp32 ‖ quantized), mean / max (nats) | {d.kl_mean:.3g} / "
                  f"{d.kl_max:.3g} | |",
                  f"| greedy tokens reproduced before first difference | {d.greedy_prefix:.2%} "
                  "| |",
                  f"| greedy sequences identical | {d.greedy_exact:.2%} | |",
                  f"| largest fp32 top-1/top-2 logit gap where top-1 differs | "
                  f"{d.flip_gap_max:.3g} | |",
                  f"| median of max \\|Δlogit\\| per position | {d.logit_err_median:.3g} | |"]
        if self.candidates:
            lines += ["", "Decoder candidates measured (the first that meets the thresholds "
                      "is used):", "", "| decoder method | top-1 | KL mean | greedy prefix |",
                      "|---|---:|---:|---:|",
                      *(f"| {m} | {c.top1:.2%} | {c.kl_mean:.3g} | {c.greedy_prefix:.2%} |"
                        for m, c in self.candidates.items())]
        if self.task is not None:
            lines += ["", self.task.to_markdown(), "",
                      "The task decides the decoder gate; top-1 agreement is reported only."]
        lines += ["", "**PASSED**" if self.passed else
                  "**BELOW THRESHOLDS:** " + "; ".join(self.failures), ""]
        return "\n".join(lines)
