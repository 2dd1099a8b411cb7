"""The task part of the quality gates: a quantized artifact's shapes-task accuracy next to fp32's.

For a model trained on the shapes task (SHAPES_MODELS, e.g. the `demo` preset) quantization
answers the held-out questions with the fp32 artifact and with the quantized graphs (the QDQ
graphs of trt-int8-qdq run in ONNX Runtime), on the same questions, and the gate compares them
per task (recipes.TASK_MAX_DROP says by how much each target may fall behind fp32). Where task
accuracy is measured, it decides the decoder gate instead of top-1 agreement, which on a flat
distribution counts near-ties (see Thresholds.failures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmo_calibration.shapes.evaluate import TASKS, TaskScores, evaluate_pipeline
from molmo_runtime.manifest import Manifest

# Models (manifest model.name) trained on the shapes task: quantizing them measures the task.
SHAPES_MODELS = ("demo",)
DEFAULT_QUESTIONS = 600


def manifest_over(directory: Path, raw: dict[str, Any]) -> Manifest:
    """A Manifest for a folder that is not a committed artifact (a staging folder, a scratch
    folder of converted graphs): `raw` with every file under `directory` listed and hashed."""
    from molmo_runtime.manifest import MANIFEST_NAME, file_record

    files = sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*")
                   if p.is_file() and p.name != MANIFEST_NAME)
    return Manifest(Path(directory), {**raw, "files": {f: file_record(directory, f)
                                                       for f in files}})


def is_shapes_model(manifest: Manifest) -> bool:
    return str(manifest.raw.get("model", {}).get("name")) in SHAPES_MODELS


@dataclass(frozen=True)
class TaskComparison:
    """Held-out task accuracy of fp32 and of the quantized artifact, and the allowed drop."""

    fp32: dict[str, Any]  # TaskScores.to_dict()
    quantized: dict[str, Any]
    max_drop: float  # accuracy (fraction) a task may lose against fp32

    def drops(self) -> dict[str, float]:
        """fp32 minus quantized accuracy per task, and for the well-formed fraction."""
        out = {t: self.fp32["tasks"][t] - self.quantized["tasks"][t] for t in TASKS}
        out["well_formed"] = self.fp32["well_formed"] - self.quantized["well_formed"]
        return out

    def failures(self) -> list[str]:
        # (rounded: the scores are stored to 4 decimals; a drop of exactly max_drop passes)
        return [f"{task} {self.quantized['tasks'].get(task, self.quantized.get(task)):.1%} is "
                f"{drop:.1%} below fp32 (allowed {self.max_drop:.0%})"
                for task, drop in self.drops().items() if round(drop, 4) > self.max_drop]

    def to_markdown(self) -> str:
        q, f = self.quantized, self.fp32
        lines = [f"Shapes task, {q['questions']} held-out questions (seed {q['heldout_seed']}); "
                 f"gate: each task within {self.max_drop:.0%} of fp32.", "",
                 "| task | fp32 | quantized | drop |", "|---|---:|---:|---:|"]
        drops = self.drops()
        for t in TASKS:
            lines.append(f"| {t} | {f['tasks'][t]:.1%} | {q['tasks'][t]:.1%} | "
                         f"{drops[t]:+.1%} |")
        lines.append(f"| well formed | {f['well_formed']:.1%} | {q['well_formed']:.1%} | "
                     f"{drops['well_formed']:+.1%} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"fp32": self.fp32, "quantized": self.quantized, "max_drop": self.max_drop,
                "drops": {k: round(v, 4) for k, v in self.drops().items()}}


# fp32 scores by (artifact folder, its manifest's creation time, questions): quantizing one
# artifact for several targets in one process answers the fp32 questions once.
_FP32_SCORES: dict[tuple[str, str, int], TaskScores] = {}


def fp32_scores(fp32_dir: Path, questions: int, threads: int | None = None) -> TaskScores:
    """The fp32 artifact's held-out scores (ONNX Runtime), computed once per process."""
    from molmo_runtime.pipeline import MolmoPipeline

    pipe = MolmoPipeline.from_dir(fp32_dir, backend="ort", threads=threads, verify="none")
    key = (str(Path(fp32_dir).resolve()), str(pipe.manifest.raw.get("created_utc")), questions)
    if key not in _FP32_SCORES:
        _FP32_SCORES[key] = evaluate_pipeline(pipe, questions)
    return _FP32_SCORES[key]


def compare_task(fp32_dir: Path, quantized: Manifest, max_drop: float, questions: int,
                 threads: int | None = None) -> TaskComparison:
    """Answer the held-out questions with the fp32 artifact and with `quantized` (a manifest
    over a folder that need not be committed yet), both in ONNX Runtime."""
    from molmo_runtime.backends.ort import OrtBackend
    from molmo_runtime.pipeline import MolmoPipeline
    from molmo_runtime.processing import MolmoProcessor

    ref = fp32_scores(fp32_dir, questions, threads)
    pipe = MolmoPipeline(quantized, OrtBackend(quantized, threads=threads),
                         MolmoProcessor.from_pretrained(quantized.directory))
    got = evaluate_pipeline(pipe, questions)
    return TaskComparison(ref.to_dict(), got.to_dict(), max_drop)


__all__ = ["DEFAULT_QUESTIONS", "SHAPES_MODELS", "TaskComparison", "TaskScores", "compare_task",
           "fp32_scores", "is_shapes_model", "manifest_over"]
