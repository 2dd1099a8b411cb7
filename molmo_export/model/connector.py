"""The connector (vision -> LLM), spec §3.

image_features [crops, 576, F], image_masks [crops, 576] -> image_tokens [crops, 144, D]:
pad embeddings chosen by image_masks, 2x2 attention-meanq pooling, SwiGLU projector.
Written with reshape/transpose and no data-dependent Python control flow, for export.
"""

from __future__ import annotations

import torch
from torch import nn

from molmo_export.config import MolmoConfig
from molmo_export.model.layers import SwiGLU
from molmo_export.model.vision import VisionAttention


class MolmoConnector(nn.Module):
    def __init__(self, cfg: MolmoConfig) -> None:
        super().__init__()
        p, v = cfg.pooling, cfg.vision
        self.grid = v.grid_size  # 24
        self.pool_h, self.pool_w = p.pool_h, p.pool_w
        # pad_embed[0]: patches that are all padding (mask == 0); [1]: partly padding (mask < 1,
        # including the -1 rows of the processor's shifted mask, spec §6.7).
        self.pad_embed = nn.Parameter(torch.zeros(2, v.feature_dim))
        self.pool = VisionAttention(v.feature_dim, p.num_heads, p.head_dim, p.hidden_size)
        # official image_projector: w1 = gate, w3 = up, w2 = down
        self.projector = SwiGLU(p.hidden_size, p.projector_hidden_size, cfg.text.hidden_size)

    def add_pad_embed(self, features: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """[N, 576, F] + pad_embed selected by image_masks [N, 576]."""
        all_pad = image_masks == 0
        partial_pad = (image_masks < 1) & ~all_pad
        dtype = features.dtype
        features = features + self.pad_embed[0].to(dtype) * all_pad.to(dtype)[..., None]
        return features + self.pad_embed[1].to(dtype) * partial_pad.to(dtype)[..., None]

    def pooled(self, image_features: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """[N, 576, F], [N, 576] -> [N, 144, pool hidden]: pad embeddings + 2x2 pooling.

        Windows are enumerated row-major over the 12x12 pooled grid; inside a window the four
        patches are ordered (0,0), (0,1), (1,0), (1,1). The query is their mean.
        """
        x = self.add_pad_embed(image_features, image_masks)
        n, _, f = x.shape
        g, ph, pw = self.grid, self.pool_h, self.pool_w
        x = x.reshape(n, g // ph, ph, g // pw, pw, f)  # [N, 12, 2, 12, 2, F]
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ph * pw, f)  # [N*144, 4, F]
        query = x.mean(dim=-2, keepdim=True)  # [N*144, 1, F]
        pooled = self.pool(query, x)  # [N*144, 1, hidden]
        return pooled.reshape(n, (g // ph) * (g // pw), -1)  # [N, 144, hidden]

    def forward(self, image_features: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        return self.projector(self.pooled(image_features, image_masks))  # [N, 144, D]
