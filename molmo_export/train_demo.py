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

Opt-in training signals for pointing (TrainSettings, all off by default; none of them is in the
saved model): attention supervision towards the named shape's image tokens, a bound on the image
tokens' RMS, a discarded linear head that keeps the tokens' grid position readable, extra weight
on the coordinate digits, and a sin/cos init of the ViT position embeddings (docs/demo_model.md,
"Attention supervision").
"""

from __future__ import annotations

import argparse
import json
import math
import re
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
from molmo_export.model.text import TextAttention

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
    # on the vision tower + connector: bounds the image tokens (a 4,000-step run with 0.01
    # reached ~3e5 on random-pixel crops, beyond fp16's range)
    vision_weight_decay: float = 0.01
    threads: int = 1  # on a shared 2-core machine 2 OpenMP threads were 4-8x slower
    # Attention supervision (0 = off): at the positions that predict a pointing answer's
    # coordinate digits, -log of the attention mass (mean over heads) on the image tokens that
    # hold the named shape, in the decoder layers `attend_layers`; weight `attend_weight` until
    # `attend_hold` of the steps, then linearly down to 0 at `attend_until`. It breaks the saddle
    # of uniform attention (docs/demo_model.md); the final weights stay a plain Molmo.
    attend_weight: float = 0.0
    attend_layers: tuple[int, ...] = (1, 2)
    attend_hold: float = 0.2
    attend_until: float = 0.4
    # Image tokens whose RMS exceeds token_rms add token_penalty * (RMS - token_rms)^2 (mean
    # over tokens): without it they grew to ~1e4 within 800 steps (fp16 overflows at 65,504)
    token_penalty: float = 0.0
    token_rms: float = 4.0
    # Position signal (0 = off): a linear head, trained alongside and then discarded, regresses
    # each global-crop image token to its place in the crop; it keeps the tokens' position
    # readable (colour training otherwise erases it), which pointing has to read.
    position_weight: float = 0.0
    coord_weight: float = 1.0  # weight of a coordinate digit in its question's loss
    position_shape_weight: float = 1.0  # in the position signal, of tokens that hold a shape
    attend_global: bool = False  # supervise towards the global crop's tokens only
    position_init: str = "random"  # "sincos": ViT position embeddings as a 2-D sin/cos grid


def sincos_positions(n_side: int, dim: int, std: float) -> torch.Tensor:
    """[1 + n_side**2, dim]: the class token's row 0, each patch's row x in the first half of
    the dims and y in the second, as sin/cos of several frequencies, scaled to `std`."""
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    grid = torch.arange(n_side, dtype=torch.float32)
    y, x = torch.meshgrid(grid, grid, indexing="ij")

    def enc(v: torch.Tensor) -> torch.Tensor:
        a = v.reshape(-1, 1) * freq
        return torch.cat((a.sin(), a.cos()), dim=1)

    table = torch.zeros(1 + n_side * n_side, dim)
    table[1:, :2 * quarter] = enc(x)
    table[1:, 2 * quarter:4 * quarter] = enc(y)
    return table * (std / table[1:].std())


def build_model(seed: int, directory: Path, scale: float = TrainSettings.projector_scale,
                position_init: str = "random") -> tuple[MolmoForConditionalGeneration, Any]:
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
        if position_init == "sincos":
            pos = model.vision.positional_embedding
            pos.copy_(sincos_positions(int(round((pos.shape[0] - 1) ** 0.5)), pos.shape[1],
                                       float(pos[1:].std())))
    model.requires_grad_(True).train()
    return model, MolmoProcessor.from_pretrained(directory)


class Batcher:
    """Random scenes and questions -> padded model inputs with answer-only labels."""

    def __init__(self, processor: Any, seed: int, focus_global: bool = False) -> None:
        if seed == HELDOUT_SEED:
            raise ValueError("the training seed must differ from the held-out set's")
        self.processor = processor
        self.focus_global = focus_global
        self.rng = np.random.default_rng([seed, 1])
        self.eos = processor.special_tokens.eos

    def sample(self, max_shapes: int) -> tuple[Scene, np.ndarray, np.ndarray]:
        scene = make_scene(self.rng, max_shapes=max_shapes)
        return (scene, *render(scene))

    def encode(self, image: np.ndarray, question: Question,
               cover: np.ndarray | None = None) -> dict[str, Any]:
        """Model inputs and answer labels; with the scene's token_cover, also "focus": for each
        position that predicts a coordinate digit of a pointing answer, that position and the
        image-token positions that hold the shape the coordinate belongs to."""
        inputs = self.processor(images=image, text=question.prompt)
        answer = self.processor.tokenizer.encode(" " + question.answer) + [self.eos]
        prompt = inputs["input_ids"]
        inputs["input_ids"] = np.concatenate([prompt, np.asarray(answer, np.int64)])
        labels = np.full(len(inputs["input_ids"]), IGNORE, np.int64)
        # position t predicts token t + 1: the answer's tokens are predicted from the
        # position before each of them
        labels[len(prompt) - 1:-1] = answer
        inputs["labels"] = labels
        if cover is not None and question.kind in ("point", "point_all"):
            inputs["focus"] = self._focus(question, answer, len(prompt) - 1, cover,
                                          inputs["image_input_idx"])
        return inputs

    def _focus(self, question: Question, answer: list[int], first: int,
               cover: np.ndarray, image_input_idx: np.ndarray
               ) -> list[tuple[int, np.ndarray]]:
        if self.focus_global:  # the global crop's tokens only (cover is the scene's, shared)
            cover = np.concatenate((cover[:1], np.zeros_like(cover[1:])))
        text = " " + question.answer  # what `answer` encodes (then EOS)
        numbers = [m.span(1) for m in re.finditer(r'="(\d+)"', text)]  # x, y of each point
        out, start = [], 0
        for j, tok in enumerate(answer[:-1]):
            end = start + len(self.processor.tokenizer.decode([tok]))
            for k, (a, b) in enumerate(numbers):
                if start < b and a < end:
                    shape = question.targets[k // 2]
                    keys = image_input_idx[cover[:, :, shape] & (image_input_idx >= 0)]
                    if len(keys):
                        out.append((first + j, keys.astype(np.int64)))
                    break
            start = end
        assert start == len(text), "the answer's tokens do not decode to its text"
        return out

    def batch(self, scenes: int, per_scene: int, max_shapes: int,
              mix: dict[str, float] = TRAIN_MIX, focus: bool = False
              ) -> dict[str, torch.Tensor]:
        rows = []
        for k in range(scenes):
            scene, image, labels_map = self.sample(max_shapes)
            # [crops, tokens, shapes], once per scene
            cover = token_cover(self.processor.image_processor, labels_map) if focus else None
            for q in range(per_scene):
                row = self.encode(image, sample_question(scene, self.rng, mix), cover)
                if cover is not None and q == 0:  # the global crop's tokens that hold a shape
                    row["global_shape"] = cover[0].any(-1)
                rows.append({**row, "scene": k})
        return collate(rows, pad_id=self.eos)


def token_cover(image_processor: Any, labels_map: np.ndarray, share: float = 0.1
                ) -> np.ndarray:
    """bool [crops, tokens a crop, shapes]: the image token (pooled 2x2 patches) holds at least
    `share` of the shape's visible pixels. Crop 0 is the global crop (the image fitted into one
    crop), crops 1.. the high-res tiles of the canvas, row-major (MolmoImageProcessor.plan)."""
    ip = image_processor
    h, w = labels_map.shape
    plan = ip.plan(h, w)
    size, p = ip.base_image_input_size[0], ip.image_patch_size
    pool = 2 * p
    n_pool = (size // p + 1) // 2
    window = size - p * sum(ip.overlap_margins)
    n_shapes = int(labels_map.max()) + 1
    areas = np.bincount(labels_map[labels_map >= 0].ravel(), minlength=n_shapes)
    rows, cols = plan.tiling
    # per crop: (origin y, x in its frame, frame offset, fitted size)
    crops = [((0, 0), plan.global_offset, plan.global_resized)]
    crops += [((i * window, j * window), plan.offset, plan.resized)
              for i in range(rows) for j in range(cols)]
    out = np.zeros((len(crops), n_pool * n_pool, max(n_shapes, 1)), bool)
    for k, ((y0, x0), (top, left), (rh, rw)) in enumerate(crops):
        for t in range(n_pool * n_pool):
            r, c = divmod(t, n_pool)
            ys = [(y0 + r * pool + d - top) * h / rh for d in (0, pool)]
            xs = [(x0 + c * pool + d - left) * w / rw for d in (0, pool)]
            ya, yb = (int(np.clip(round(v), 0, h)) for v in ys)
            xa, xb = (int(np.clip(round(v), 0, w)) for v in xs)
            if ya < yb and xa < xb:
                patch = labels_map[ya:yb, xa:xb]
                counts = np.bincount(patch[patch >= 0].ravel(), minlength=n_shapes)
                out[k, t, :n_shapes] = counts >= share * np.maximum(areas, 1)
    return out


class BatchStream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The batches of a run, made in a DataLoader worker process (rendering and preprocessing
    overlap the training step). Deterministic: one worker, seeded from the run's seed."""

    def __init__(self, checkpoint: Path, s: TrainSettings, steps: int) -> None:
        self.checkpoint, self.s, self.steps = checkpoint, s, steps

    def __iter__(self) -> Any:
        from molmo_runtime.processing import MolmoProcessor

        batcher = Batcher(MolmoProcessor.from_pretrained(self.checkpoint), self.s.seed,
                          self.s.attend_global)
        for step in range(self.steps):
            max_shapes, mix = phase_at(step, self.steps)
            focus = attend_weight(step, self.steps, self.s) > 0 or self.s.coord_weight != 1
            yield batcher.batch(self.s.batch_scenes, self.s.questions_per_scene, max_shapes, mix,
                                focus)


