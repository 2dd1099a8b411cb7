"""Built-in Molmo checkpoints in the official layout: the trained `demo` preset (weights shipped
in molmo_export/weights/, trained by molmo_export.train_demo) and the random-weight `demo-random`
and `bench-0.5b` presets.

    materialize_preset("demo") -> ~/.cache/molmo-export/demo-v2-<hash>/
        config.json              hub format (LLM fields), or MolmoE's full format for MoE configs
        full_config.json         the complete OLMo-style config incl. the vision tower
        model.safetensors        OFFICIAL key names (or model-0000N-of-0000M + index when large)
        tokenizer.json, tokenizer_config.json, special_tokens_map.json   byte-level tokenizer
        preprocessor_config.json the official image-processor constants (spec §6.2)

So every command that takes a checkpoint folder takes these too, through the same loader as the
real models. A trained preset's model.safetensors is a copy of the shipped file. Random weights
are deterministic (torch.Generator with a fixed seed, tensors drawn in
sorted official-name order) and initialised like the golden tiny models so the outputs are not
degenerate: norm weights 1 + N(0, 0.1), biases N(0, 0.05), embeddings N(0, 0.5), patch
embedding N(0, 0.04), linear weights N(0, 1/fan_in) (std 1/sqrt(fan_in), ~0.1 at the demo's
widths), image projector twice that, MoE router N(0, 0.5). Folders are built beside their final
place and renamed into it, so a half-written folder is never seen. Peak memory is one shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from molmo_export.config import (
    BUILTIN_PRESETS,
    PRESETS,
    TRAINED_PRESETS,
    MolmoConfig,
    get_preset,
)
from molmo_runtime.errors import InputError

FORMAT_VERSION = 3  # bump when the files written here change
SEED = 20240930
SHARD_BYTES = 1 << 30  # checkpoints larger than this are sharded like the hub's
MARKER = "molmo_export_preset.json"
ENDOFTEXT = "<|endoftext|>"
IMAGE_SPECIALS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- configs -------------------------------------------------------------------------------------

def _vision_backbone(cfg: MolmoConfig) -> dict[str, Any]:
    v = cfg.vision
    return {
        "image_model_type": "openai", "image_default_input_size": [v.image_size, v.image_size],
        "image_patch_size": v.patch_size, "image_pos_patch_size": v.patch_size,
        "image_emb_dim": v.hidden_size, "image_num_heads": v.num_heads,
        "image_num_key_value_heads": v.num_heads, "image_num_layers": v.num_layers,
        "image_head_dim": v.head_dim, "image_mlp_dim": v.intermediate_size,
        "image_mlp_activations": v.activation, "image_dropout_rate": 0.0,
        "image_num_pos": v.num_positions, "image_norm_eps": v.layer_norm_eps,
        "attention_dropout": 0.0, "residual_dropout": 0.0, "initializer_range": 0.02,
        "fsdp_wrap": False, "resize_mode": "default",
    }


def full_config(cfg: MolmoConfig) -> dict[str, Any]:
    """The complete OLMo-style model config (FullMolmoConfig / MolmoE config.json fields)."""
    t = cfg.text
    out: dict[str, Any] = {
        "model_type": "molmo", "architectures": ["OLMoForCausalLM" if t.is_moe
                                                 else "MolmoForCausalLM"],
        "d_model": t.hidden_size, "n_heads": t.num_heads, "n_kv_heads": t.num_kv_heads,
        "head_dim": t.head_dim, "n_layers": t.num_layers, "mlp_hidden_size": t.intermediate_size,
        "mlp_ratio": max(1, t.intermediate_size // t.hidden_size),
        "qkv_bias": t.qkv_bias, "clip_qkv": None, "activation_type": "swiglu",
        "block_type": "moe" if t.is_moe else "sequential", "rope": True,
        "rope_full_precision": True, "rope_theta": t.rope_theta, "rope_impl": "llama",
        "attention_layer_norm": t.qk_norm, "norm_after": t.norm_after,
        "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "layer_norm_eps": t.layer_norm_eps, "max_sequence_length": 4096,
        "max_position_embeddings": t.max_position_embeddings, "include_bias": False,
        "vocab_size": t.vocab_size, "embedding_size": t.embedding_size,
        "additional_vocab_size": t.additional_vocab_size, "weight_tying": False,
        "float32_attention": True, "attention_type": "sdpa", "use_position_ids": True,
        "image_padding_embed": cfg.pooling.padding_embed, "vit_layers": list(cfg.vision.vit_layers),
        "image_pooling_h": cfg.pooling.pool_h, "image_pooling_w": cfg.pooling.pool_w,
        "image_pooling_2d": "attention-meanq", "image_projector": "mlp",
        "vision_backbone": _vision_backbone(cfg),
    }
    if t.is_moe:
        out.update(moe_num_experts=t.moe_num_experts, moe_top_k=t.moe_top_k,
                   moe_shared_expert=False)
    return out


def hub_config(cfg: MolmoConfig) -> dict[str, Any]:
    """config.json as the dense hub repos have it (config_molmo.MolmoConfig: LLM fields only)."""
    t = cfg.text
    return {
        "architectures": ["MolmoForCausalLM"], "model_type": "molmo",
        "auto_map": {"AutoConfig": "config_molmo.MolmoConfig",
                     "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size,
        "embedding_size": t.embedding_size, "qkv_bias": t.qkv_bias,
        "attention_layer_norm": t.qk_norm, "norm_after": t.norm_after, "clip_qkv": None,
        "layer_norm_type": "rms", "layer_norm_eps": t.layer_norm_eps,
        "rope_theta": t.rope_theta, "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": False, "weight_tying": False, "use_position_ids": True,
        "use_cache": True, "initializer_range": 0.02,
    }


def overlap_margin(cfg: MolmoConfig) -> int:
    """Patches of overlap on each side of a crop: the official 4 of 24 (a sixth), rounded to an
    even number of at least 2 (2x2 pooling) for smaller crops (2 of 8 at 112 px)."""
    return max(2, 2 * round(cfg.vision.grid_size / 12))


def preprocessor_config(cfg: MolmoConfig) -> dict[str, Any]:
    v = cfg.vision
    margin, tokens = overlap_margin(cfg), (v.grid_size + 1) // 2
    return {
        "image_processor_type": "MolmoImageProcessor", "processor_class": "MolmoProcessor",
        "base_image_input_size": [v.image_size, v.image_size], "image_patch_size": v.patch_size,
        "max_crops": 12, "overlap_margins": [margin, margin], "image_token_length_w": tokens,
        "image_token_length_h": tokens, "image_padding_mask": True, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }


# -- tokenizer -----------------------------------------------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes map to themselves, the others to
    code points from 256 up, in byte order (what tokenizers' ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Readable filler for the ids between <|endoftext|> and the image specials, so that a random
# model's answer decodes to (meaningless) words rather than to nothing: 64 stems x 4 endings.
_STEMS = ("the a cat dog photo image show red blue green small large on in with near table sky "
          "tree house car person eye ear left right top bottom light dark window door street "
          "water grass wall floor hand face two three one many some is are there this that and "
          "of to it look like bright soft point count text sign boat bird flower cup book "
          "chair road").split()


def _filler_words(n: int) -> list[str]:
    words = [stem + end for end in ("", "s", "ed", "ing") for stem in _STEMS]
    return ["\u0120" + w for w in words[:n]]  # \u0120 is the byte-level alphabet's space


def write_tokenizer(cfg: MolmoConfig, directory: Path) -> None:
    """Byte-level tokenizer: ids 0..255 are the bytes, <|endoftext|> and the five image specials
    sit at the ids of cfg.tokens, and up to 256 filler words fill the ids right after
    <|endoftext|> (decode-only: with no merges, encoding never produces them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = cfg.tokens
    specials = {ENDOFTEXT: tok.eos, **dict(zip(IMAGE_SPECIALS, (tok.im_start, tok.im_end,
                                                                 tok.im_patch, tok.im_col,
                                                                 tok.image)))}
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    first_free = tok.eos + 1
    vocab.update({w: first_free + i for i, w in
                  enumerate(_filler_words(max(0, min(tok.im_start, 512) - first_free)))})
    vocab.update(specials)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                  for s in specials])
    for s, i in specials.items():
        if tokenizer.token_to_id(s) != i:
            raise RuntimeError(f"tokenizer placed {s} at {tokenizer.token_to_id(s)}, not {i}")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
        "additional_special_tokens": list(IMAGE_SPECIALS)}, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096}, indent=2) + "\n")


