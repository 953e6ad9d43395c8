import math

import pytest
import torch

from s2i import metrics
from s2i.metrics import MetricsError, retrieval_metrics


def slow_reference(sim, caption_image, ks=(1, 5, 10)):
    """Per-query loop: sort each row, read off the pessimistic rank of the correct item(s)."""
    n_captions, n_images = sim.shape
    c2i = []
    for c in range(n_captions):
        correct = sim[c, caption_image[c]].item()
        wrong = [sim[c, j].item() for j in range(n_images) if j != caption_image[c]]
        c2i.append(1 + sum(s >= correct for s in wrong))
    i2c = []
    for i in range(n_images):
        own = [c for c in range(n_captions) if caption_image[c] == i]
        if not own:
            continue
        best = max(sim[c, i].item() for c in own)
        wrong = [sim[c, i].item() for c in range(n_captions) if caption_image[c] != i]
        i2c.append(1 + sum(s >= best for s in wrong))

    def summary(ranks):
        ranks = sorted(ranks)
        out = {f"R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}
        out["median_rank"] = float(ranks[(len(ranks) - 1) // 2])  # lower median
        out["mean_rank"] = sum(ranks) / len(ranks)
        return out

    return {"speech_to_image": summary(c2i), "image_to_speech": summary(i2c)}


def assert_close(a, b):
    assert a.keys() == b.keys()
    for direction in a:
        assert a[direction].keys() == b[direction].keys()
        for key in a[direction]:
            assert math.isclose(a[direction][key], b[direction][key], abs_tol=1e-6), (direction, key)


def test_one_to_one_known_answer():
    # 3 pairs; caption 0 -> image 0 at rank 1, caption 1 -> image 1 at rank 3, caption 2 -> image 2 at rank 2
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.5, 0.1, 0.3],
                        [0.1, 0.8, 0.7]])
    out = retrieval_metrics(sim, torch.arange(3), ks=(1, 2))
    s2i = out["speech_to_image"]
    assert s2i == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3),
                   "median_rank": 2.0, "mean_rank": pytest.approx(2.0)}
    # image columns: image 0 -> captions [0.9, 0.5, 0.1]: rank 1; image 1 -> [0.1, 0.1, 0.8]: own 0.1 ties caption 0 -> 3
    # image 2 -> [0.2, 0.3, 0.7]: rank 1
    i2s = out["image_to_speech"]
    assert i2s["R@1"] == pytest.approx(2 / 3)
    assert i2s["median_rank"] == 1.0
    assert i2s["mean_rank"] == pytest.approx(5 / 3)


def test_ties_are_pessimistic():
    sim = torch.ones(4, 4)  # every candidate scores the same
    out = retrieval_metrics(sim, torch.arange(4), ks=(1,))
    for direction in out.values():
        assert direction["R@1"] == 0.0
        assert direction["median_rank"] == 4.0
        assert direction["mean_rank"] == 4.0


def test_ties_between_own_captions_do_not_count():
    # image 0 has captions 0 and 1, both at the top with equal score: its best rank is 1, not 2
    sim = torch.tensor([[0.9, 0.0],
                        [0.9, 0.0],
                        [0.1, 0.5]])
    out = retrieval_metrics(sim, torch.tensor([0, 0, 1]), ks=(1,))
    assert out["image_to_speech"]["R@1"] == 1.0
    assert out["image_to_speech"]["mean_rank"] == 1.0


def test_varying_captions_per_image_and_best_caption():
    # image 0: captions 0,1,2 ; image 1: caption 3 ; image 2: captions 4,5
    caption_image = torch.tensor([0, 0, 0, 1, 2, 2])
    sim = torch.tensor([[0.2, 0.9, 0.1],   # c0 -> image 0 rank 2
                        [0.8, 0.1, 0.3],   # c1 -> rank 1
                        [0.1, 0.2, 0.3],   # c2 -> rank 3
                        [0.4, 0.5, 0.0],   # c3 -> image 1 rank 1
                        [0.3, 0.6, 0.7],   # c4 -> image 2 rank 1
                        [0.0, 0.95, 0.2]])  # c5 -> image 2 rank 2
    out = retrieval_metrics(sim, caption_image, ks=(1, 2))
    s2i = out["speech_to_image"]
    assert s2i["R@1"] == pytest.approx(3 / 6)
    assert s2i["R@2"] == pytest.approx(5 / 6)
    assert s2i["median_rank"] == 1.0  # ranks sorted 1,1,1,2,2,3: lower median = 1
    # image 0 column [0.2,0.8,0.1,0.4,0.3,0.0]: best own 0.8 -> rank 1
    # image 1 column [0.9,0.1,0.2,0.5,0.6,0.95]: own 0.5; wrong >= 0.5: 0.9, 0.6, 0.95 -> rank 4
    # image 2 column [0.1,0.3,0.3,0.0,0.7,0.2]: best own 0.7 -> rank 1
    i2s = out["image_to_speech"]
    assert i2s["R@1"] == pytest.approx(2 / 3)
    assert i2s["median_rank"] == 1.0
    assert i2s["mean_rank"] == pytest.approx(2.0)


