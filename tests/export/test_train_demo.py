"""The demo's training script stays alive: a few steps on CPU, weights saved in the official
layout, reproducible from the seed (the full run is documented in docs/demo_model.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open
from safetensors.torch import load_file

from molmo_export import MolmoForConditionalGeneration
from molmo_export.checkpoint import official_state_dict
from molmo_export.config import PRESETS
from molmo_export.demo import materialize_preset, official_shapes, write_checkpoint
from molmo_export.train_demo import TrainSettings, train

TINY = TrainSettings(seed=3, batch_scenes=2, questions_per_scene=2, warmup=2)


def test_official_state_dict_is_the_inverse_of_loading(tmp_path: Path) -> None:
    path = materialize_preset("demo-random", tmp_path / "ck")
    model = MolmoForConditionalGeneration.from_pretrained(path)
    written = load_file(str(path / "model.safetensors"))
    ours = official_state_dict(model)
    assert ours.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(ours[name], tensor), name


def test_a_few_steps_train_and_save_official_weights(tmp_path: Path) -> None:
    final = train(tmp_path / "run", steps=4, minutes=None, s=TINY, eval_every=3,
                  eval_questions=4, save_every=2, log_every=1)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
               .splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    assert losses[-1] < losses[0]  # 4 steps on the answer format already lower the loss
    assert final["step"] == 3 and set(final["probe"]) >= {"loss"}
    assert any("probe" in r for r in records[:-1])  # the periodic held-out probe ran
    weights = tmp_path / "run" / "last.safetensors"
    with safe_open(str(weights), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == official_shapes(PRESETS["demo"])
    # the saved file is a checkpoint the official-layout loader takes as is
    ck = tmp_path / "ck"
    ck.mkdir()
    write_checkpoint(PRESETS["demo"], ck, weights=weights)
    model = MolmoForConditionalGeneration.from_pretrained(ck)
    assert model.load_report.ok and not model.load_report.unused
    # same seed, same run: the first steps' losses repeat exactly
    again = train(tmp_path / "again", steps=2, minutes=None, s=TINY, eval_every=10,
                  eval_questions=4, save_every=10, log_every=1)
    del again
    rerun = [json.loads(line)["loss"] for line in (tmp_path / "again" / "log.jsonl")
             .read_text().splitlines() if "loss" in json.loads(line)]
    assert rerun[0] == losses[0]


def test_attention_probs_are_opt_in_and_leave_the_forward_unchanged() -> None:
    from molmo_export.model.layers import causal_padding_mask, rope_cos_sin
    from molmo_export.model.text import TextAttention

    cfg = PRESETS["demo"].text
    attn = TextAttention(cfg)
    x = torch.randn(2, 7, cfg.hidden_size)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 5:] = 0
    allowed = causal_padding_mask(mask, 7)
    with torch.no_grad():
        plain, _ = attn(x, cos, sin, allowed, None)
        assert attn.probs is None
        attn.keep_probs = True
        kept, _ = attn(x, cos, sin, allowed, None)
    assert torch.equal(plain, kept)
    probs = attn.probs
    assert probs is not None and probs.shape == (2, cfg.num_heads, 7, 7)
    assert torch.allclose(probs.sum(-1), torch.ones(2, cfg.num_heads, 7))
    assert float(probs.triu(1).abs().max()) == 0.0  # causal
    assert float(probs[1, :, :, 5:].abs().max()) == 0.0  # padding


def test_focus_marks_the_coordinate_digits_and_the_shapes_image_tokens(tmp_path: Path) -> None:
    import numpy as np

    from molmo_calibration.shapes.task import Scene, Shape, ask, render
    from molmo_export.train_demo import Batcher, build_model, collate, token_cover

    _, processor = build_model(0, tmp_path)
    # 112 x 112: the global crop is the image itself, its 4 x 4 tokens 28 px squares
    scene = Scene(112, 112, (Shape("square", "red", 70.0, 42.0, 10.0),), 1, "noise")
    image, labels = render(scene)
    cover = token_cover(processor.image_processor, labels)
    assert cover.shape[2] == 1
    assert np.flatnonzero(cover[0, :, 0]).tolist() == [1 * 4 + 2]  # row 42 // 28, col 70 // 28
    assert cover[1:].any()  # and tokens of the high-res crop(s)

    batcher = Batcher(processor, 5)
    question = ask(scene, "point", np.random.default_rng(0))
    row = batcher.encode(image, question, cover)
    ids = row["input_ids"]
    digits = [processor.tokenizer.decode([int(ids[pos + 1])]) for pos, _ in row["focus"]]
    assert "".join(digits) == "".join(c for c in question.answer.split("alt")[0] if c.isdigit())
    idx = row["image_input_idx"]
    for _, keys in row["focus"]:
        assert set(keys.tolist()) == set(idx[cover[:, :, 0] & (idx >= 0)].tolist())
    batch = collate([row, batcher.encode(image, question)], pad_id=batcher.eos)
    assert batch["focus_query"][:, 0].tolist() == [0] * len(row["focus"])
    assert batch["focus_keys"].sum(1).tolist() == [len(row["focus"][0][1])] * len(row["focus"])


def test_the_auxiliary_signals_train_and_are_logged(tmp_path: Path) -> None:
    from dataclasses import replace

    s = replace(TINY, attend_weight=1.0, attend_hold=0.5, attend_until=1.0, attend_global=True,
                position_init="sincos", position_weight=1.0, position_shape_weight=10.0,
                coord_weight=10.0, token_penalty=0.1)
    train(tmp_path / "run", steps=3, minutes=None, s=s, eval_every=10, eval_questions=4,
          save_every=10, log_every=1)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
               .splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["position"] > 0 and r["token_rms_max"] > 0 for r in steps)
    supervised = [r for r in steps if "attend" in r]
    assert supervised and all(0 < r["attend"] < 20 for r in supervised)


def test_sincos_positions_and_grid_targets() -> None:
    from molmo_export.train_demo import grid_targets, sincos_positions

    table = sincos_positions(8, 64, 0.5)
    assert table.shape == (65, 64) and not table[0].any()
    assert abs(float(table[1:].std()) - 0.5) < 1e-5
    grid = table[1:].reshape(8, 8, 64)  # row-major patches: [y, x, dim]
    assert torch.equal(grid[:, :, :32], grid[:1, :, :32].expand(8, 8, 32))  # x only
    assert torch.equal(grid[:, :, 32:], grid[:, :1, 32:].expand(8, 8, 32))  # y only
    assert len({tuple(row.tolist()) for row in table[1:]}) == 64
    assert grid_targets(16)[[0, 1, 4]].tolist() == [[0.125, 0.125], [0.375, 0.125],
                                                     [0.125, 0.375]]
