"""Cross-modal retrieval metrics: recall@k, median and mean rank, in both directions.

One function covers every split layout. A split has ``n_captions`` captions and ``n_images`` unique
images; ``caption_image[c]`` says which image caption ``c`` belongs to:

* one-to-many (Flickr8k, SpokenCOCO: 5 captions per image, or any varying number):
  caption -> image ranks the unique images, one of which is correct;
  image -> caption ranks *all* captions and scores the best-ranked of the image's own captions
  (a hit at K if any of its captions is in the top K), as in the seed's ``i2c``, SpeechCLIP and FaST-VGS;
* one-to-one (Places: N pairs) is the special case ``caption_image = arange(N)``.

Ranks are 1-based and **ties are pessimistic**: the rank of a query's correct item is
``1 + (number of wrong candidates scoring >= the correct score)``, so a model that gives every
candidate the same score gets the worst rank, not the best. (The seed broke ties by sort order.)
For image -> caption the "correct score" is the image's best caption score; its other captions are
never counted against it.

The median rank is ``torch.median``'s *lower* median for an even number of queries (the seed's
convention); recalls are fractions in [0, 1].
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: rows of the similarity matrix compared at once: bounds the temporary boolean matrices to
#: ``chunk x n_candidates`` (25k captions x 5k images fits in ~100 MB with the default).
CHUNK = 1024


class MetricsError(ValueError):
    """The similarity matrix and the caption -> image map do not describe a retrieval split."""


def _check(sim: Tensor, caption_image: Tensor, ks: Sequence[int]) -> Tensor:
    if not isinstance(sim, Tensor) or sim.dim() != 2:
        raise MetricsError(f"sim must be a 2-D tensor (n_captions, n_images); got shape "
                           f"{tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__}")
    n_captions, n_images = sim.shape
    if n_captions == 0 or n_images == 0:
        raise MetricsError(f"sim is empty: shape {tuple(sim.shape)}")
    caption_image = torch.as_tensor(caption_image)
    if caption_image.dim() != 1 or caption_image.numel() != n_captions:
        raise MetricsError(f"caption_image must have one entry per caption ({n_captions}); got shape "
                           f"{tuple(caption_image.shape)}")
    if caption_image.dtype.is_floating_point or caption_image.dtype == torch.bool:
        raise MetricsError(f"caption_image must hold integer image indices, got {caption_image.dtype}")
    lo, hi = int(caption_image.min()), int(caption_image.max())
    if lo < 0 or hi >= n_images:
        raise MetricsError(f"caption_image holds indices in [{lo}, {hi}] but sim has {n_images} image columns")
    if not torch.isfinite(sim).all():
        raise MetricsError("sim contains NaN or infinite scores; check the embeddings")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise MetricsError(f"ks must be positive integers, got {list(ks)}")
    return caption_image.long().to(sim.device)


def caption_to_image_ranks(sim: Tensor, caption_image: Tensor) -> Tensor:
    """Rank (1-based, ties pessimistic) of each caption's own image among all images: ``(n_captions,)``."""
    ranks = torch.empty(sim.shape[0], dtype=torch.long, device=sim.device)
    for start in range(0, sim.shape[0], CHUNK):
        block = sim[start:start + CHUNK]
        own = caption_image[start:start + CHUNK]
        correct = block.gather(1, own[:, None])
        # counts the correct image itself once, hence no "+ 1"
        ranks[start:start + CHUNK] = (block >= correct).sum(1)
    return ranks


def image_to_caption_ranks(sim: Tensor, caption_image: Tensor) -> Tensor:
    """Best rank (1-based, ties pessimistic) among each image's own captions when it ranks all captions.

    Returns ``(n_images,)``; images without any caption get rank 0 (the caller drops them).
    """
    n_captions, n_images = sim.shape
    own_scores = sim.gather(1, caption_image[:, None]).squeeze(1)
    best = torch.full((n_images,), float("-inf"), dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, caption_image, own_scores, reduce="amax")
    # walk caption rows (contiguous memory) and count, per image, the wrong captions scoring >= its best
    wrong_above = torch.zeros(n_images, dtype=torch.long, device=sim.device)
    for start in range(0, n_captions, CHUNK):
        block = sim[start:start + CHUNK] >= best[None, :]
        block.scatter_(1, caption_image[start:start + CHUNK, None], False)  # a caption is never wrong for its own image
        wrong_above += block.sum(0)
    ranks = wrong_above + 1
    has_caption = torch.zeros(n_images, dtype=torch.bool, device=sim.device)
    has_caption[caption_image] = True
    ranks[~has_caption] = 0
    return ranks


def summarize_ranks(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``R@k`` (fraction of queries with rank <= k), lower median rank and mean rank of 1-based ranks."""
    ranks = ranks.float()
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.median())
    out["mean_rank"] = float(ranks.mean())
    return out


def retrieval_metrics(sim: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10),
                      names: tuple[str, str] = ("speech", "image")) -> dict[str, dict[str, float]]:
    """Recall@k, median and mean rank of a split in both directions.

    Args:
        sim: ``(n_captions, n_images)`` similarities; row = caption, column = unique image.
        caption_image: ``(n_captions,)`` index of each caption's image (``arange(N)`` for one-to-one).
        ks: the cut-offs of recall@k.
        names: (caption modality, image modality) for the keys: ``("speech", "image")`` gives
            ``speech_to_image`` and ``image_to_speech``; ``("text", "image")`` the text ones.

    Returns:
        ``{"<cap>_to_<img>": {"R@1", ..., "median_rank", "mean_rank"}, "<img>_to_<cap>": {...}}``.
        Images with no caption take no part in image -> caption (a warning is logged).
    """
    caption_image = _check(sim, caption_image, ks)
    sim = sim.detach()
    cap, img = names
    c2i = caption_to_image_ranks(sim, caption_image)
    i2c = image_to_caption_ranks(sim, caption_image)
    captionless = int((i2c == 0).sum())
    if captionless:
        log.warning("%d of %d images have no caption; they are left out of %s_to_%s",
                    captionless, len(i2c), img, cap)
    return {f"{cap}_to_{img}": summarize_ranks(c2i, ks),
            f"{img}_to_{cap}": summarize_ranks(i2c[i2c > 0], ks)}
