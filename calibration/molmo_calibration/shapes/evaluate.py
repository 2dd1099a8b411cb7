"""Task accuracy of an exported artifact on the shapes held-out set (torch-free, any backend).

    scores = evaluate_artifact("out/demo", questions=600)
    scores.accuracy("point"), scores.well_formed, scores.to_markdown()

Every question is answered greedily by the artifact's own pipeline (processor, backend, sampler)
from the rendered image and the prompt, in batches of 32 (as `generate_from_inputs` batches
them), and scored by molmo_calibration.shapes.score.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from molmo_calibration.shapes.score import score
from molmo_calibration.shapes.task import HELDOUT_SEED, QUESTION_KINDS, heldout_set, render

# Longest answer of the task ("Point to all" with 4 shapes) is ~100 byte tokens.
MAX_NEW_TOKENS = 120
BATCH = 32  # questions decoded together
# The accuracies the task's goals and gates are stated on (description is reported only).
SCORED_KINDS = ("point", "point_all", "count", "color")
# pointing accuracy pools the single and the "all" questions
TASKS = {"pointing": ("point", "point_all"), "counting": ("count",), "colour": ("color",)}


@dataclass
class TaskScores:
    """Per question kind: answered, well formed, correct."""

    seed: int
    counts: dict[str, list[int]] = field(default_factory=dict)  # kind -> [n, formed, correct]
    seconds: float = 0.0

    def add(self, kind: str, well_formed: bool, correct: bool) -> None:
        c = self.counts.setdefault(kind, [0, 0, 0])
        c[0] += 1
        c[1] += int(well_formed)
        c[2] += int(correct)

    def _pooled(self, kinds: tuple[str, ...], col: int) -> float:
        n = sum(self.counts.get(k, [0, 0, 0])[0] for k in kinds)
        return sum(self.counts.get(k, [0, 0, 0])[col] for k in kinds) / n if n else float("nan")

    def accuracy(self, task: str) -> float:
        """Fraction correct of a task ("pointing", "counting", "colour") or a question kind."""
        return self._pooled(TASKS.get(task, (task,)), 2)

    @property
    def questions(self) -> int:
        return sum(c[0] for c in self.counts.values())

    @property
    def well_formed(self) -> float:
        return self._pooled(tuple(self.counts), 1)

    def to_dict(self) -> dict[str, Any]:
        return {"heldout_seed": self.seed, "questions": self.questions,
                "well_formed": round(self.well_formed, 4),
                "tasks": {t: round(self.accuracy(t), 4) for t in TASKS},
                "kinds": {k: {"n": n, "well_formed": round(f / n, 4), "correct": round(c / n, 4)}
                          for k, (n, f, c) in sorted(self.counts.items())},
                "seconds": round(self.seconds, 1)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskScores:
        out = cls(int(d["heldout_seed"]), seconds=float(d.get("seconds", 0.0)))
        for k, v in d["kinds"].items():
            n = int(v["n"])
            out.counts[k] = [n, round(v["well_formed"] * n), round(v["correct"] * n)]
        return out

    def to_markdown(self, title: str = "") -> str:
        lines = [f"| {title or 'task'} | questions | correct | well formed |",
                 "|---|---:|---:|---:|"]
        for t, kinds in TASKS.items():
            n = sum(self.counts.get(k, [0])[0] for k in kinds)
            lines.append(f"| {t} | {n} | {self.accuracy(t):.1%} | {self._pooled(kinds, 1):.1%} |")
        for k in sorted(self.counts):
            if k not in SCORED_KINDS:
                n = self.counts[k][0]
                lines.append(f"| {k} (reported only) | {n} | {self.accuracy(k):.1%} | "
                             f"{self._pooled((k,), 1):.1%} |")
        lines.append(f"| all | {self.questions} | | {self.well_formed:.1%} |")
        return "\n".join(lines)


def _padded(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Processor outputs -> one batch: ids right-padded with -1 (as the official processor
    batches them), crops padded with all -1 pixels (the vision graph zeroes such crops) whose
    image tokens are dropped (image_input_idx -100)."""
    t = max(len(r["input_ids"]) for r in rows)
    c = max(len(r["images"]) for r in rows)
    _, patches, pdim = rows[0]["images"].shape
    tokens = rows[0]["image_input_idx"].shape[1]
    out = {"input_ids": np.full((len(rows), t), -1, np.int64),
           "images": np.full((len(rows), c, patches, pdim), -1.0, np.float32),
           "image_masks": np.full((len(rows), c, patches), -1.0, np.float32),
           "image_input_idx": np.full((len(rows), c, tokens), -100, np.int32)}
    for i, r in enumerate(rows):
        out["input_ids"][i, :len(r["input_ids"])] = r["input_ids"]
        for key in ("images", "image_masks", "image_input_idx"):
            out[key][i, :len(r[key])] = r[key]
    return out


def evaluate_pipeline(pipe: Any, questions: int = 600, seed: int = HELDOUT_SEED,
                      progress: Any = None, batch_size: int = BATCH) -> TaskScores:
    """Score an open MolmoPipeline on the first `questions` of the held-out set of `seed`:
    greedy answers, `batch_size` questions decoded together (MolmoPipeline.generate_from_inputs
    with the processor's arrays, padded as the official batching does)."""
    scores = TaskScores(seed)
    start = time.perf_counter()
    items = heldout_set(questions, seed)
    for first in range(0, len(items), batch_size):
        chunk = items[first:first + batch_size]
        rendered = [render(scene) for scene, _ in chunk]
        rows = [pipe.processor(images=image, text=q.prompt)
                for (image, _), (_, q) in zip(rendered, chunk)]
        new = pipe.generate_from_inputs(**_padded(rows), max_new_tokens=MAX_NEW_TOKENS)
        for (scene, q), (_, labels), ids in zip(chunk, rendered, new):
            ids = list(ids)
            if pipe.eos_id in ids:
                ids = ids[:ids.index(pipe.eos_id)]
            scores.add(q.kind, *score(q, scene, labels, pipe.processor.decode(ids)))
        if progress is not None:
            progress(first + len(chunk), questions)
    scores.seconds = time.perf_counter() - start
    return scores


def evaluate_artifact(artifact: str | os.PathLike[str], questions: int = 600,
                      seed: int = HELDOUT_SEED, backend: str = "auto",
                      threads: int | None = None, progress: Any = None) -> TaskScores:
    """Open the artifact with molmo_runtime's pipeline and score it (see evaluate_pipeline)."""
    from molmo_runtime.pipeline import MolmoPipeline

    pipe = MolmoPipeline.from_dir(artifact, backend=backend,  # type: ignore[arg-type]
                                  threads=threads)
    return evaluate_pipeline(pipe, questions, seed, progress)


__all__ = ["QUESTION_KINDS", "SCORED_KINDS", "TASKS", "TaskScores", "evaluate_artifact",
           "evaluate_pipeline"]
