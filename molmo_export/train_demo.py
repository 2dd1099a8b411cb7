"""Train the `demo` preset from scratch on the shapes task (CPU, seeded, answer-only loss).

    python -m molmo_export.train_demo --out runs/demo --minutes 60
        runs/demo/log.jsonl            one JSON line per logged step / evaluation
        runs/demo/step-NNNNNN.safetensors, last.safetensors   official names, float32

The model is the reference MolmoForConditionalGeneration built from the `demo` config; it starts
from the random weights molmo_export.demo draws for that config from --seed (written as an
official checkpoint and loaded back, so the trained file has exactly the official layout).
Inputs come from the runtime's own processor (molmo_runtime.processing), so the model is trained
on exactly what the exported artifact will feed it. A curriculum (CURRICULUM) first asks only
colours of lone shapes (the one question the image answers at once, so the decoder learns to read
the image tokens before it can settle on answers that ignore them), then every kind on one shape,
then on 1-2 and finally 1-4 shapes. The loss is cross-entropy over the answer tokens (and the
closing EOS) only, averaged per question (a one-word colour weighs as much as a 50-token point);
the LM head runs only at those positions. Training draws scenes from seeds that never equal the
held-out set's (HELDOUT_SEED).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molmo_calibration.shapes.task import (
    HELDOUT_SEED,
    Question,
    Scene,
    heldout_set,
    make_scene,
    render,
    sample_question,
)
from molmo_export.config import get_preset
from molmo_export.model import MolmoForConditionalGeneration

TRAIN_MIX = {"point": 0.35, "point_all": 0.15, "count": 0.22, "color": 0.22, "describe": 0.06}
IGNORE = -100

# (fraction of the run's steps, most shapes a scene holds, question mix), in order. Without the
# first phase the decoder fits the answers' wording, stops reading the image and never starts
# again (two runs on every kind from step 0 answered the same with and without the picture).
CURRICULUM: tuple[tuple[float, int, dict[str, float]], ...] = (
    (0.03, 1, {"color": 1.0}),
    (0.20, 1, TRAIN_MIX),
    (0.25, 2, TRAIN_MIX),
    (0.52, 4, TRAIN_MIX),
)


def phase_at(step: int, total: int) -> tuple[int, dict[str, float]]:
    """(max shapes, question mix) of `step` in a run of `total` steps."""
    end = 0.0
    for fraction, max_shapes, mix in CURRICULUM:
        end += fraction
        if step < end * total:
            return max_shapes, mix
    return CURRICULUM[-1][1], CURRICULUM[-1][2]


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    batch_scenes: int = 8  # scenes per step
    questions_per_scene: int = 3  # the vision tower runs once per scene
    lr_text: float = 3e-3
    lr_vision: float = 2e-3  # vision tower + connector (5e-3 blew the image tokens up)
    projector_scale: float = 0.1  # see build_model
    warmup: int = 100
    weight_decay: float = 0.01
    threads: int = 1  # on a shared 2-core machine 2 OpenMP threads were 4-8x slower


def build_model(seed: int, directory: Path, scale: float = TrainSettings.projector_scale
                ) -> tuple[MolmoForConditionalGeneration, Any]:
    """The demo config with the preset's seeded random init (written to `directory` as an
    official checkpoint and loaded back), and its processor."""
    from molmo_export.demo import write_checkpoint
    from molmo_runtime.processing import MolmoProcessor

    write_checkpoint(get_preset("demo"), directory, seed=seed)
    model = MolmoForConditionalGeneration.from_pretrained(directory)
    # The random presets' projector init makes image tokens ~15x larger than the token
    # embeddings they are added to (std ~7 vs 0.5); in a trial run they then grew to ~3000 and
    # the decoder learnt to ignore the image. Scaled down, they start at the embeddings' scale.
    with torch.no_grad():
        model.connector.projector.down.weight.mul_(scale)
    model.requires_grad_(True).train()
    return model, MolmoProcessor.from_pretrained(directory)


class Batcher:
    """Random scenes and questions -> padded model inputs with answer-only labels."""

    def __init__(self, processor: Any, seed: int) -> None:
        if seed == HELDOUT_SEED:
            raise ValueError("the training seed must differ from the held-out set's")
        self.processor = processor
        self.rng = np.random.default_rng([seed, 1])
        self.eos = processor.special_tokens.eos

    def sample(self, max_shapes: int) -> tuple[Scene, np.ndarray]:
        scene = make_scene(self.rng, max_shapes=max_shapes)
        return scene, render(scene)[0]

    def encode(self, image: np.ndarray, question: Question) -> dict[str, np.ndarray]:
        inputs = self.processor(images=image, text=question.prompt)
        answer = self.processor.tokenizer.encode(" " + question.answer) + [self.eos]
        prompt = inputs["input_ids"]
        inputs["input_ids"] = np.concatenate([prompt, np.asarray(answer, np.int64)])
        labels = np.full(len(inputs["input_ids"]), IGNORE, np.int64)
        # position t predicts token t + 1: the answer's tokens are predicted from the
        # position before each of them
        labels[len(prompt) - 1:-1] = answer
        inputs["labels"] = labels
        return inputs

    def batch(self, scenes: int, per_scene: int, max_shapes: int,
              mix: dict[str, float] = TRAIN_MIX) -> dict[str, torch.Tensor]:
        rows = []
        for k in range(scenes):
            scene, image = self.sample(max_shapes)
            for _ in range(per_scene):
                row = self.encode(image, sample_question(scene, self.rng, mix))
                rows.append({**row, "scene": k})
        return collate(rows, pad_id=self.eos)


class BatchStream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The batches of a run, made in a DataLoader worker process (rendering and preprocessing
    overlap the training step). Deterministic: one worker, seeded from the run's seed."""

    def __init__(self, checkpoint: Path, s: TrainSettings, steps: int) -> None:
        self.checkpoint, self.s, self.steps = checkpoint, s, steps

    def __iter__(self) -> Any:
        from molmo_runtime.processing import MolmoProcessor

        batcher = Batcher(MolmoProcessor.from_pretrained(self.checkpoint), self.s.seed)
        for step in range(self.steps):
            max_shapes, mix = phase_at(step, self.steps)
            yield batcher.batch(self.s.batch_scenes, self.s.questions_per_scene, max_shapes, mix)


