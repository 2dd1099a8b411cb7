"""MolmoProcessor (prompt + image -> model inputs) and MolmoTokenizer, without torch.

Reproduces the official hub ``MolmoProcessor.process(images=[img], text=prompt)``:

    input_ids = [BOS] + image token block + encode(" User: " + prompt + " Assistant:")

* BOS: the tokenizer's ``bos_token`` if it has one, else its EOS (Qwen2/OLMo tokenizers have no
  BOS; the official code uses ``bos_token_id or eos_token_id``).
* The image block comes first (``<|image|>`` is not used); ``image_input_idx`` is shifted by one
  for the BOS. Text is encoded without special tokens.
* Special ids are found the official way: encoding ``"<im_start><im_end><im_patch><im_col>
  <|image|>"`` (no spaces) must give exactly five ids.

The tokenizer is built with the ``tokenizers`` library from ``tokenizer.json``, or, where a
checkpoint only ships ``vocab.json`` + ``merges.txt`` (like ../shared/golden/tokenizer), from
those plus the added tokens of ``tokenizer_config.json`` / ``added_tokens.json``, with the
pre-tokenizer of the declared ``tokenizer_class`` (Qwen2: NFC, Qwen's split regex, byte level).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molmo_runtime.errors import ArtifactError, InputError
from molmo_runtime.fileio import atomic_open, write_json_atomic
from molmo_runtime.image_io import ImageSource
from molmo_runtime.image_processing import CropPlan, ImageTokenIds, MolmoImageProcessor
from molmo_runtime.manifest import Manifest

IMAGE_SPECIAL_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
PROCESSOR_JSON = "processor.json"
TOKENIZER_DIR = "tokenizer"
# Files that make up a tokenizer directory, in the order they are looked for.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
HUB_PREPROCESSOR_JSON = "preprocessor_config.json"

# Qwen2's pre-tokenization regex (transformers' Qwen2 tokenizer / its fast converter).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


class TokenizerNotFoundError(ArtifactError, FileNotFoundError):
    """A directory has no tokenizer files (an artifact can then run from token ids only)."""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the processor and the generation loop need."""

    im_start: int
    im_end: int
    im_patch: int
    im_col: int
    image: int  # <|image|>: registered but unused by the official processor
    bos: int  # prepended to every prompt
    eos: int  # generation stops here

    @property
    def image_ids(self) -> ImageTokenIds:
        return ImageTokenIds(self.im_start, self.im_end, self.im_patch, self.im_col)

    def to_dict(self) -> dict[str, int]:
        return {"im_start": self.im_start, "im_end": self.im_end, "im_patch": self.im_patch,
                "im_col": self.im_col, "image": self.image, "bos": self.bos, "eos": self.eos}


