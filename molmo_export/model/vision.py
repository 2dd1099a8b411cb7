"""The vision tower: CLIP ViT-L/14-336 as Molmo runs it (spec §2).

images [crops, 576, 588] -> image_features [crops, 576, F], F = hidden * len(vit_layers):
patch embedding (Linear, no bias) -> class token -> positional embedding -> pre-LN -> pre-norm
residual blocks; the outputs of the blocks named by vit_layers are concatenated in that order,
the class token is dropped and crops made only of -1 (batch padding) are zeroed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molmo_export.config import MolmoConfig, MolmoVisionConfig
from molmo_export.model.layers import merge_heads, split_heads


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biased wq/wk/wv/wo (also used by the pooling).

    Uses F.scaled_dot_product_attention in float32, as the official code does: with no mask and
    equal q/kv heads it exports as plain MatMul/Softmax (both torch.onnx exporters, opset 18),
    and on CPU it runs the same kernel as the official code, so vision features and connector
    output match the golden data bit for bit (plain matmul/softmax differs by a few ulp).
    """

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.wq = nn.Linear(in_dim, inner)
        self.wk = nn.Linear(in_dim, inner)
        self.wv = nn.Linear(in_dim, inner)
        self.wo = nn.Linear(inner, out_dim)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.wq(x_q), self.num_heads)  # [N, H, Tq, hd]
        k = split_heads(self.wk(x_kv), self.num_heads)  # [N, H, Tk, hd]
        v = split_heads(self.wv(x_kv), self.num_heads)
        out = F.scaled_dot_product_attention(q.float().contiguous(), k.float().contiguous(),
                                             v.float().contiguous())  # [N, H, Tq, hd]
        return self.wo(merge_heads(out.to(x_q.dtype)))  # [N, Tq, out]


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x)); LayerNorms with bias."""

    def __init__(self, cfg: MolmoVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(d, cfg.num_heads, cfg.head_dim, d)
        self.mlp_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(d, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.mlp_norm(x))


class MolmoVisionModel(nn.Module):
    """images [crops, 576, 588] f32 -> image_features [crops, 576, F].

    Holds all `num_layers` blocks (the checkpoint has them; the parameter count is the real
    model's) but runs only the first `blocks_to_run`: blocks after the deepest selected one
    cannot change the output (7B: block 22 is skipped, spec §2.2).
    """

    def __init__(self, cfg: MolmoConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.patch_embed = nn.Linear(v.patch_dim, v.hidden_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(v.hidden_size))
        self.positional_embedding = nn.Parameter(torch.zeros(v.num_positions, v.hidden_size))
        self.pre_ln = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.num_layers))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[crops, 576, 588] -> [crops, 577, hidden]: the input of block 0 (after pre_ln)."""
        x = self.patch_embed(images)  # [N, 576, d]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, d]
        x = torch.cat((cls, x), dim=1)  # [N, 577, d]
        x = x + self.positional_embedding.to(x.dtype)
        return self.pre_ln(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        outputs = []
        for block in self.blocks[: self.cfg.blocks_to_run]:
            x = block(x)
            outputs.append(x)
        features = torch.cat([outputs[i] for i in self.cfg.selected_blocks], dim=-1)  # [N, 577, F]
        features = features[:, 1:]  # drop the class token -> [N, 576, F]
        # Batch-padding crops (every pixel -1) get zero features (official encode_image).
        is_real = ~torch.all(torch.all(images == -1, dim=2), dim=1)  # [N]
        return features * is_real[:, None, None].to(features.dtype)