def collate(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences (pad_id: causal attention never looks ahead, labels ignore it)
    and the crops packed along one axis: each distinct image once (rows asking about the same
    scene share it; a row's "scene" key says which), no padding crops. `crop_of` maps every
    row's crop to its packed crop, `flat_idx` each of its image tokens to an index into the
    flattened [B*T] sequence (-1: dropped)."""
    t = max(len(r["input_ids"]) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int64)
    labels = np.full((len(rows), t), IGNORE, np.int64)
    first: dict[Any, int] = {}  # scene key -> offset of its crops in the packed arrays
    images, masks, crop_of, flat = [], [], [], []
    packed = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = r["input_ids"]
        labels[i, :n] = r["labels"]
        key = r.get("scene", i)
        if key not in first:
            first[key] = packed
            images.append(r["images"])
            masks.append(r["image_masks"])
            packed += len(r["images"])
        crop_of.append(np.arange(len(r["images"])) + first[key])
        idx = r["image_input_idx"].astype(np.int64)
        flat.append(np.where(idx >= 0, idx + i * t, -1))
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "images": torch.from_numpy(np.concatenate(images)),
            "image_masks": torch.from_numpy(np.concatenate(masks)),
            "crop_of": torch.from_numpy(np.concatenate(crop_of)),
            "flat_idx": torch.from_numpy(np.concatenate(flat))}


def answer_logits(model: MolmoForConditionalGeneration, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the answer positions only. The model's own modules in the model's
    order (vision tower, connector, image tokens ADDED to the token embeddings, decoder), with
    the crops packed (MolmoForConditionalGeneration.embed_inputs, minus padding crops)."""
    ids = batch["input_ids"]
    b, t = ids.shape
    embeds = model.language_model.model.embed(ids)
    d = embeds.shape[-1]
    features = model.vision(batch["images"])
    tokens = model.connector(features, batch["image_masks"])  # [crops, tokens, D]
    tokens = tokens[batch["crop_of"]]  # [crops of all rows, tokens, D]
    idx = batch["flat_idx"].reshape(-1)
    keep_tok = idx >= 0
    embeds = embeds.reshape(b * t, d).index_add(0, idx[keep_tok],
                                                tokens.reshape(-1, d)[keep_tok])
    positions = torch.arange(t).expand(b, t)
    hidden, _ = model.language_model.model(embeds.reshape(b, t, d), positions,
                                           torch.ones_like(ids))
    keep = batch["labels"] != IGNORE
    return model.language_model.lm_head(hidden[keep]).float(), batch["labels"][keep]


def answer_loss(model: MolmoForConditionalGeneration, batch: dict[str, torch.Tensor]
                ) -> torch.Tensor:
    """Cross-entropy over each question's answer tokens, averaged per question, then over the
    questions: a token-mean would let a pointing answer's ~50 predictable tokens outweigh the
    few that depend on the image."""
    logits, targets = answer_logits(model, batch)
    row = (batch["labels"] != IGNORE).nonzero()[:, 0]  # the question of each answer token
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    tokens = torch.bincount(row, minlength=len(batch["labels"])).clamp(min=1).float()
    return (per_token / tokens[row]).sum() / len(batch["labels"])


class Probe:
    """A fixed held-out batch (scenes from a seed training never uses) scored teacher-forced:
    loss; per question kind the fraction of answers whose every token is the argmax (what greedy
    decoding would reproduce exactly); and the task score (molmo_calibration.shapes.score) of
    the argmax answer, e.g. whether its point falls on the shape: a cheap stand-in for greedy
    decoding (one forward pass, no generation), close to it once the format is learnt."""

    def __init__(self, processor: Any, n: int) -> None:
        batcher = Batcher(processor, HELDOUT_SEED + 1)
        self.tokenizer, self.eos = processor.tokenizer, batcher.eos
        rows, self.items = [], []
        for scene, q in heldout_set(n, seed=HELDOUT_SEED + 1):
            image, labels = render(scene)
            rows.append(batcher.encode(image, q))
            self.items.append((scene, q, labels))
        self.batch = collate(rows, pad_id=batcher.eos)

    @torch.no_grad()
    def __call__(self, model: MolmoForConditionalGeneration) -> dict[str, Any]:
        from molmo_calibration.shapes.score import score

        logits, targets = answer_logits(model, self.batch)
        loss = torch.nn.functional.cross_entropy(logits, targets).item()
        best = logits.argmax(-1)
        per_row = (self.batch["labels"] != IGNORE).sum(1).tolist()
        exact: dict[str, list[bool]] = {}
        task: dict[str, list[bool]] = {}
        start = 0
        for (scene, q, labels), n in zip(self.items, per_row):
            guess = best[start:start + n]
            exact.setdefault(q.kind, []).append(bool((guess == targets[start:start + n]).all()))
            ids = [t for t in guess.tolist() if t != self.eos]
            task.setdefault(q.kind, []).append(score(q, scene, labels,
                                                     self.tokenizer.decode(ids))[1])
            start += n
        return {"loss": round(loss, 4),
                "exact": {k: round(sum(v) / len(v), 3) for k, v in sorted(exact.items())},
                "task": {k: round(sum(v) / len(v), 3) for k, v in sorted(task.items())}}


def make_optimizer(model: MolmoForConditionalGeneration, s: TrainSettings
                   ) -> torch.optim.Optimizer:
    vision, text = [], []
    for name, p in model.named_parameters():
        (vision if name.startswith(("vision.", "connector.")) else text).append(p)
    return torch.optim.AdamW([{"params": vision, "lr": s.lr_vision},
                              {"params": text, "lr": s.lr_text}],
                             weight_decay=s.weight_decay, betas=(0.9, 0.98))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def save_official(model: MolmoForConditionalGeneration, path: Path,
                  metadata: dict[str, str] | None = None) -> None:
    """Weights under official names, written atomically."""
    from safetensors.torch import save_file

    from molmo_export.checkpoint import official_state_dict

    tmp = path.with_name(path.name + ".partial")
    save_file(official_state_dict(model), str(tmp), metadata={"format": "pt", **(metadata or {})})
    tmp.replace(path)


def train(out: Path, steps: int, minutes: float | None, s: TrainSettings,
          eval_every: int = 200, eval_questions: int = 48, save_every: int = 100,
          log_every: int = 25) -> dict[str, Any]:
    """Train; stops after `steps` or `minutes` (the cosine schedule assumes `steps`)."""
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    init = Path(tempfile.mkdtemp(prefix="init-", dir=out))
    model, processor = build_model(s.seed, init, s.projector_scale)
    batches = iter(torch.utils.data.DataLoader(BatchStream(init, s, steps), batch_size=None,
                                               num_workers=1, prefetch_factor=4))
    opt = make_optimizer(model, s)
    base = [g["lr"] for g in opt.param_groups]
    probe = Probe(processor, eval_questions)
    log = open(out / "log.jsonl", "a", encoding="utf-8")
    start = time.time()
    ema = None
    step = 0
    for step in range(steps):
        elapsed = time.time() - start
        if minutes is not None and elapsed > minutes * 60:
            break
        batch = next(batches)
        f = lr_factor(step, steps, s.warmup)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * f
        loss = answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0:
            rec = {"step": step, "loss": round(loss.item(), 4), "ema": round(ema, 4),
                   "lr_factor": round(f, 4), "min": round(elapsed / 60, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step and step % save_every == 0:
            save_official(model, out / "last.safetensors", {"step": str(step)})
        if step and step % eval_every == 0:
            model.eval()
            rec = {"step": step, "min": round((time.time() - start) / 60, 2),
                   "probe": probe(model)}
            model.train()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            save_official(model, out / f"step-{step:06d}.safetensors", {"step": str(step)})
    model.eval()
    final = {"step": step, "min": round((time.time() - start) / 60, 2), "probe": probe(model),
             "final": True}
    log.write(json.dumps(final) + "\n")
    log.close()
    save_official(model, out / "last.safetensors", {"step": str(step)})
    shutil.rmtree(init)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-scenes", type=int, default=TrainSettings.batch_scenes)
    p.add_argument("--threads", type=int, default=TrainSettings.threads)
    p.add_argument("--eval-every", type=int, default=200)
    args = p.parse_args(argv)
    s = TrainSettings(seed=args.seed, batch_scenes=args.batch_scenes, threads=args.threads)
    print(json.dumps(train(args.out, args.steps, args.minutes, s, eval_every=args.eval_every)))


if __name__ == "__main__":
    main()
