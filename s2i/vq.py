"""Vector quantisation with an exponential-moving-average (EMA) codebook: the layer that turns a
speech encoder's frames into discrete units (ResDAVEnet-VQ, Merkx et al.'s LSTM-VQ).

Each frame ``x_t`` is replaced by its nearest codebook vector ``e_k``. The codebook is not trained by
gradient descent: after every training batch each code moves towards the mean of the frames assigned
to it (``N_k <- d N_k + (1-d) n_k``, ``m_k <- d m_k + (1-d) sum x``, ``e_k = m_k / N_k`` with Laplace
smoothing of ``N``). The encoder is pulled towards its codes by the commitment loss
``w * ||x - sg(e)||^2`` and receives gradients through the straight-through estimator.

Why a small module of our own rather than ``vector_quantize_pytorch.VectorQuantize`` (evaluated, v1.32;
it has EMA, masks, k-means init, dead-code expiry and codebook sync): its ~60 options and version-
dependent defaults (decay 0.8, rotation trick, buffer layout ``_codebook.embed (1, K, D)``) would tie
our checkpoints' tensor names to a third-party's internals; it has no temporal jitter; and this file is
meant to be read by researchers in one sitting. What the seed got wrong and this fixes (seed-spec §7.3):
the codebook lives in **buffers updated in place under no_grad** (the seed re-created ``nn.Parameter``
objects every step), padded frames are excluded from every statistic, dead codes are re-initialised,
and usage/perplexity are reported. Under ``torch.distributed`` the per-batch statistics are all-reduced
(and data-dependent initialisations broadcast from rank 0) so every replica keeps the same codebook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class VQOutput:
    quantized: torch.Tensor  # (B, T, D): straight-through codes, zero at padded frames
    codes: torch.Tensor  # (B, T) long: code index per frame, -1 at padded frames
    loss: torch.Tensor  # scalar: commitment loss (already weighted)
    perplexity: torch.Tensor  # scalar: exp(entropy) of this batch's code distribution
    usage: torch.Tensor  # scalar: fraction of codes used by this batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """EMA vector quantiser over ``(B, T, dim)`` frames with a ``(B, T)`` validity mask.

    Args:
        dim: frame size. codebook_size: number of codes K.
        decay: EMA decay of the codebook statistics. eps: Laplace smoothing of the cluster sizes.
        commitment_weight: weight of ``||x - sg(e)||^2`` (the seed: 0.25; ResDAVEnet-VQ: 1.0).
        jitter: training only: probability that a frame's output is replaced by its left or right
            neighbour's (each half as likely; ResDAVEnet-VQ used 0.12), never crossing the padding.
        dead_code_threshold: after each update, codes whose EMA count fell below this are moved onto
            random valid frames of the current batch (0 = never).
        kmeans_init: initialise the codebook by k-means on the first training batch instead of the
            seed's ``U(-1/K, 1/K)``.
    """

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, eps: float = 1e-5,
                 commitment_weight: float = 0.25, jitter: float = 0.0, dead_code_threshold: float = 0.0,
                 kmeans_init: bool = False):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.decay, self.eps = decay, eps
        self.commitment_weight, self.jitter = commitment_weight, jitter
        self.dead_code_threshold = dead_code_threshold
        codebook = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("codebook", codebook)
        # EMA statistics start with a mass of 1 per code, so an unused code stays where it is
        # (ResDAVEnet-VQ's init_ema_mass) instead of drifting to m/N with N -> 0.
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}, "
                f"commitment_weight={self.commitment_weight}, jitter={self.jitter}, "
                f"dead_code_threshold={self.dead_code_threshold}")

    def nearest(self, frames: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) for each row of ``frames (N, D)``."""
        dist2 = (frames.pow(2).sum(1, keepdim=True) - 2 * frames @ self.codebook.t()
                 + self.codebook.pow(2).sum(1)[None, :])
        return dist2.argmin(dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> VQOutput:
        B, T, D = x.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            frames = x.float()[mask]  # (N, D) valid frames only
            if self.training and not bool(self.initialized):
                self.init_from(frames.detach())
            codes = self.nearest(frames.detach())
            quant = self.codebook[codes]
            counts = torch.bincount(codes, minlength=self.codebook_size).float()
            if self.training:
                counts = self._update(frames.detach(), codes, counts)
            if frames.shape[0]:
                loss = self.commitment_weight * (frames - quant).pow(2).mean()
            else:
                loss = frames.sum() * 0.0
            probs = counts / counts.sum().clamp(min=1)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-12))).sum())
            usage = (counts > 0).float().mean()
            straight = frames + (quant - frames).detach()
        out = x.new_zeros(B, T, D).masked_scatter(mask[:, :, None], straight.to(x.dtype))
        if self.training and self.jitter > 0:
            out = self._jitter(out, mask)
        all_codes = torch.full((B, T), -1, dtype=torch.long, device=x.device).masked_scatter(mask, codes)
        return VQOutput(out, all_codes, loss, perplexity, usage)

    @torch.no_grad()
    def _update(self, frames: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One EMA step from this batch's valid frames; returns the (all-reduced) counts."""
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, frames)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.dead_code_threshold > 0 and frames.shape[0]:
            dead = self.ema_count < self.dead_code_threshold
            if dead.any():
                new = frames[torch.randint(frames.shape[0], (int(dead.sum()),), device=frames.device)]
                if _distributed():
                    dist.broadcast(new, src=0)
                mass = max(1.0, self.dead_code_threshold)
                self.codebook[dead] = new
                self.ema_sum[dead] = new * mass
                self.ema_count[dead] = mass
        return counts

    @torch.no_grad()
    def init_from(self, frames: torch.Tensor, iters: int = 10, max_frames: int = 16384) -> None:
        """Set the codebook by k-means (``iters`` Lloyd steps) on ``frames (N, D)``; restart the EMA."""
        if frames.shape[0] == 0:
            return
        frames = frames.float()
        if frames.shape[0] > max_frames:
            frames = frames[torch.randperm(frames.shape[0], device=frames.device)[:max_frames]]
        K = self.codebook_size
        pick = (torch.randperm(frames.shape[0], device=frames.device)[:K] if frames.shape[0] >= K
                else torch.randint(frames.shape[0], (K,), device=frames.device))
        centroids = frames[pick].clone()
        self.codebook.copy_(centroids)
        for _ in range(iters):
            codes = self.nearest(frames)
            counts = torch.bincount(codes, minlength=K).float()
            sums = torch.zeros_like(centroids).index_add_(0, codes, frames)
            used = counts > 0
            centroids[used] = sums[used] / counts[used, None]
            self.codebook.copy_(centroids)
        if _distributed():
            dist.broadcast(self.codebook, src=0)
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    def _jitter(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace each valid frame by its left / right neighbour with probability jitter/2 each."""
        B, T, D = out.shape
        r = torch.rand(B, T, device=out.device)
        shift = (r > 1 - self.jitter / 2).long() - (r < self.jitter / 2).long()
        last = (mask.sum(1, keepdim=True) - 1).clamp(min=0)
        src = torch.minimum((torch.arange(T, device=out.device)[None, :] + shift).clamp(min=0), last)
        return out.gather(1, src[:, :, None].expand(B, T, D)) * mask[:, :, None].to(out.dtype)
