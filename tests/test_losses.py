import math

import pytest
import torch

from s2i.losses import (LossError, RetrievalLoss, batch_hinge, build_loss, info_nce,
                        sampled_semihard_triplet)

# With image embeddings = the identity, S = image @ caption.T = caption.T: pick S, set caption = S.T.
S2 = torch.tensor([[0.5, 0.4],
                   [0.3, 0.1]])
EYE2 = torch.eye(2)


def embeddings(sim):
    return torch.eye(sim.shape[0]), sim.T.clone()


def hinge_reference(sim, ids, margin, hardest_n=0):
    """The seed's definition written as loops."""
    b = sim.shape[0]
    total = 0.0
    for j in range(b):  # caption j against wrong images i
        terms = [max(0.0, margin + sim[i, j].item() - sim[j, j].item()) for i in range(b) if ids[i] != ids[j]]
        total += sum(sorted(terms, reverse=True)[:hardest_n or None])
    for i in range(b):  # image i against wrong captions j
        terms = [max(0.0, margin + sim[i, j].item() - sim[i, i].item()) for j in range(b) if ids[i] != ids[j]]
        total += sum(sorted(terms, reverse=True)[:hardest_n or None])
    return total / b ** 2


def test_hinge_known_value():
    # caption 1 vs image 0: .2 + .4 - .1 = .5; image 0 vs caption 1: .2 + .4 - .5 = .1;
    # image 1 vs caption 0: .2 + .3 - .1 = .4; caption 0 vs image 1: .2 + .3 - .5 < 0  -> 1.0 / 4
    img, cap = embeddings(S2)
    assert batch_hinge(img, cap, torch.tensor([0, 1])).item() == pytest.approx(0.25)
    assert batch_hinge(img, cap, torch.tensor([0, 1]), margin=0.0).item() == pytest.approx((0.3 + 0.2) / 4)


@pytest.mark.parametrize("hardest_n", [0, 1, 2, 5])
def test_hinge_matches_loop_with_masking_and_hardest_n(hardest_n):
    g = torch.Generator().manual_seed(hardest_n)
    sim = torch.rand(6, 6, generator=g) * 2 - 1
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    img, cap = embeddings(sim)
    got = batch_hinge(img, cap, ids, margin=0.3, hardest_n=hardest_n).item()
    assert got == pytest.approx(hinge_reference(sim, ids, 0.3, hardest_n), abs=1e-6)


def test_hardest_n_keeps_fewer_terms():
    sim = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    img, cap = embeddings(sim)
    all_terms = batch_hinge(img, cap, torch.arange(8), margin=1.0).item()
    hardest = batch_hinge(img, cap, torch.arange(8), margin=1.0, hardest_n=1).item()
    assert 0 < hardest < all_terms


def test_same_image_pairs_are_never_negatives():
    img, cap = embeddings(S2)
    same = torch.tensor([3, 3])
    assert batch_hinge(img, cap, same).item() == 0.0
    assert sampled_semihard_triplet(img, cap, same).item() == 0.0
    assert info_nce(img, cap, same, torch.tensor(0.0)).item() == pytest.approx(0.0, abs=1e-7)
    # a huge score against a second caption of the same image costs nothing
    sim = torch.tensor([[0.1, 9.0, 0.0], [9.0, 0.1, 0.0], [0.0, 0.0, 0.1]])
    img, cap = embeddings(sim)
    ids = torch.tensor([0, 0, 1])
    assert batch_hinge(img, cap, ids).item() == pytest.approx(hinge_reference(sim, ids, 0.2))
    assert batch_hinge(img, cap, ids).item() < batch_hinge(img, cap, torch.arange(3)).item()
    # masked, every negative scores 0.0 against a positive of 0.1: each of the four terms is 1 + 0 - 0.1
    assert sampled_semihard_triplet(img, cap, ids, margin=1.0).item() == pytest.approx(4 * 0.9)


def test_triplet_known_value():
    # B = 2: the sampled negative is forced. Images as anchors: row 0 (pos .5, neg .4): sampled .9,
    # semi-hard .9; row 1 (pos .1, neg .3): sampled 1.2, no semi-hard negative -> 0.
    # Captions as anchors: (pos .5, neg .3): .8 and .8; (pos .1, neg .4): 1.3 and 0.
    img, cap = embeddings(S2)
    loss = sampled_semihard_triplet(img, cap, torch.tensor([0, 1]), margin=1.0)
    assert loss.item() == pytest.approx((0.9 + 1.2) / 2 + 0.9 / 2 + (0.8 + 1.3) / 2 + 0.8 / 2)


