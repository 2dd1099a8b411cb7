"""MolmoForConditionalGeneration: vision tower + connector + decoder (spec §5).

    ids ──► embed_tokens ─────────────────────────────────┐
    images ─► MolmoVisionModel ─► MolmoConnector ─► + at image_input_idx ─► MolmoForCausalLM
                [crops,576,F]        [crops,144,D]    (ADDED to the <im_patch> embeddings)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from molmo_export.config import MolmoConfig
from molmo_export.model.connector import MolmoConnector
from molmo_export.model.text import KV, MolmoForCausalLM
from molmo_export.model.vision import MolmoVisionModel
from molmo_runtime.errors import InputError


@dataclass
class MolmoOutput:
    logits: torch.Tensor  # [B, T, V] ([B, 1, V] with last_only)
    past_key_values: list[KV]  # per layer (k, v) of the T tokens, [B, n_kv, T, hd]
    hidden: torch.Tensor  # [B, T, D] after the final norm
    inputs_embeds: torch.Tensor  # [B, T, D] token embeddings + image tokens
    image_features: torch.Tensor | None = None  # [B, crops, 576, F] vision tower output
    image_tokens: torch.Tensor | None = None  # [B, crops, 144, D] connector output


def default_mask_and_positions(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the official code: mask = ids != -1, positions = clamp(cumsum(mask) - 1, 0)."""
    mask = input_ids != -1
    positions = torch.clamp(torch.cumsum(mask.long(), dim=-1) - 1, min=0)
    return mask.long(), positions


class MolmoForConditionalGeneration(nn.Module):
    def __init__(self, cfg: MolmoConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision = MolmoVisionModel(cfg)
        self.connector = MolmoConnector(cfg)
        self.language_model = MolmoForCausalLM(cfg)
        self.load_report: Any = None  # set by from_pretrained (molmo_export.checkpoint.LoadReport)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        dtype: torch.dtype = torch.float32) -> MolmoForConditionalGeneration:
        """Load an official hub checkpoint folder (or the name of a random-weight preset such as
        "demo", materialised on first use). See molmo_export.checkpoint."""
        from molmo_export.checkpoint import load_pretrained

        return load_pretrained(cls, directory, dtype)

    # -- pieces ---------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor, image_masks: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, crops, 576, 588], image_masks [B, crops, 576] ->
        (image_features [B, crops, 576, F], image_tokens [B, crops, 144, D])."""
        b, n = images.shape[:2]
        features = self.vision(images.reshape(b * n, *images.shape[2:]))
        tokens = self.connector(features, image_masks.reshape(b * n, -1).to(features.dtype))
        return (features.reshape(b, n, *features.shape[1:]),
                tokens.reshape(b, n, *tokens.shape[1:]))

    @staticmethod
    def add_image_tokens(embeds: torch.Tensor, image_tokens: torch.Tensor,
                         image_input_idx: torch.Tensor) -> torch.Tensor:
        """embeds [B, T, D] + image_tokens [B, crops, 144, D] ADDED at image_input_idx
        [B, crops, 144] (negative = dropped), per batch row, by scatter-add."""
        b, t, d = embeds.shape
        idx = image_input_idx.reshape(b, -1).long()  # [B, M]
        tokens = image_tokens.reshape(b, -1, d).to(embeds.dtype)  # [B, M, D]
        if idx.shape[1] != tokens.shape[1]:
            raise InputError(f"image_input_idx has {idx.shape[1]} entries per row but the images "
                             f"give {tokens.shape[1]} image tokens; pass the processor's "
                             "image_input_idx for these images")
        if idx.numel() and int(idx.max()) >= t:
            raise InputError(f"image_input_idx points at position {int(idx.max())} but the "
                             f"sequence has {t} tokens; image_input_idx and input_ids must come "
                             "from the same processor call")
        # Negative indices go to an extra dummy row that is cut off afterwards.
        safe = torch.where(idx >= 0, idx, t)  # [B, M]
        padded = torch.cat((embeds, embeds.new_zeros(b, 1, d)), dim=1)  # [B, T+1, D]
        padded = padded.scatter_add(1, safe[..., None].expand(-1, -1, d), tokens)
        return padded[:, :t]

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                     image_masks: torch.Tensor | None = None,
                     image_input_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings + image tokens at image_input_idx -> inputs_embeds [B, T, D]."""
        return self._embed(input_ids, images, image_masks, image_input_idx)[0]

    def _embed(self, input_ids: torch.Tensor, images: torch.Tensor | None,
               image_masks: torch.Tensor | None, image_input_idx: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        embeds = self.language_model.model.embed(input_ids)
        if images is None:
            return embeds, None, None
        if image_masks is None or image_input_idx is None:
            raise InputError("images were given without image_masks and image_input_idx; pass "
                             "all three as the processor returns them")
        features, tokens = self.encode_images(images.to(embeds.dtype), image_masks)
        return self.add_image_tokens(embeds, tokens, image_input_idx), features, tokens

    # -- forward / generate ---------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                image_masks: torch.Tensor | None = None,
                image_input_idx: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                last_only: bool = False) -> MolmoOutput:
        """Full prefill. input_ids [B, T] (may hold -1 padding); mask and positions default as
        in the official code (mask = ids != -1, positions = clamp(cumsum(mask) - 1, 0))."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}"
                             "; add the batch axis (ids[None])")
        default_mask, default_positions = default_mask_and_positions(input_ids)
        mask = default_mask if attention_mask is None else attention_mask
        positions = default_positions if position_ids is None else position_ids
        embeds, features, tokens = self._embed(input_ids, images, image_masks, image_input_idx)
        hidden, new_kv = self.language_model.model(embeds, positions, mask)
        logits = self.language_model.lm_head(hidden[:, -1:] if last_only else hidden)
        return MolmoOutput(logits=logits, past_key_values=new_kv, hidden=hidden,
                           inputs_embeds=embeds, image_features=features, image_tokens=tokens)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                 image_masks: torch.Tensor | None = None,
                 image_input_idx: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """-> [B, T + N] (the prompt, then up to max_new_tokens ids). See generation.py."""
        from molmo_export.model.generation import generate

        return generate(self, input_ids, images, image_masks, image_input_idx,
                        max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, seed=seed, generator=generator)
