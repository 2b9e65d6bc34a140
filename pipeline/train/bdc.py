"""Brownian distance covariance (BDC) and DALIP's multi-head BDC module (MBDC).

BDC (Székely, Rizzo & Bakirov 2007; as a pooling layer: Xie et al., "Joint Distribution Matters: Deep
Brownian Distance Covariance for Few-Shot Classification", CVPR 2022) describes a set of M token
features with d channels by the double-centred matrix of Euclidean distances between its channels:

    â_kl = sqrt(||x_k - x_l||² / (2M) + eps)        x_k ∈ R^M: channel k over the M tokens
    A    = â - mean_rows(â) - mean_cols(â) + mean(â)

which is the form of DALIP's ``BDCovpool`` (github XavierHeart/DALIP, ``src/open_clip/transformer.py``
and ``model.py``: the 1/(2M) scale and the 1e-5 under the root). Its upper triangle is the
second-order representation.

MBDC (Wu et al., "DALIP: Distribution Alignment-based Language-Image Pre-Training for Domain-Specific
Data", 2025, and the same files): the projected tokens go through a linear layer, their channels are
split into ``heads`` groups; in each group the tokens are weighted by the softmax of their cosine
similarity to the group's slice of the pooled token ([CLS] / [EOS]), reduced to ``mbdc_dim`` channels,
dropped out channel-wise and turned into a BDC matrix. The heads' upper triangles are concatenated,
layer-normed, mixed by a square linear layer and projected back to the embedding width.

Differences from the repository, on purpose: the reduction is Linear + LayerNorm + ReLU on both towers
(the repository uses a 1x1 conv + BatchNorm on the image side, whose running statistics would differ
between the two forward passes of the accumulation cache); padding tokens are masked out of the
softmax and M counts the real tokens only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def bdc_matrix(tokens: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """The double-centred channel-distance matrix of each set of tokens.

    Args:
        tokens: [B, M, d] token features (tokens x channels).
        mask: [B, M] bool, True for real tokens; masked tokens must be zero (they add nothing to the
            distances) and are not counted in M. None = all tokens are real.
        eps: Added under the square root (keeps the gradient finite on the diagonal).

    Returns:
        [B, d, d], computed in float32 whatever the autocast dtype (square roots of small numbers).
    """
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x = tokens.float()
        if mask is not None:
            x = x * mask[..., None].float()
            m = mask.float().sum(dim=1).clamp_min(1.0)
        else:
            m = torch.full((x.shape[0],), float(x.shape[1]), device=x.device)
        gram = x.transpose(1, 2) @ x  # [B, d, d]: <x_k, x_l> over tokens
        sq = torch.diagonal(gram, dim1=1, dim2=2)
        dist2 = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min(0.0)
        a = torch.sqrt(dist2 / (2 * m[:, None, None]) + eps)
        return a - a.mean(dim=1, keepdim=True) - a.mean(dim=2, keepdim=True) + a.mean(dim=(1, 2), keepdim=True)


def triu_vector(mat: torch.Tensor) -> torch.Tensor:
    """[B, d, d] symmetric -> [B, d(d+1)/2]: the upper triangle, diagonal included, row by row."""
    d = mat.shape[-1]
    i, j = torch.triu_indices(d, d, device=mat.device)
    return mat[:, i, j]


class MBDC(nn.Module):
    """DALIP's multi-head BDC embedding of one tower's token features.

    Args:
        dim: Width of the (projected) token features and of the output.
        heads: Channel groups; ``dim`` must be divisible by it.
        mbdc_dim: Channels per group after the reduction (None = keep ``dim // heads``).
        dropout: Channel dropout probability before the BDC matrix.
        eps: BDC's epsilon.

    Raises:
        ValueError: ``dim`` is not divisible by ``heads``.
    """

    def __init__(self, dim: int, heads: int = 4, mbdc_dim: Optional[int] = 46, dropout: float = 0.5,
                 eps: float = 1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"train.dalip.heads = {heads} does not divide the embedding width {dim}; "
                             f"use a divisor of {dim}")
        group = dim // heads
        self.heads, self.eps, self.dropout = heads, eps, dropout
        self.fc_in = nn.Linear(dim, dim, bias=False)  # DALIP's fc1
        red = mbdc_dim if mbdc_dim is not None else group
        self.reduce = (nn.Sequential(nn.Linear(group, red, bias=False), nn.LayerNorm(red, eps=1e-7), nn.ReLU())
                       if red != group else nn.Identity())
        n = heads * red * (red + 1) // 2
        self.norm = nn.LayerNorm(n, eps=1e-7)
        self.mix = nn.Linear(n, n)  # DALIP's "down" (a square layer, as in the repository)
        self.fc_out = nn.Linear(n, dim, bias=False)  # DALIP's fc2

    def forward(self, tokens: torch.Tensor, query: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """[B, M, dim] tokens, [B, dim] pooled token, [B, M] mask -> [B, dim] (not normalised)."""
        b, m, dim = tokens.shape
        x = self.fc_in(tokens).view(b, m, self.heads, dim // self.heads)
        q = self.fc_in(query).view(b, 1, self.heads, dim // self.heads)
        sim = F.cosine_similarity(q, x, dim=-1)  # [B, M, heads]
        if mask is not None:
            sim = sim.masked_fill(~mask[..., None], float("-inf"))
        w = torch.softmax(sim.float(), dim=1).to(x.dtype)
        out = []
        for h in range(self.heads):
            g = self.reduce(x[:, :, h, :] * w[:, :, h, None])  # [B, M, red]
            if self.training and self.dropout > 0:
                # whole channels, per sample (DALIP's Dropout2d over [B, C, P, P])
                keep = torch.rand(b, 1, g.shape[-1], device=g.device) >= self.dropout
                g = g * keep.to(g.dtype) / (1 - self.dropout)
            out.append(triu_vector(bdc_matrix(g, mask, self.eps)))
        z = self.norm(torch.cat(out, dim=1).to(tokens.dtype))
        return self.fc_out(self.mix(z))