def grid_targets(n_tokens: int) -> torch.Tensor:
    """[n_tokens, 2]: (x, y) of each token of a square grid, row-major, in (0, 1)."""
    side = int(round(n_tokens ** 0.5))
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return (torch.stack((c, r), -1).reshape(-1, 2).float() + 0.5) / side


def attend_weight(step: int, total: int, s: TrainSettings) -> float:
    """The attention supervision's weight at `step` (TrainSettings.attend_*)."""
    hold, until = s.attend_hold * total, s.attend_until * total
    if s.attend_weight <= 0 or step >= until:
        return 0.0
    return s.attend_weight * min(1.0, (until - step) / max(until - hold, 1e-9))


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences (pad_id: causal attention never looks ahead, labels ignore it)
    and the crops packed along one axis: each distinct image once (rows asking about the same
    scene share it; a row's "scene" key says which), no padding crops. `crop_of` maps every
    row's crop to its packed crop, `flat_idx` each of its image tokens to an index into the
    flattened [B*T] sequence (-1: dropped). Rows with "focus" (Batcher.encode) add
    `focus_query` [N, 2] (row, position) and `focus_keys` bool [N, T]."""
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
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
           "images": torch.from_numpy(np.concatenate(images)),
           "image_masks": torch.from_numpy(np.concatenate(masks)),
           "crop_of": torch.from_numpy(np.concatenate(crop_of)),
           "flat_idx": torch.from_numpy(np.concatenate(flat)),
           "global_crops": torch.tensor(sorted(first.values()), dtype=torch.int64)}
    shape_tokens = [r["global_shape"] for r in rows if "global_shape" in r]  # one per scene
    if shape_tokens and len(shape_tokens) == len(first):
        out["global_shape"] = torch.from_numpy(np.stack(shape_tokens))
    focus = [(i, pos, keys) for i, r in enumerate(rows) for pos, keys in r.get("focus", ())]
    if focus:
        keys_mask = np.zeros((len(focus), t), bool)
        for n, (_, _, keys) in enumerate(focus):
            keys_mask[n, keys] = True
        out["focus_query"] = torch.tensor([(i, pos) for i, pos, _ in focus], dtype=torch.int64)
        out["focus_keys"] = torch.from_numpy(keys_mask)
    return out


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


def attention_loss(model: MolmoForConditionalGeneration, batch: dict[str, torch.Tensor],
                   layers: tuple[int, ...]) -> torch.Tensor:
    """-log(attention mass on the named shape's image tokens, mean over heads) at the focus
    queries, averaged over them and over `layers`; needs the probabilities of the last forward
    (TextAttention.keep_probs)."""
    rows, pos = batch["focus_query"].unbind(1)
    keys = batch["focus_keys"].float()  # [N, S]
    total = torch.zeros(())
    for i in layers:
        probs = _attention(model, i).probs  # [B, H, T, S]
        assert probs is not None, "set keep_probs on the supervised layers"
        mass = (probs[rows, :, pos] * keys[:, None]).sum(-1).mean(-1)  # [N]
        total = total - torch.log(mass.clamp_min(1e-6)).mean()
    return total / len(layers)


def _attention(model: MolmoForConditionalGeneration, layer: int) -> TextAttention:
    attn = model.language_model.model.layers[layer].attn
    assert isinstance(attn, TextAttention)
    return attn


def keep_attention(model: MolmoForConditionalGeneration, layers: tuple[int, ...],
                   on: bool) -> None:
    for i in layers:
        attn = _attention(model, i)
        attn.keep_probs, attn.probs = on, None


def answer_loss(model: MolmoForConditionalGeneration, batch: dict[str, torch.Tensor],
                coord_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy over each question's answer tokens, averaged per question, then over the
    questions: a token-mean would let a pointing answer's ~50 predictable tokens outweigh the
    few that depend on the image. coord_weight != 1: the coordinate digits (the batch's focus
    queries) weigh that much more in their question's average."""
    logits, targets = answer_logits(model, batch)
    keep = batch["labels"] != IGNORE
    row = keep.nonzero()[:, 0]  # the question of each answer token
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if coord_weight != 1 and "focus_query" in batch:
        weights = torch.ones(batch["labels"].shape)
        weights[batch["focus_query"][:, 0], batch["focus_query"][:, 1]] = coord_weight
        w = weights[keep]
        total = torch.bincount(row, weights=w, minlength=len(batch["labels"])).clamp(min=1)
        return (per_token * w / total[row]).sum() / len(batch["labels"])
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
    return torch.optim.AdamW([{"params": vision, "lr": s.lr_vision,
                               "weight_decay": s.vision_weight_decay},
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
    model, processor = build_model(s.seed, init, s.projector_scale, s.position_init)
    batches = iter(torch.utils.data.DataLoader(BatchStream(init, s, steps), batch_size=None,
                                               num_workers=1, prefetch_factor=4))
    opt = make_optimizer(model, s)
    base = [g["lr"] for g in opt.param_groups]
    probe = Probe(processor, eval_questions)
    log = open(out / "log.jsonl", "a", encoding="utf-8")
    captured: dict[str, torch.Tensor] = {}  # the connector's output (image tokens) of a step
    head = torch.nn.Linear(model.config.text.hidden_size, 2) if s.position_weight > 0 else None
    if head is not None:
        opt.add_param_group({"params": list(head.parameters()), "lr": s.lr_vision,
                             "weight_decay": 0.0})
        base.append(s.lr_vision)
    if s.token_penalty > 0 or s.position_weight > 0:
        model.connector.register_forward_hook(
            lambda module, args, out: captured.__setitem__("tokens", out))
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
        w = attend_weight(step, steps, s)
        keep_attention(model, s.attend_layers, w > 0)
        loss = answer_loss(model, batch, s.coord_weight)
        total = loss
        attend = (attention_loss(model, batch, s.attend_layers)
                  if w > 0 and "focus_query" in batch else None)
        if attend is not None:
            total = total + w * attend
        keep_attention(model, s.attend_layers, False)
        if s.token_penalty > 0:
            rms = captured["tokens"].pow(2).mean(-1).sqrt()
            total = total + s.token_penalty * (rms - s.token_rms).clamp(min=0).pow(2).mean()
        position = None
        if head is not None:
            tokens = captured["tokens"][batch["global_crops"]]  # [scenes, n*n, D]
            err = (head(tokens) - grid_targets(tokens.shape[1])).pow(2).mean(-1)  # [scenes, n*n]
            weight = torch.ones_like(err)
            if "global_shape" in batch:
                weight = weight + (s.position_shape_weight - 1) * batch["global_shape"].float()
            position = (err * weight).sum() / weight.sum()
            total = total + s.position_weight * position
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0:
            rec = {"step": step, "loss": round(loss.item(), 4), "ema": round(ema, 4),
                   "lr_factor": round(f, 4), "min": round(elapsed / 60, 2)}
            if attend is not None:
                rec.update(attend=round(attend.item(), 4), attend_weight=round(w, 4))
            if position is not None:
                rec["position"] = round(position.item(), 4)
            if s.token_penalty > 0:
                rec["token_rms_max"] = round(rms.max().item(), 2)
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
    p.add_argument("--vision-weight-decay", type=float,
                   default=TrainSettings.vision_weight_decay)
    p.add_argument("--attend-weight", type=float, default=TrainSettings.attend_weight,
                   help="attention supervision weight (0: off; see TrainSettings)")
    p.add_argument("--attend-layers", type=int, nargs="+",
                   default=list(TrainSettings.attend_layers))
    p.add_argument("--attend-hold", type=float, default=TrainSettings.attend_hold)
    p.add_argument("--attend-until", type=float, default=TrainSettings.attend_until)
    p.add_argument("--token-penalty", type=float, default=TrainSettings.token_penalty)
    p.add_argument("--token-rms", type=float, default=TrainSettings.token_rms)
    p.add_argument("--position-shape-weight", type=float,
                   default=TrainSettings.position_shape_weight)
    p.add_argument("--coord-weight", type=float, default=TrainSettings.coord_weight)
    p.add_argument("--position-weight", type=float, default=TrainSettings.position_weight)
    p.add_argument("--attend-global", action="store_true")
    p.add_argument("--position-init", choices=("random", "sincos"),
                   default=TrainSettings.position_init)
    args = p.parse_args(argv)
    s = TrainSettings(seed=args.seed, batch_scenes=args.batch_scenes, threads=args.threads,
                      vision_weight_decay=args.vision_weight_decay,
                      attend_weight=args.attend_weight, attend_layers=tuple(args.attend_layers),
                      attend_hold=args.attend_hold, attend_until=args.attend_until,
                      token_penalty=args.token_penalty, token_rms=args.token_rms,
                      position_weight=args.position_weight, coord_weight=args.coord_weight,
                      position_shape_weight=args.position_shape_weight,
                      attend_global=args.attend_global, position_init=args.position_init)
    print(json.dumps(train(args.out, args.steps, args.minutes, s, eval_every=args.eval_every)))


if __name__ == "__main__":
    main()