# -- weights -------------------------------------------------------------------------------------

def official_shapes(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor name -> shape for a model of this config (the loader's name table)."""
    import torch

    from molmo_export.checkpoint import build_plan
    from molmo_export.model import MolmoForConditionalGeneration

    with torch.device("meta"):
        model = MolmoForConditionalGeneration(cfg)
    plan, _ = build_plan(cfg, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return {name: entry.shape for name, entry in sorted(plan.items())}


def init_rule(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor by its official name (see the module docstring)."""
    if name.endswith(".bias"):
        return 0.0, 0.05
    if name.endswith(("norm.weight", "ln_f.weight", "pre_ln.weight")):
        return 1.0, 0.1
    if name.endswith(("wte.embedding", "wte.new_embedding", "class_embedding",
                      "positional_embedding", "pad_embed")):
        return 0.0, 0.5
    if name.endswith("patch_embedding.weight"):
        return 0.0, 0.04
    if name.endswith("mlp.gate.weight"):  # MoE router: spread the router logits
        return 0.0, 0.5
    fan_in = shape[-1] if len(shape) > 1 else 1
    scale = 2.0 if "image_projector" in name else 1.0
    return 0.0, scale / math.sqrt(fan_in)


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int = 4,
            shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_random_weights(cfg: MolmoConfig, directory: Path, seed: int = SEED,
                         dtype: Any = None, shard_bytes: int = SHARD_BYTES) -> None:
    """model.safetensors (or shards + index) with official names, `dtype` (default float32),
    drawn per tensor in sorted name order from one seeded generator (in float32, then cast);
    one shard (plus one float32 tensor) in memory at a time."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = official_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    shards = _shards(shapes, itemsize, shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    for names, file in zip(shards, files):
        tensors = {}
        for name in names:
            mean, std = init_rule(name, shapes[name])
            tensors[name] = torch.randn(shapes[name], generator=gen).mul_(std).add_(mean).to(dtype)
            weight_map[name] = file
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(itemsize * math.prod(s) for s in shapes.values())
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def trained_weights(name: str) -> Path:
    """The shipped weights of a trained preset (official names, float32)."""
    return Path(__file__).parent / "weights" / f"{name}.safetensors"


def write_checkpoint(cfg: MolmoConfig, directory: Path, seed: int = SEED,
                     weights: Path | None = None, dtype: Any = None,
                     shard_bytes: int = SHARD_BYTES) -> None:
    """All files of a checkpoint into an existing empty directory: `weights` copied as
    model.safetensors, or random weights drawn from `seed` (in `dtype`, `shard_bytes` shards)."""
    if cfg.text.is_moe:
        (directory / "config.json").write_text(json.dumps(full_config(cfg), indent=2) + "\n")
    else:
        (directory / "config.json").write_text(json.dumps(hub_config(cfg), indent=2) + "\n")
    (directory / "full_config.json").write_text(json.dumps(full_config(cfg), indent=2) + "\n")
    (directory / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(cfg), indent=2) + "\n")
    write_tokenizer(cfg, directory)
    if weights is not None:
        shutil.copyfile(weights, directory / "model.safetensors")
    else:
        write_random_weights(cfg, directory, seed, dtype, shard_bytes)


def gate_record(name: str) -> dict[str, Any] | None:
    """The quality-gate outcomes measured on the shipped weights of trained preset `name`
    (molmo_export/weights/<name>.gates.json), or None. A record names the sha256 of the weights
    it was measured on and is ignored for any other file (tests/export/test_gate_record.py
    keeps it in step with the shipped weights)."""
    if name not in TRAINED_PRESETS:
        return None
    path = trained_weights(name).with_suffix(".gates.json")
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    if record.get("weights_sha256") != _file_digest(trained_weights(name)):
        return None
    return record


def known_gate_failure(model: str, target: str) -> str | None:
    """What to tell the user before the work when `target` is recorded as failing its quality
    gate on built-in preset `model` (None: not recorded as failing)."""
    record = gate_record(model)
    if record is None or record["targets"].get(target, {"passed": True})["passed"]:
        return None
    passing = [t for t, o in record["targets"].items() if o["passed"]]
    return (f"{target} has failed its quality gate on the {model} model's shipped weights "
            f"({record['targets'][target]['summary']}; {record['measured']}), so this export "
            "may stop at the gate and write nothing; --allow-degraded writes the artifact with "
            "the failed report"
            + (f". {', '.join(passing)} passed on this model." if passing else "."))


# -- materialising a preset ----------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preset_version(cfg: MolmoConfig, seed: int = SEED, weights: Path | None = None) -> str:
    """v<format>-<hash of config and seed (or of the shipped weights)>: a changed preset never
    reuses a stale folder."""
    source: Any = _file_digest(weights) if weights is not None else seed
    blob = json.dumps({"config": cfg.to_dict(), "seed": source, "format": FORMAT_VERSION},
                      sort_keys=True).encode()
    return f"v{FORMAT_VERSION}-{hashlib.sha256(blob).hexdigest()[:10]}"


def cache_root() -> Path:
    if os.environ.get("MOLMO_EXPORT_CACHE"):
        return Path(os.environ["MOLMO_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "molmo-export"


def _is_complete(directory: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a 0700 folder: give it (and the files) the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def materialize_preset(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint folder of a built-in preset ("demo", "demo-random", "bench-0.5b"), built
    if absent.

    Default place: <cache>/<name>-<version>/ (cache = $MOLMO_EXPORT_CACHE, else
    $XDG_CACHE_HOME/molmo-export, else ~/.cache/molmo-export). Built in a temporary folder beside
    it and renamed into place, so it is either complete or absent.
    """
    if name not in BUILTIN_PRESETS:
        raise InputError(f"preset {name!r} has no built-in weights; built-in presets: "
                         f"{', '.join(BUILTIN_PRESETS)} (real models: download the "
                         f"checkpoint; known presets: {', '.join(PRESETS)})")
    cfg = get_preset(name)
    weights = trained_weights(name) if name in TRAINED_PRESETS else None
    if weights is not None and not weights.is_file():
        raise InputError(f"the trained weights of preset {name!r} are missing ({weights}); "
                         "reinstall molmo-export")
    version = preset_version(cfg, weights=weights)
    target = Path(directory) if directory is not None else cache_root() / f"{name}-{version}"
    marker = {"preset": name, "version": version}
    if _is_complete(target, marker):
        return target
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and is not a {name} checkpoint of version {version}; "
                         "pass an empty or new directory (nothing in it was changed)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write_checkpoint(cfg, tmp, weights=weights)
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        _make_readable(tmp)
        if target.exists():
            target.rmdir()  # empty (checked above)
        try:
            os.replace(tmp, target)
        except OSError:
            if _is_complete(target, marker):  # another process finished first
                return target
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
