"""The model's interfaces (the future graph boundaries) and KV-cached generation/sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from molmo_export import MolmoForConditionalGeneration, get_preset
from molmo_export.config import MolmoTextConfig
from molmo_export.demo import materialize_preset
from molmo_export.model.generation import (
    apply_top_k,
    apply_top_p,
    decode_steps,
)
from molmo_runtime.errors import InputError
from molmo_runtime.tolerances import TABLE

# Eager float32 vs itself with other shapes: row "self/kv_cache" of molmo_runtime.tolerances.
SELF_ATOL = TABLE["self/kv_cache"].atol


def variant(text: MolmoTextConfig) -> Any:
    """A demo-sized model with the given decoder variant and deterministic random weights."""
    torch.manual_seed(0)
    cfg = get_preset("demo-random")
    cfg = cfg.replace(text=text, pooling=dataclasses.replace(
        cfg.pooling, projector_hidden_size=text.intermediate_size // 2))
    model = MolmoForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():  # spread everything a little so outputs are not flat
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval().requires_grad_(False)


DEMO_TEXT = get_preset("demo-random").text
VARIANTS = {
    "7b-d (GQA, qkv bias)": DEMO_TEXT,
    "7b-o (post-norm, QK-norm, MHA)": MolmoTextConfig(
        hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
        intermediate_size=384, vocab_size=512, embedding_size=512, qkv_bias=False,
        qk_norm=True, norm_after=True, rope_theta=5e5),
    "moe (top-2 of 8)": MolmoTextConfig(
        hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
        intermediate_size=128, vocab_size=512, embedding_size=512, qkv_bias=False,
        qk_norm=True, layer_norm_eps=1e-5, rope_theta=1e4, moe_num_experts=8, moe_top_k=2),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = materialize_preset("demo-random", tmp_path_factory.mktemp("demo") / "ck")
    return MolmoForConditionalGeneration.from_pretrained(path)


def prompt(n: int, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([256]), torch.randint(0, 256, (n - 1,), generator=g)])


def demo_images(model: Any, n_crops: int = 2, seed: int = 0) -> dict[str, Any]:
    """Processor-shaped inputs: BOS, an image block of n_crops*144 <im_patch> slots, text."""
    g = torch.Generator().manual_seed(seed)
    tok = model.config.tokens
    patches = torch.full((n_crops * 144,), tok.im_patch)
    ids = torch.cat([torch.tensor([tok.bos, tok.im_start]), patches, torch.tensor([tok.im_end]),
                     prompt(6, seed)[1:]])
    idx = torch.arange(2, 2 + n_crops * 144).reshape(n_crops, 144)
    idx[-1, :10] = -100  # dropped features (overlap margin)
    masks = torch.ones(n_crops, 576)
    masks[-1] = -1  # the processor's shifted last row
    masks[0, :20] = 0.5
    return dict(input_ids=ids[None], images=torch.randn(1, n_crops, 576, 588, generator=g),
                image_masks=masks[None], image_input_idx=idx[None].int())


# -- graph-boundary interfaces -------------------------------------------------------------------

def test_vision_and_connector_shapes_and_padding_crop(demo: Any) -> None:
    v = demo.config.vision
    images = torch.randn(3, 576, 588)
    images[2] = -1  # a batch-padding crop
    features = demo.vision(images)
    assert features.shape == (3, 576, v.feature_dim)
    assert torch.all(features[2] == 0) and features[:2].abs().sum() > 0
    tokens = demo.connector(features, torch.ones(3, 576))
    assert tokens.shape == (3, 144, demo.config.text.hidden_size)


def test_only_the_needed_vit_blocks_run(demo: Any) -> None:
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, b in enumerate(demo.vision.blocks)]
    demo.vision(torch.randn(1, 576, 588))
    for h in hooks:
        h.remove()
    assert calls == [0, 1] and len(demo.vision.blocks) == 3  # vit_layers (-2, -3) -> blocks 1, 0


def test_pad_embed_follows_image_masks(demo: Any) -> None:
    c = demo.connector
    f = torch.zeros(1, 576, demo.config.vision.feature_dim)
    m = torch.tensor([[0.0, 0.5, -1.0, 1.0] * 144])
    out = c.add_pad_embed(f, m)[0]
    assert torch.equal(out[0], c.pad_embed[0]) and torch.equal(out[1], c.pad_embed[1])
    assert torch.equal(out[2], c.pad_embed[1]) and torch.all(out[3] == 0)


def test_image_tokens_are_added_not_substituted(demo: Any) -> None:
    kw = demo_images(demo)
    embeds = demo.embed_inputs(**kw)
    plain = demo.language_model.model.embed(kw["input_ids"])
    _, tokens = demo.encode_images(kw["images"], kw["image_masks"])
    idx = kw["image_input_idx"][0].reshape(-1).long()
    flat = tokens[0].reshape(-1, tokens.shape[-1])
    valid = idx >= 0
    assert torch.allclose(embeds[0, idx[valid]], plain[0, idx[valid]] + flat[valid])
    untouched = torch.ones(embeds.shape[1], dtype=torch.bool)
    untouched[idx[valid]] = False
    assert torch.equal(embeds[0, untouched], plain[0, untouched])


def test_embed_maps_padding_to_row_zero(demo: Any) -> None:
    lm = demo.language_model.model
    out = lm.embed(torch.tensor([[-1, 0, 5]]))
    assert torch.equal(out[0, 0], lm.embed_tokens.weight[0])
    assert lm.embed_tokens.weight.shape == (512 + 128, 128)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_with_past_equals_one_pass(name: str) -> None:
    """Prefill in two chunks through the past_key_values interface == one pass; a longer,
    preallocated past (graph_io convention: only total - seq positions are read) too."""
    model = variant(VARIANTS[name])
    lm, t = model.language_model, model.config.text
    embeds = lm.model.embed(prompt(12)[None])
    positions = torch.arange(12)[None]
    mask = torch.ones(1, 12, dtype=torch.long)
    full, kv = lm(embeds, positions, mask)
    assert kv[0][0].shape == (1, t.num_kv_heads, 12, t.head_dim)
    first, kv1 = lm(embeds[:, :7], positions[:, :7], mask[:, :7])
    second, kv2 = lm(embeds[:, 7:], positions[:, 7:], mask, kv1)
    assert kv2[0][0].shape == (1, t.num_kv_heads, 5, t.head_dim)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=SELF_ATOL, rtol=0)
    cache = [(torch.cat([k, torch.full((1, t.num_kv_heads, 9, t.head_dim), 1e4)], 2),
              torch.cat([v, torch.full_like(v[:, :, :1], 1e4).expand(-1, -1, 9, -1)], 2))
             for k, v in kv1]  # garbage after the valid prefix must not be read
    again, _ = lm(embeds[:, 7:], positions[:, 7:], mask, cache)
    torch.testing.assert_close(again, second, atol=0, rtol=0)
    last, _ = lm(embeds, positions, mask, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], atol=SELF_ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_generation_equals_recomputation(name: str) -> None:
    model = variant(VARIANTS[name])
    ids = prompt(9)[None]
    out = model.generate(ids, max_new_tokens=8)
    steps = decode_steps(model, ids)
    seq = ids
    for _ in range(8):
        cached_logits, nxt = next(steps)
        full = model(seq).logits[:, -1]
        torch.testing.assert_close(cached_logits, full, atol=SELF_ATOL, rtol=0)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_right_and_left_padded_batches_equal_single_rows(demo: Any) -> None:
    a, b = demo_images(demo, 2, seed=1), demo_images(demo, 1, seed=2)
    singles = [demo.generate(**x, max_new_tokens=6)[0, x["input_ids"].shape[1]:] for x in (a, b)]
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    crops_pad = dict(images=torch.cat([b["images"], -torch.ones_like(b["images"])], 1),
                     image_masks=torch.cat([b["image_masks"], -torch.ones(1, 1, 576)], 1))
    b_idx = torch.cat([b["image_input_idx"], -torch.ones_like(b["image_input_idx"])], 1)
    for side in ("right", "left"):
        shift = (la - lb) if side == "left" else 0
        ids_b = torch.full((1, la), -1)
        ids_b[0, shift:shift + lb] = b["input_ids"][0]
        idx_b = torch.where(b_idx >= 0, b_idx + shift, b_idx)
        batch = dict(input_ids=torch.cat([a["input_ids"], ids_b]),
                     images=torch.cat([a["images"], crops_pad["images"]]),
                     image_masks=torch.cat([a["image_masks"], crops_pad["image_masks"]]),
                     image_input_idx=torch.cat([a["image_input_idx"], idx_b.int()]))
        out = demo.generate(**batch, max_new_tokens=6)[:, la:]
        assert out[0].tolist() == singles[0].tolist(), side
        assert out[1].tolist() == singles[1].tolist(), side


# -- sampling -------------------------------------------------------------------------------------

def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(apply_top_p(logits, 0.7)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(apply_top_p(logits, 0.71)).tolist() == [[False, False, False, True, True]]
    assert torch.isinf(apply_top_p(logits, 0.01)).tolist() == [[False, True, True, True, True]]
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert torch.isinf(apply_top_p(shuffled, 0.7)).tolist() == [[True, False, True, True, False]]


def test_sampling_is_seeded_and_filters_reduce_to_greedy(demo: Any) -> None:
    ids = prompt(7)[None]
    greedy = demo.generate(ids, max_new_tokens=10)
    a = demo.generate(ids, max_new_tokens=10, do_sample=True, seed=3)
    b = demo.generate(ids, max_new_tokens=10, do_sample=True, seed=3)
    c = demo.generate(ids, max_new_tokens=10, do_sample=True, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(demo.generate(ids, max_new_tokens=10, do_sample=True, generator=g), a)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        assert torch.equal(demo.generate(ids, max_new_tokens=10, do_sample=True, seed=5, **kw),
                           greedy), kw


def test_stops_at_eos_and_pads_finished_rows(demo: Any) -> None:
    ids = torch.stack([prompt(7, 1), prompt(7, 2)])
    free = demo.generate(ids, max_new_tokens=12)
    eos = int(free[0, 7 + 2])  # row 0's third new token
    out = demo.generate(ids, max_new_tokens=12, eos_token_id=eos)
    row0 = free[0, 7:].tolist()
    stop0 = row0.index(eos)
    assert out[0, 7:7 + stop0 + 1].tolist() == row0[:stop0 + 1]
    assert torch.all(out[0, 7 + stop0:] == eos)  # finished row filled with EOS
    row1 = free[1, 7:].tolist()
    if eos in row1:  # both rows stop: generation ends at the later EOS
        assert out.shape[1] == 7 + max(stop0, row1.index(eos)) + 1
    else:
        assert out[1, 7:].tolist() == row1 and out.shape[1] == 7 + 12
    assert torch.equal(demo.generate(ids, max_new_tokens=0), ids)


def test_bad_arguments_get_clear_errors(demo: Any) -> None:
    ids = prompt(5)[None]
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        demo.generate(ids[0])
    with pytest.raises(InputError, match="all padding"):
        demo.generate(torch.cat([ids, torch.full_like(ids, -1)]))
    with pytest.raises(InputError, match="temperature"):
        demo.generate(ids, do_sample=True, temperature=0)
    with pytest.raises(InputError, match="top_p"):
        demo.generate(ids, do_sample=True, top_p=1.5)
    kw = demo_images(demo)
    with pytest.raises(InputError, match="image_masks and image_input_idx"):
        demo(kw["input_ids"], images=kw["images"])
    bad = dict(kw, image_input_idx=kw["image_input_idx"] + 1000)
    with pytest.raises(InputError, match="same processor call"):
        demo(**bad)


def test_demo_checkpoint_folder_is_readable(demo: Any, tmp_path: Path) -> None:
    assert demo.load_report.ok and not demo.load_report.unused