def test_lower_median_for_even_counts():
    sim = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # caption 0 -> rank 1, caption 1 -> rank 2
    out = retrieval_metrics(sim, torch.tensor([0, 1]))
    assert out["speech_to_image"]["median_rank"] == 1.0
    assert out["speech_to_image"]["mean_rank"] == 1.5


def test_names_change_the_keys():
    out = retrieval_metrics(torch.eye(3), torch.arange(3), names=("text", "image"))
    assert set(out) == {"text_to_image", "image_to_text"}
    assert out["text_to_image"]["R@1"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_loop_with_chunking(seed, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK", 7)  # force several chunks in both directions
    g = torch.Generator().manual_seed(seed)
    n_images = 23
    counts = torch.randint(1, 6, (n_images,), generator=g)
    caption_image = torch.repeat_interleave(torch.arange(n_images), counts)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    # coarse values make ties common
    sim = torch.randint(0, 6, (len(caption_image), n_images), generator=g).float() / 5
    assert_close(retrieval_metrics(sim, caption_image), slow_reference(sim, caption_image))


def test_flickr_layout_perfect_model():
    # the seed's layout: row k = caption k // 1000 of image k % 1000 (here 10 images x 5 captions)
    n = 10
    caption_image = torch.arange(5 * n) % n
    emb = torch.nn.functional.normalize(torch.randn(n, 16), dim=1)
    sim = emb[caption_image] @ emb.T
    out = retrieval_metrics(sim, caption_image)
    for direction in out.values():
        assert direction["R@1"] == 1.0 and direction["median_rank"] == 1.0


def test_captionless_images_are_left_out_of_image_to_caption(caplog):
    sim = torch.tensor([[0.9, 0.0, 0.5], [0.1, 0.8, 0.9]])
    out = retrieval_metrics(sim, torch.tensor([0, 1]), ks=(1,))
    assert out["speech_to_image"]["R@1"] == 0.5  # image 2 is a distractor that beats caption 1's image
    assert out["image_to_speech"]["R@1"] == 1.0
    assert "no caption" in caplog.text


def test_large_split_is_vectorised():
    # SpokenCOCO-sized (25k captions x 5k images, 5 per image) finishes quickly without a per-query loop.
    # Even captions score their image at +10 (rank 1), odd ones at -10 (below every other score).
    import time

    n_images, n_captions = 5000, 25000
    caption_image = torch.arange(n_captions) % n_images
    sim = torch.rand(n_captions, n_images, generator=torch.Generator().manual_seed(0))
    sim[torch.arange(n_captions), caption_image] = torch.where(torch.arange(n_captions) % 2 == 0, 10.0, -10.0)
    start = time.perf_counter()
    out = retrieval_metrics(sim, caption_image)
    assert time.perf_counter() - start < 20
    assert out["speech_to_image"]["R@10"] == 0.5
    assert out["speech_to_image"]["median_rank"] == 1.0  # lower median of 12,500 ones and 12,500 5000s
    assert out["speech_to_image"]["mean_rank"] == pytest.approx((1 + n_images) / 2)
    # an image's captions share its parity: even images rank 1, odd ones after all 24,995 wrong captions
    assert out["image_to_speech"]["R@1"] == 0.5
    assert out["image_to_speech"]["mean_rank"] == pytest.approx((1 + n_captions - 4) / 2)


@pytest.mark.parametrize("sim, caption_image, match", [
    (torch.zeros(3), torch.arange(3), "2-D"),
    (torch.zeros(3, 2), torch.arange(2), "one entry per caption"),
    (torch.zeros(3, 2), torch.tensor([0, 1, 2]), "image columns"),
    (torch.zeros(2, 2), torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.arange(2), "NaN"),
])
def test_bad_input_raises(sim, caption_image, match):
    with pytest.raises(MetricsError, match=match):
        retrieval_metrics(sim, caption_image)
    assert issubclass(MetricsError, ValueError)
