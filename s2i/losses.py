"""Retrieval losses on a batch of matched (image, caption) embeddings.

Every loss takes ``(image_emb (B, D), caption_emb (B, D), image_ids (B,))``: row ``b`` of both is a
matched pair, and ``image_ids`` says which image each row shows. Two rows with the same image id
(two captions of one image in a batch) are positives of each other, so such pairs are **never used
as negatives**: they are masked out of every loss. The similarity is the dot product
``S = image_emb @ caption_emb.T`` (``S[i, j]``: image ``i`` against caption ``j``), so positives lie
on the diagonal. The losses do not normalise: the encoders return L2-normalised embeddings.

* :func:`batch_hinge` — the seed's symmetric in-batch hinge over all negatives (Merkx et al.);
* :func:`sampled_semihard_triplet` — ResDAVEnet-VQ's sampled + semi-hard negative triplet (Harwath et al.);
* :func:`info_nce` — symmetric cross-entropy with a learnable temperature (CLIP-style);
* :class:`RetrievalLoss` — picks one by name (``TrainConfig.loss``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: CLIP's cap on the learnable inverse temperature (T >= 0.01)
MAX_LOGIT_SCALE = math.log(100.0)

LOSSES = ("hinge", "triplet", "infonce")


class LossError(ValueError):
    """The embeddings or ids given to a loss do not form a batch of matched pairs."""


def _similarity(image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """``S = image_emb @ caption_emb.T`` and the (B, B) mask of pairs showing the same image (diagonal included)."""
    if image_emb.dim() != 2 or caption_emb.dim() != 2 or image_emb.shape != caption_emb.shape:
        raise LossError(f"image and caption embeddings must both be (B, D) with the same shape; got "
                        f"{tuple(image_emb.shape)} and {tuple(caption_emb.shape)}")
    batch = image_emb.shape[0]
    if image_ids is None:
        image_ids = torch.arange(batch, device=image_emb.device)
    if image_ids.shape != (batch,):
        raise LossError(f"image_ids must be (B,) = ({batch},); got {tuple(image_ids.shape)}")
    image_ids = image_ids.to(image_emb.device)
    same = image_ids[:, None] == image_ids[None, :]
    return image_emb @ caption_emb.T, same


def _keep_largest(cost: Tensor, n: int, dim: int) -> Tensor:
    """Zero all but the ``n`` largest entries of ``cost`` along ``dim``."""
    if n <= 0 or n >= cost.shape[dim]:
        return cost
    keep = torch.zeros_like(cost, dtype=torch.bool).scatter_(dim, cost.topk(n, dim=dim).indices, True)
    return cost * keep


def batch_hinge(image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None = None,
                margin: float = 0.2, hardest_n: int = 0) -> Tensor:
    """The seed's symmetric hinge: every in-batch negative, in both directions.

    ``cost_caption[i, j] = max(0, margin + S[i, j] - S[j, j])`` (caption ``j``, wrong image ``i``) and
    ``cost_image[i, j] = max(0, margin + S[i, j] - S[i, i])`` (image ``i``, wrong caption ``j``);
    the loss is their sum divided by ``B**2`` (the seed's mean over the B x B matrix, zero diagonal
    included). ``hardest_n > 0`` keeps only the ``n`` largest terms per caption (column) and per
    image (row), the seed's unused "importance sampling".
    """
    sim, same = _similarity(image_emb, caption_emb, image_ids)
    positive = sim.diagonal()
    cost_caption = (margin + sim - positive[None, :]).clamp(min=0).masked_fill(same, 0.0)
    cost_image = (margin + sim - positive[:, None]).clamp(min=0).masked_fill(same, 0.0)
    cost_caption = _keep_largest(cost_caption, hardest_n, dim=0)
    cost_image = _keep_largest(cost_image, hardest_n, dim=1)
    return (cost_caption.sum() + cost_image.sum()) / sim.shape[0] ** 2


def _sampled_and_semihard(sim: Tensor, negative: Tensor, margin: float,
                          generator: torch.Generator | None) -> Tensor:
    """One direction (rows are anchors) of Harwath's loss: a random negative + the semi-hard one.

    The semi-hard negative of a row is its highest-scoring negative that still scores below the
    positive; rows without one (or without any negative) add nothing. Both terms are means over rows.
    """
    batch = sim.shape[0]
    positive = sim.diagonal()[:, None]
    rows = torch.arange(batch, device=sim.device)
    has_negative = negative.any(1)
    # uniform choice among each row's negatives: the argmax of random keys, non-negatives set to -1
    keys = torch.rand(batch, batch, generator=generator,
                      device=generator.device if generator is not None else sim.device).to(sim.device)
    sampled = sim[rows, keys.masked_fill(~negative, -1.0).argmax(1)][:, None]
    sampled_cost = (margin + sampled - positive).clamp(min=0).squeeze(1) * has_negative
    semihard_ok = negative & (sim < positive).detach()
    semihard = sim.masked_fill(~semihard_ok, float("-inf")).max(1, keepdim=True).values
    has_semihard = semihard_ok.any(1)
    semihard_cost = (margin + semihard.masked_fill(~has_semihard[:, None], 0.0) - positive).clamp(min=0)
    semihard_cost = semihard_cost.squeeze(1) * has_semihard
    return sampled_cost.mean() + semihard_cost.mean()


def sampled_semihard_triplet(image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None = None,
                             margin: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """ResDAVEnet-VQ's triplet loss: ``sampled(S) + sampled(S^T) + semihard(S) + semihard(S^T)``.

    For each anchor (an image, then a caption), one triplet uses a negative drawn uniformly from the
    batch and one the semi-hard negative (the most similar negative that is still less similar than
    the positive), each ``max(0, margin + s_negative - s_positive)`` averaged over anchors. Draws use
    ``generator`` or torch's global RNG, so a seeded run is reproducible.
    """
    sim, same = _similarity(image_emb, caption_emb, image_ids)
    negative = ~same
    return (_sampled_and_semihard(sim, negative, margin, generator)
            + _sampled_and_semihard(sim.T, negative.T, margin, generator))


def info_nce(image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: cross-entropy of each image over the batch's captions and back.

    ``logit_scale`` is log(1/T) (learnable, in the model), clamped at log(100) as in CLIP. Other
    captions of the same image are removed from the softmax rather than counted as wrong.
    """
    sim, same = _similarity(image_emb, caption_emb, image_ids)
    scale = torch.as_tensor(logit_scale, dtype=sim.dtype, device=sim.device).clamp(max=MAX_LOGIT_SCALE).exp()
    not_self = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    logits = (scale * sim).masked_fill(same & not_self, float("-inf"))
    targets = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class RetrievalLoss(nn.Module):
    """One of the retrieval losses chosen by name: ``"hinge"`` | ``"triplet"`` | ``"infonce"``.

    ``margin=None`` takes the paper's value (hinge 0.2, triplet 1.0). ``logit_scale`` is needed by
    InfoNCE only (it lives in the model: ``ModelConfig.init_logit_scale``).
    """

    def __init__(self, name: str = "hinge", margin: float | None = None, hardest_n: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if name not in LOSSES:
            raise LossError(f"unknown loss {name!r}; choose from {list(LOSSES)}")
        if hardest_n < 0:
            raise LossError(f"hardest_n must be >= 0 (0 = all negatives), got {hardest_n}")
        self.name = name
        self.margin = {"hinge": 0.2, "triplet": 1.0}.get(name, 0.0) if margin is None else float(margin)
        self.hardest_n = hardest_n
        self.generator = generator

    def forward(self, image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor | None = None,
                logit_scale: Tensor | None = None) -> Tensor:
        if self.name == "hinge":
            return batch_hinge(image_emb, caption_emb, image_ids, self.margin, self.hardest_n)
        if self.name == "triplet":
            return sampled_semihard_triplet(image_emb, caption_emb, image_ids, self.margin, self.generator)
        if logit_scale is None:
            raise LossError("the infonce loss needs the model's logit_scale (log of 1/temperature)")
        return info_nce(image_emb, caption_emb, image_ids, logit_scale)

    def extra_repr(self) -> str:
        return f"{self.name}, margin={self.margin}, hardest_n={self.hardest_n}"


def build_loss(name: str, **kwargs) -> RetrievalLoss:
    """``build_loss(train_cfg.loss, margin=train_cfg.margin, hardest_n=train_cfg.hardest_n)``."""
    return RetrievalLoss(name, **kwargs)
