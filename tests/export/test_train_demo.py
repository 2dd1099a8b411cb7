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