def test_triplet_semihard_picks_the_closest_negative_below_the_positive():
    # with all negatives of a row equal but one, the sampled part is known whatever is drawn
    sim = torch.tensor([[0.8, 0.7, 0.2, 0.9],
                        [0.0, 0.5, 0.0, 0.0],
                        [0.0, 0.0, 0.5, 0.0],
                        [0.0, 0.0, 0.0, 0.5]])
    img, cap = embeddings(sim)
    g = torch.Generator().manual_seed(0)
    got = sampled_semihard_triplet(img, cap, torch.arange(4), margin=0.5, generator=g)
    # recompute by hand, reusing the same draws
    g = torch.Generator().manual_seed(0)
    keys_rows, keys_cols = torch.rand(4, 4, generator=g), torch.rand(4, 4, generator=g)

    def direction(s, keys):
        total_sampled = total_semi = 0.0
        for i in range(4):
            negs = [j for j in range(4) if j != i]
            j = max(negs, key=lambda j: keys[i, j].item())
            total_sampled += max(0.0, 0.5 + s[i, j].item() - s[i, i].item())
            below = [s[i, j].item() for j in negs if s[i, j] < s[i, i]]
            if below:
                total_semi += max(0.0, 0.5 + max(below) - s[i, i].item())
        return total_sampled / 4 + total_semi / 4

    assert got.item() == pytest.approx(direction(sim, keys_rows) + direction(sim.T, keys_cols), abs=1e-6)
    # row 0's semi-hard negative is 0.7 (0.9 is harder than the positive, 0.2 easier)


def test_triplet_is_deterministic_under_a_seed():
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    cap = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    ids = torch.arange(16)
    a = sampled_semihard_triplet(img, cap, ids, generator=torch.Generator().manual_seed(5))
    b = sampled_semihard_triplet(img, cap, ids, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()
    torch.manual_seed(7)
    c = sampled_semihard_triplet(img, cap, ids)
    torch.manual_seed(7)
    assert sampled_semihard_triplet(img, cap, ids).item() == c.item()
    draws = {round(sampled_semihard_triplet(img, cap, ids).item(), 6) for _ in range(10)}
    assert len(draws) > 1  # the sampled negative really is random


def test_info_nce_known_value_and_masking():
    img, cap = embeddings(S2)
    # scale 1: logits = S; rows: image over captions, columns: caption over images
    expected = ((math.log(math.exp(0.5) + math.exp(0.4)) - 0.5) + (math.log(math.exp(0.3) + math.exp(0.1)) - 0.1)
                + (math.log(math.exp(0.5) + math.exp(0.3)) - 0.5) + (math.log(math.exp(0.4) + math.exp(0.1)) - 0.1)) / 4
    assert info_nce(img, cap, torch.tensor([0, 1]), torch.tensor(0.0)).item() == pytest.approx(expected)
    # 3 rows, rows 0 and 1 share an image: entries (0,1) and (1,0) leave the softmax
    sim = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    img, cap = embeddings(sim)
    ids = torch.tensor([4, 4, 9])
    keep = ~((ids[:, None] == ids[None, :]) & ~torch.eye(3, dtype=torch.bool))
    scale = 2.0
    rows = [torch.logsumexp(scale * sim[i][keep[i]], 0) - scale * sim[i, i] for i in range(3)]
    cols = [torch.logsumexp(scale * sim[:, j][keep[:, j]], 0) - scale * sim[j, j] for j in range(3)]
    expected = (sum(rows) / 3 + sum(cols) / 3) / 2
    got = info_nce(img, cap, ids, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_info_nce_temperature_is_clamped():
    img, cap = embeddings(S2)
    ids = torch.arange(2)
    at_cap = info_nce(img, cap, ids, torch.tensor(math.log(100.0)))
    assert info_nce(img, cap, ids, torch.tensor(10.0)).item() == pytest.approx(at_cap.item())


@pytest.mark.parametrize("name", ["hinge", "triplet", "infonce"])
def test_gradients_flow(name):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 4, generator=g, requires_grad=True)
    cap = torch.randn(6, 4, generator=g, requires_grad=True)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss_fn = build_loss(name, generator=g)
    loss = loss_fn(torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(cap, dim=1),
                   torch.tensor([0, 0, 1, 2, 3, 4]), logit_scale=logit_scale)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    for t in (img, cap):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    if name == "infonce":
        assert logit_scale.grad is not None and logit_scale.grad != 0


def test_retrieval_loss_picks_by_name_and_defaults():
    img, cap = embeddings(S2)
    ids = torch.arange(2)
    assert RetrievalLoss("hinge").margin == 0.2 and RetrievalLoss("triplet").margin == 1.0
    assert RetrievalLoss("hinge")(img, cap, ids).item() == pytest.approx(batch_hinge(img, cap, ids).item())
    assert RetrievalLoss("hinge", margin=0.0, hardest_n=1)(img, cap, ids).item() == pytest.approx(
        batch_hinge(img, cap, ids, margin=0.0, hardest_n=1).item())
    with pytest.raises(LossError, match="logit_scale"):
        RetrievalLoss("infonce")(img, cap, ids)
    with pytest.raises(LossError, match="unknown loss"):
        RetrievalLoss("contrastive")
    with pytest.raises(LossError, match="same shape"):
        batch_hinge(torch.zeros(2, 3), torch.zeros(3, 3), ids)
    with pytest.raises(LossError, match="image_ids"):
        batch_hinge(img, cap, torch.arange(3))
