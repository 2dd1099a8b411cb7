"""MolmoE's feed-forward: a top-k mixture of SwiGLU experts (spec §4.4, golden README §8.4).

router logits = x W_r^T; p = softmax(logits) in float32 over all experts; the top-k p are kept
WITHOUT renormalisation; out = sum_k p_k * expert_k(x), expert = down(silu(gate x) * up x).

Computed densely: every expert runs on every token and a probability vector that is zero off
the top-k (topk + scatter) weights them. That is k/E of the FLOPs wasted, but it is a fixed
tensor program (no data-dependent gathers), which is what ONNX/TensorRT export wants.
Weighting the SwiGLU activations before the (linear) down projection lets all experts' down
projections run as one matmul; it equals weighting each expert's output up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molmo_export.config import MolmoTextConfig


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: MolmoTextConfig) -> None:
        super().__init__()
        d, e, i = cfg.hidden_size, cfg.moe_num_experts, cfg.mlp_hidden_size
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(d, e, bias=False)
        # Stacked expert weights (official experts.{e}.{gate,up,down}_proj.weight); the init
        # only matters for models built without a checkpoint (tests).
        self.gate_proj = nn.Parameter(torch.randn(e, i, d) * d**-0.5)
        self.up_proj = nn.Parameter(torch.randn(e, i, d) * d**-0.5)
        self.down_proj = nn.Parameter(torch.randn(e, d, i) * i**-0.5)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> dense weights [N, E]: the top-k softmax probabilities, zero elsewhere."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        return torch.zeros_like(probs).scatter(-1, top_i, top_p).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        e, i, d = self.gate_proj.shape
        w = self.routing_weights(x)  # [N, E]
        gate = (x @ self.gate_proj.reshape(e * i, d).t()).reshape(-1, e, i)  # [N, E, I]
        up = (x @ self.up_proj.reshape(e * i, d).t()).reshape(-1, e, i)
        act = (F.silu(gate) * up) * w[..., None]  # [N, E, I]
        down = self.down_proj.permute(0, 2, 1).reshape(e * i, d)  # [E*I, D]
        return (act.reshape(-1, e * i) @ down).reshape(shape)  # [..., D]