def _token_content(value: Any) -> str | None:
    """A special token entry of tokenizer_config/special_tokens_map: a string or {content: ..}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read JSON ({e}); re-copy the tokenizer files") from e


class MolmoTokenizer:
    """A ``tokenizers.Tokenizer`` plus the few facts Molmo needs (EOS/BOS, special ids)."""

    def __init__(self, tokenizer: Any, eos_token: str, bos_token: str | None = None,
                 source: Path | None = None, config: dict[str, Any] | None = None,
                 special_map: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.source = source
        self.config = dict(config or {})  # tokenizer_config.json as loaded (kept on save)
        self.special_map = dict(special_map or {})  # special_tokens_map.json as loaded
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ArtifactError(f"tokenizer{self._where}: eos token {eos_token!r} is not in the "
                                "vocabulary")
        bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        ids = self.encode("".join(IMAGE_SPECIAL_TOKENS))
        if len(ids) != len(IMAGE_SPECIAL_TOKENS):
            raise ArtifactError(
                f"tokenizer{self._where} does not encode the Molmo image tokens "
                f"{IMAGE_SPECIAL_TOKENS} as single tokens (got {len(ids)} ids); this is not a "
                "Molmo tokenizer or its added tokens are missing")
        # The official processor: bos_token_id or eos_token_id (a falsy id 0 also falls back).
        im_start, im_end, im_patch, im_col, image = ids
        self.special = SpecialTokens(im_start, im_end, im_patch, im_col, image,
                                     bos=bos_id or eos_id, eos=eos_id)

    @property
    def _where(self) -> str:
        return f" at {self.source}" if self.source else ""

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str],
                 listed: frozenset[str] | None = None) -> MolmoTokenizer:
        """Load from a directory with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``
        (+ ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``).

        ``listed``: the only file names that may be read (an artifact's manifest lists them);
        any other file in the directory is treated as absent and never opened."""
        d = Path(directory)

        def has(name: str) -> bool:
            return (listed is None or name in listed) and (d / name).is_file()

        config = _read_json(d / "tokenizer_config.json") if has("tokenizer_config.json") else {}
        special_map = _read_json(d / "special_tokens_map.json") \
            if has("special_tokens_map.json") else {}
        if has("tokenizer.json"):
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise ArtifactError(f"{d / 'tokenizer.json'}: cannot load ({e}); re-copy it from "
                                    "the checkpoint") from e
        elif has("vocab.json") and has("merges.txt"):
            tok = _bpe_from_vocab_merges(d, config)
        else:
            raise TokenizerNotFoundError(
                f"{d}: no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt); "
                "pass a checkpoint dir, an artifact dir or a tokenizer dir")
        added_json = _read_json(d / "added_tokens.json") if has("added_tokens.json") else {}
        _add_missing_tokens(tok, _added_tokens(added_json, config, special_map))
        eos = _token_content(config.get("eos_token")) or _token_content(
            special_map.get("eos_token"))
        if eos is None:
            if tok.token_to_id("<|endoftext|>") is None:
                raise ArtifactError(f"{d}: no eos_token in tokenizer_config.json or "
                                    "special_tokens_map.json")
            eos = "<|endoftext|>"
        bos = _token_content(config.get("bos_token")) or _token_content(
            special_map.get("bos_token"))
        return cls(tok, eos, bos, d, config, special_map)

    # --- use -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added (added tokens still match)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def tokens(self, text: str) -> list[str]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (EOS, image tokens, ...) dropped by default."""
        clean = [int(i) for i in ids if int(i) >= 0]  # -1 is batch padding
        return str(self.tokenizer.decode(clean, skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write a Hugging Face style tokenizer dir, each file atomically: ``tokenizer.json``
        (complete, incl. added tokens: loads fast, no vocab/merges needed),
        ``tokenizer_config.json`` and ``special_tokens_map.json`` (as loaded, EOS/BOS set)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_open(d / "tokenizer.json", "w") as f:
            f.write(self.tokenizer.to_str())
        config = {**self.config, "eos_token": self.eos_token, "bos_token": self.bos_token}
        write_json_atomic(d / "tokenizer_config.json", config)
        special_map = {**self.special_map, "eos_token": self.eos_token}
        if self.bos_token:
            special_map["bos_token"] = self.bos_token
        write_json_atomic(d / "special_tokens_map.json", special_map)


def _added_tokens(added_json: Any, config: dict[str, Any],
                  special_map: dict[str, Any]) -> list[tuple[int, str, bool, dict[str, Any]]]:
    """(id, content, special, flags) of every added token declared beside the vocabulary."""
    out: dict[int, tuple[int, str, bool, dict[str, Any]]] = {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            content = _token_content(entry)
            if content is None:
                continue
            out[int(key)] = (int(key), content, bool(entry.get("special", True)), entry)
    if isinstance(added_json, dict) and added_json:
        declared_special = {c for v in special_map.values()
                            for c in ([_token_content(x) for x in v] if isinstance(v, list)
                                      else [_token_content(v)]) if c}
        for content, token_id in added_json.items():
            if int(token_id) not in out:
                special = content in declared_special or content in IMAGE_SPECIAL_TOKENS
                out[int(token_id)] = (int(token_id), content, special, {})
    return [out[k] for k in sorted(out)]


def _bpe_from_vocab_merges(d: Path, config: dict[str, Any]) -> Any:
    """A byte-level BPE from vocab.json + merges.txt, like transformers' converters."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    kind = str(config.get("tokenizer_class", "Qwen2Tokenizer"))
    try:
        vocab, merges = models.BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
    except Exception as e:
        raise ArtifactError(f"{d}: cannot read vocab.json/merges.txt ({e})") from e
    if kind.startswith("Qwen2"):
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif kind.startswith("GPT2"):
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=bool(config.get("add_prefix_space", False)))
    else:
        raise ArtifactError(
            f"{d}: tokenizer_class {kind!r} has no tokenizer.json and is not a byte-level BPE "
            "this runtime can rebuild (Qwen2Tokenizer, GPT2Tokenizer); copy the checkpoint's "
            "tokenizer.json into the directory")
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_missing_tokens(tok: Any, added: Sequence[tuple[int, str, bool, dict[str, Any]]]) -> None:
    """Register added tokens the tokenizer lacks, with their declared ids.

    ``tokenizers`` numbers new added tokens from the current vocabulary size up, in order; a
    declared id that does not come out is refused (it would silently shift the image-token
    ids)."""
    from tokenizers import AddedToken

    missing = []
    for token_id, content, special, flags in added:
        have = tok.token_to_id(content)
        if have is None:
            missing.append((token_id, content, special, flags))
        elif have != token_id:
            raise ArtifactError(f"tokenizer: {content!r} has id {have} but the config declares "
                                f"{token_id}")
    # Consecutive tokens of the same kind go in one call (each call rebuilds the matcher).
    batch: list[tuple[int, str, bool, dict[str, Any]]] = []
    for i, entry in enumerate(missing):
        batch.append(entry)
        if i + 1 < len(missing) and missing[i + 1][2] == entry[2]:
            continue
        tokens = [AddedToken(c, single_word=bool(f.get("single_word", False)),
                             lstrip=bool(f.get("lstrip", False)),
                             rstrip=bool(f.get("rstrip", False)),
                             normalized=bool(f.get("normalized", not sp)), special=sp)
                  for _, c, sp, f in batch]
        if batch[0][2]:
            tok.add_special_tokens(tokens)
        else:
            tok.add_tokens(tokens)
        for token_id, content, _, _ in batch:
            got = tok.token_to_id(content)
            if got != token_id:
                raise ArtifactError(
                    f"tokenizer: added token {content!r} got id {got}, the config declares "
                    f"{token_id} (added tokens must follow the vocabulary without gaps); "
                    "provide a tokenizer.json")
        batch = []


# --- the processor -----------------------------------------------------------------------------

class MolmoProcessor:
    """Prompt + image -> the model's input arrays (numpy), and generated ids -> text.

    >>> proc = MolmoProcessor.from_pretrained(artifact_dir)
    >>> inputs = proc(images="photo.jpg", text="Describe this image.")
    >>> inputs["input_ids"].shape, inputs["images"].shape   # [L], [crops, 576, 588]
    """

    def __init__(self, tokenizer: MolmoTokenizer, image_processor: MolmoImageProcessor | None = None,
                 message_format: str = "role", always_start_with_space: bool = True):
        if message_format not in ("role", "none"):
            raise InputError(f"message_format must be 'role' or 'none', got {message_format!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor or MolmoImageProcessor()
        self.message_format = message_format
        self.always_start_with_space = always_start_with_space
        self._variants: dict[int, MolmoImageProcessor] = {}  # per max_crops override

    @property
    def special_tokens(self) -> SpecialTokens:
        return self.tokenizer.special

    @property
    def max_crops(self) -> int:
        return self.image_processor.max_crops

    # --- loading / saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, max_crops: int | None = None,
                        resize_method: str | None = None) -> MolmoProcessor:
        """Load from an artifact dir (``tokenizer/`` + ``processor.json``), a checkpoint dir
        (tokenizer files + ``preprocessor_config.json`` at the top) or a bare tokenizer dir
        (default image settings). ``max_crops`` / ``resize_method`` override the stored ones."""
        d = Path(directory)
        if not d.is_dir():
            raise InputError(f"{d}: not a directory; pass a checkpoint, artifact or tokenizer dir")
        tok_dir = d / TOKENIZER_DIR if (d / TOKENIZER_DIR).is_dir() else d
        tokenizer = MolmoTokenizer.from_dir(tok_dir)
        stored = _read_json(d / PROCESSOR_JSON) if (d / PROCESSOR_JSON).is_file() else None
        hub = _read_json(d / HUB_PREPROCESSOR_JSON) \
            if stored is None and (d / HUB_PREPROCESSOR_JSON).is_file() else None
        return cls._assemble(tokenizer, stored, hub, max_crops, resize_method)

    @classmethod
    def from_artifact(cls, manifest: Manifest, *, max_crops: int | None = None,
                      resize_method: str | None = None) -> MolmoProcessor:
        """Load from an opened artifact, reading only the files its manifest lists
        (``tokenizer/*`` and ``processor.json``); an unlisted file there is never opened."""
        listed = manifest.listed_under(TOKENIZER_DIR)
        for name in listed:
            manifest.path(f"{TOKENIZER_DIR}/{name}")  # resolves inside the artifact, or refuses
        tokenizer = MolmoTokenizer.from_dir(manifest.directory / TOKENIZER_DIR, listed=listed)
        stored = _read_json(manifest.path(PROCESSOR_JSON))
        return cls._assemble(tokenizer, stored, None, max_crops, resize_method)

    @classmethod
    def _assemble(cls, tokenizer: MolmoTokenizer, stored: Any, hub: Any,
                  max_crops: int | None, resize_method: str | None) -> MolmoProcessor:
        """stored: processor.json as read (or None); hub: a checkpoint's
        preprocessor_config.json (or None)."""
        settings: dict[str, Any] = {}
        prompt: dict[str, Any] = {}
        if stored is not None:
            if not isinstance(stored, dict):
                raise ArtifactError(f"{PROCESSOR_JSON} is not a JSON object; re-export")
            settings = dict(stored.get("image_processor", stored))
            prompt = dict(stored.get("prompt", {}))
        elif isinstance(hub, dict):
            settings = hub
        with warnings.catch_warnings():
            if stored is None:  # hub files carry unrelated keys
                warnings.simplefilter("ignore")
            image_processor = MolmoImageProcessor.from_dict(
                settings, max_crops=max_crops, resize_method=resize_method)
        return cls(tokenizer, image_processor, **prompt)

    def to_dict(self) -> dict[str, Any]:
        """The content of processor.json."""
        return {"processor_class": "MolmoProcessor", "schema_version": 1,
                "image_processor": self.image_processor.to_dict(),
                "prompt": {"message_format": self.message_format,
                           "always_start_with_space": self.always_start_with_space},
                "special_tokens": self.special_tokens.to_dict()}

    def save_to_artifact(self, artifact_dir: str | os.PathLike[str]) -> None:
        """Write ``tokenizer/`` and ``processor.json`` into an artifact directory.

        Every file is written atomically (temporary file + rename): an interrupted save never
        leaves a truncated file, and nothing else in the directory is touched. ``tokenizer/``
        gets a complete ``tokenizer.json`` plus the tokenizer's config files."""
        d = Path(artifact_dir)
        self.tokenizer.save(d / TOKENIZER_DIR)
        write_json_atomic(d / PROCESSOR_JSON, self.to_dict())

    # --- text ----------------------------------------------------------------------------------

    def format_prompt(self, prompt: str | None) -> str:
        """The text the official processor encodes: ``" User: {prompt} Assistant:"``."""
        text = "" if prompt is None else str(prompt)
        if self.message_format == "role":
            text = "User: " + text + " Assistant:"
        if self.always_start_with_space:
            text = " " + text
        return text

    def text_tokens(self, prompt: str | None) -> list[int]:
        return self.tokenizer.encode(self.format_prompt(prompt))

    def decode(self, ids: Iterable[int]) -> str:
        """Generated ids -> text, special tokens stripped (as ``skip_special_tokens=True``)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- counting (limit checks before any pixel work) -----------------------------------------

    def num_image_tokens(self, height: int, width: int, max_crops: int | None = None) -> int:
        """Image tokens for an image of ``height`` x ``width`` (160 + R*(C+1))."""
        return self._image_processor(max_crops).num_image_tokens(height, width)

    def num_prompt_tokens(self, text: str | None, image_size: tuple[int, int] | None = None,
                          max_crops: int | None = None) -> int:
        """Length of ``input_ids`` for this prompt and an image of ``image_size`` (H, W), or no
        image; computed without touching pixels."""
        n = 1 + len(self.text_tokens(text))
        if image_size is not None:
            n += self.num_image_tokens(*image_size, max_crops=max_crops)
        return n

    def _image_processor(self, max_crops: int | None) -> MolmoImageProcessor:
        if max_crops is None or max_crops == self.image_processor.max_crops:
            return self.image_processor
        variant = self._variants.get(max_crops)
        if variant is None or variant.replace(max_crops=self.max_crops) != self.image_processor:
            variant = self._variants[max_crops] = self.image_processor.replace(
                max_crops=max_crops)  # kept: its scratch buffers are reused by later calls
        return variant

    # --- the call ------------------------------------------------------------------------------

    def __call__(self, images: ImageSource | Sequence[ImageSource] | None = None,
                 text: str | None = None, *, max_crops: int | None = None) -> dict[str, np.ndarray]:
        """Model inputs for one prompt and at most one image.

        Returns ``input_ids`` [L] int64 and, with an image, ``images`` [crops, 576, 588] float32,
        ``image_input_idx`` [crops, 144] int32 (-100: dropped feature) and ``image_masks``
        [crops, 576] float32. ``max_crops`` overrides the processor's setting for this call.
        """
        text_ids = np.asarray(self.text_tokens(text), dtype=np.int64)
        bos = np.asarray([self.special_tokens.bos], dtype=np.int64)
        image = _single_image(images)
        if image is None:
            return {"input_ids": np.concatenate([bos, text_ids])}
        proc = self._image_processor(max_crops)
        out = proc.preprocess(image)
        plan: CropPlan = out["plan"]
        block = proc.image_tokens(plan, self.special_tokens.image_ids)
        idx = out["image_input_idx"]
        result = {
            "input_ids": np.concatenate([bos, block, text_ids]),
            "images": out["images"],
            # Positions move by one for the BOS; negative (dropped) entries stay.
            "image_input_idx": np.where(idx < 0, idx, idx + 1).astype(np.int32),
        }
        if "image_masks" in out:
            result["image_masks"] = out["image_masks"]
        return result

    process = __call__


def _single_image(images: Any) -> Any:
    if images is None:
        return None
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            return None
        if len(images) > 1:
            raise InputError(f"got {len(images)} images; Molmo 0924 models take one image per "
                             "prompt (the official processor puts every image at the start and "
                             "mis-indexes the later ones)")
        return images[0]
    return images


__all__ = ["IMAGE_SPECIAL_TOKENS", "MolmoProcessor", "MolmoTokenizer", "SpecialTokens",
           "TokenizerNotFoundError"]
