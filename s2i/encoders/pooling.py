"""Pooling a padded sequence of frames ``(B, T, C)`` into one vector per utterance, ignoring padding.

The seed's vectorial self-attention let padded frames take part in the softmax, so an utterance's
embedding depended on the longest utterance in its batch (seed-spec §7.1). Here every pooling takes
a ``lengths`` vector and padded frames get exactly zero weight.
"""
from __future__ import annotations

import torch
from torch import nn


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(B, max_len)`` bool mask, True on the first ``lengths[b]`` frames of row ``b``."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class AttentionPooling(nn.Module):
    """Vectorial self-attention (Merkx et al. 2019): one softmax over time *per feature dimension*.

    ``alpha = softmax_t(W2 tanh(W1 h_t + b1) + b2)`` with ``W1: C -> hidden``, ``W2: hidden -> C``;
    output ``sum_t alpha_t * h_t``. With ``heads > 1`` the heads' outputs are concatenated
    (``out_dim = C * heads``). Both layers are orthogonally initialised (the seed initialised the first
    one twice and left the second at PyTorch's default).
    """

    def __init__(self, in_dim: int, hidden: int = 128, heads: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, in_dim)) for _ in range(heads))
        for head in self.heads:
            for layer in (head[0], head[2]):
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.out_dim = in_dim * heads

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``frames (B, T, C)``, ``lengths (B,)`` -> ``(B, C * heads)``."""
        pad = ~length_mask(lengths, frames.shape[1])[:, :, None]
        pooled = []
        for head in self.heads:
            scores = head(frames).float().masked_fill(pad, float("-inf"))
            alpha = torch.softmax(scores, dim=1).to(frames.dtype)
            pooled.append((alpha * frames).sum(dim=1))
        return torch.cat(pooled, dim=-1)


class MeanPooling(nn.Module):
    """The mean over valid frames (ResDAVEnet's pooling)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_dim = in_dim

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = length_mask(lengths, frames.shape[1])[:, :, None].to(frames.dtype)
        return (frames * mask).sum(dim=1) / lengths.clamp(min=1)[:, None].to(frames.dtype)


def build_pooling(kind: str, in_dim: int, hidden: int = 128, heads: int = 1) -> nn.Module:
    """``"attention"`` or ``"mean"``; the module's ``out_dim`` says the pooled size."""
    if kind == "attention":
        return AttentionPooling(in_dim, hidden, heads)
    if kind == "mean":
        return MeanPooling(in_dim)
    from s2i.config import ConfigError

    raise ConfigError(f"unknown pooling {kind!r}; choose 'attention' or 'mean'")
