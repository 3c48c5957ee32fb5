"""RMSNorm and rotary position embeddings, numerically as Hugging Face's Mixtral computes them.

Shapes: N tokens in this step (packed, no padding), D hidden, H query heads, K kv heads,
Dh head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, D)
        """HF's `weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)` with h = x in fp32; the
        normalisation is PyTorch's fused `rms_norm` (one kernel, equal results here)."""
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `positions` (N,) -> two (N, Dh) tensors, computed in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))                   # (Dh/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]               # (N, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)                              # (N, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, heads, Dh) by the (N, Dh) tables (the 'rotate half' layout of HF
    Llama/Mixtral)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)         # (N, heads, Dh)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
