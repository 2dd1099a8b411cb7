"""The three graphs as torch modules: thin adapters from the reference model to graph_io.

Each adapter owns no weights of its own; it only reshapes the reference model's forward into the
graph's I/O contract (molmo_runtime.graph_io), so the graphs compute exactly what the reference
computes and nothing is patched at export time.
"""

from __future__ import annotations

import torch
from torch import nn

from molmo_export.model import MolmoForConditionalGeneration


class VisionEncoderGraph(nn.Module):
    """images [crops, 576, 588] -> image_features [crops, 576, F]."""

    def __init__(self, model: MolmoForConditionalGeneration) -> None:
        super().__init__()
        self.vision = model.vision

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision(images)


class ConnectorGraph(nn.Module):
    """image_features [crops, 576, F], image_masks [crops, 576] -> image_tokens [crops, 144, D]."""

    def __init__(self, model: MolmoForConditionalGeneration) -> None:
        super().__init__()
        self.connector = model.connector

    def forward(self, image_features: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        return self.connector(image_features, image_masks)


class DecoderGraph(nn.Module):
    """One decoder step over `seq` new positions with the shared-buffer cache convention.

    inputs_embeds [B, seq, D], attention_mask [B, total], position_ids [B, seq],
    *past: k0, v0, k1, v1, ... each [B, kv_heads, cache, head_dim] (only the first
    past = total - seq positions are read) -> logits [B, 1, V], then k_new0, v_new0, ... each
    [B, kv_heads, seq, head_dim].
    """

    varargs_from = 3  # inputs after position_ids arrive as *past

    def __init__(self, model: MolmoForConditionalGeneration) -> None:
        super().__init__()
        self.lm = model.language_model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The whole cache buffers go in; the model reads their valid prefix itself.
        past_kv = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        hidden, new_kv = self.lm.model(inputs_embeds, position_ids, attention_mask, past_kv)
        logits = self.lm.lm_head(hidden[:, -1:])  # [B, 1, V]: the last position only
        return (logits, *(t for kv in new_kv for t in kv))
