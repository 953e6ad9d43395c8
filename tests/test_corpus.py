"""The prepared-corpus format, PairedDataset / collate, the batch samplers and the feature caches."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from s2i.datasets import cache
from s2i.datasets.corpus import (
    BucketBatchSampler,
    CorpusError,
    Manifest,
    PairedDataset,
    RandomBatchSampler,
    collate,
    padding_fraction,
    read_corpus,
    read_split,
    similar_images,
    write_corpus,
)

N_IMAGES, CAPTIONS = 8, 3


def _sweep(seconds: float, f0: float, f1: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t)).astype(np.float32)


def _make_corpus(root: Path, n_images: int = N_IMAGES, captions: int = CAPTIONS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True)
    (root / "images").mkdir()
    records = []
    for i in range(n_images):
        h, w = 30 + 3 * i, 40 - 2 * i  # different sizes and aspect ratios
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        for c in range(captions):
            name = f"img{i}_{c}.wav"
            sf.write(root / "audio" / name, _sweep(0.2 + 1.5 * rng.random(), 150 + 50 * c, 2000 + 300 * i), 16000)
            records.append({"utt_id": f"img{i}_{c}", "image_id": f"img{i}", "image": f"img{i}.png", "audio": name,
                            "text": f"caption {c} of image {i}", "speaker": f"spk{c}"})
    rng.shuffle(records)  # image order = order of first appearance, not sorted
    write_corpus(root, Manifest("toy", {"train": records[:18], "val": records[18:]}, "images", "audio"))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _make_corpus(tmp_path_factory.mktemp("toy"))


# ---------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------
def test_read_corpus_and_split(corpus):
    info = read_corpus(corpus)
    assert info.name == "toy" and info.image_root == corpus / "images" and info.audio_root == corpus / "audio"
    assert set(info.splits) == {"train", "val"}
    train = read_split(corpus, "train")
    assert len(train) == info.splits["train"]["utterances"] == 18
    assert info.splits["train"]["images"] == len({r["image_id"] for r in train})


def test_corpus_errors_are_actionable(tmp_path, corpus):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nope")
    with pytest.raises(CorpusError, match="no corpus.json"):
        read_corpus(tmp_path)
    (tmp_path / "corpus.json").write_text("{not json")
    with pytest.raises(CorpusError, match="not valid JSON"):
        read_corpus(tmp_path)
    (tmp_path / "corpus.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorpusError, match="format"):
        read_corpus(tmp_path)
    with pytest.raises(CorpusError, match=r"unknown split 'tset'.*known splits: train, val"):
        read_split(corpus, "tset")
    with pytest.raises(CorpusError, match="unknown split"):
        PairedDataset(corpus, "tset")
    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken, ignore=shutil.ignore_patterns("cache"))
    (broken / "val.jsonl").write_text(json.dumps({"utt_id": "x", "audio": "a.wav"}) + "\n")
    with pytest.raises(CorpusError, match=r"val.jsonl:1: utterance record lacks \['image_id', 'image', 'text', 'speaker'\]"):
        read_split(broken, "val")
    assert issubclass(CorpusError, ValueError)


# ---------------------------------------------------------------------------------------------
# dataset + collate
# ---------------------------------------------------------------------------------------------
def test_dataset_items_and_image_order(corpus):
    ds = PairedDataset(corpus, "train", features="mfcc", image_size=24)
    records = read_split(corpus, "train")
    first_seen = list(dict.fromkeys(r["image_id"] for r in records))
    assert ds.image_ids == first_seen
    assert ds.caption_image.tolist() == [first_seen.index(r["image_id"]) for r in records]
    item = ds[5]
    assert item["audio"].dtype == torch.float32 and item["audio"].shape[1] == 39 == ds.feature_dim
    assert item["audio"].shape[0] == int(ds.lengths[5])
    assert item["image"].shape == (3, 24, 24) and 0.0 <= item["image"].min() <= item["image"].max() <= 1.0
    assert item["image_index"] == int(ds.caption_image[5]) and item["utt_id"] == records[5]["utt_id"]
    assert item["text"] == records[5]["text"]
    # lengths without a cache come from the audio headers and equal the real frame counts
    assert ds.lengths.tolist() == [ds[i]["audio"].shape[0] for i in range(len(ds))]
    # unique images and the image view
    assert torch.equal(ds.image(item["image_index"]), item["image"])
    assert len(ds.image_dataset()) == ds.num_images == len(first_seen)
    short = PairedDataset(corpus, "train", features="mfcc", image_size=24, max_frames=20)
    assert short[5]["audio"].shape[0] == min(20, item["audio"].shape[0]) and int(short.lengths.max()) <= 20


def test_collate_pads_right_and_keeps_lengths(corpus):
    ds = PairedDataset(corpus, "train", features="fbank", image_size=16)
    items = [ds[i] for i in (0, 1, 2, 3)]
    batch = collate(items)
    T = max(it["audio"].shape[0] for it in items)
    assert batch["audio"].shape == (4, T, 40) and batch["image"].shape == (4, 3, 16, 16)
    assert batch["audio_lengths"].tolist() == [it["audio"].shape[0] for it in items]
    for b, it in enumerate(items):
        n = it["audio"].shape[0]
        assert torch.equal(batch["audio"][b, :n], it["audio"]) and not batch["audio"][b, n:].any()
    assert batch["image_index"].tolist() == [it["image_index"] for it in items]
    assert batch["utt_id"] == [it["utt_id"] for it in items] and batch["text"] == [it["text"] for it in items]
    assert batch["index"].tolist() == [0, 1, 2, 3]
    native = PairedDataset(corpus, "train", features="fbank")  # images at their own (different) sizes
    with pytest.raises(CorpusError, match="image_size"):
        collate([native[i] for i in range(len(native))])


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------
def _lengths(n: int = 3000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(6.0, 0.5, n).astype(np.int64) + 10


def test_bucketing_reduces_padding():
    lengths = _lengths()
    bucket = BucketBatchSampler(lengths, 32, seed=1)
    naive = RandomBatchSampler(lengths, 32, seed=1)
    pb, pr = padding_fraction(list(bucket), lengths), padding_fraction(list(naive), lengths)
    assert pb < 0.05 and pr > 0.3 and pb < pr / 5
    for sampler in (bucket, naive):  # every utterance exactly once; all batches full but one
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert sum(len(b) < 32 for b in batches) <= 1 and len(sampler) == len(batches)


def test_one_caption_per_image_per_batch():
    lengths = _lengths(1000)
    caption_image = np.repeat(np.arange(200), 5)
    for cls in (BucketBatchSampler, RandomBatchSampler):
        sampler = cls(lengths, 16, caption_image=caption_image, seed=3)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            assert all(len(set(caption_image[b])) == len(b) for b in batches)
            assert sorted(i for b in batches for i in b) == list(range(1000))
            assert sum(len(b) == 16 for b in batches) >= len(batches) - 3
    # an image with more captions than fit: still never two in one batch
    crowded = np.zeros(40, dtype=np.int64)
    crowded[:10] = np.arange(1, 11)
    batches = list(BucketBatchSampler(np.full(40, 7), 8, caption_image=crowded))
    assert all(len(set(crowded[b])) == len(b) for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(40))


@pytest.mark.parametrize("n,batch_size,replicas,drop_last", [(1000, 32, 3, False), (1000, 32, 3, True),
                                                               (100, 7, 4, False), (10, 4, 4, False)])
def test_ddp_ranks_disjoint_and_equal(n, batch_size, replicas, drop_last):
    lengths = _lengths(n)
    caption_image = np.arange(n) // 5
    ranks = [BucketBatchSampler(lengths, batch_size, seed=7, caption_image=caption_image, num_replicas=replicas,
                                rank=r, drop_last=drop_last) for r in range(replicas)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len({len(b) for b in per_rank}) == 1 and all(len(s) == len(per_rank[0]) for s in ranks)
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))  # no utterance on two ranks
        if not drop_last:
            assert set(seen) == set(range(n))
        else:
            assert all(len(b) == batch_size for batches in per_rank for b in batches)
        assert all(len(set(caption_image[b])) == len(b) for batches in per_rank for b in batches)


def test_sampler_determinism_and_epochs():
    lengths = _lengths(500)
    a, b = BucketBatchSampler(lengths, 16, seed=5), BucketBatchSampler(lengths, 16, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(BucketBatchSampler(lengths, 16, seed=6)) != first
    fixed = BucketBatchSampler(lengths, 16, shuffle=False)
    fixed.set_epoch(3)
    assert list(fixed) == list(BucketBatchSampler(lengths, 16, shuffle=False))
    assert list(RandomBatchSampler(lengths, 16, shuffle=False))[0] == list(range(16))


def test_similar_images_ranks_by_shared_caption_words():
    texts = ["a red circle", "a round red circle",  # image 0
             "a red circle left of a blue star",  # image 1: shares red circle
             "a green digit seven",  # image 2: shares nothing but "a"
             "a red square"]  # image 3: shares red
    caption_image = [0, 0, 1, 2, 3]
    nb = similar_images(texts, caption_image, k=3)
    assert nb.shape == (4, 3)
    assert all(i not in row for i, row in enumerate(nb))  # never itself
    assert nb[0].tolist() == [1, 3, 2] and nb[1][0] == 0 and nb[3][0] in (0, 1)
    assert similar_images(texts, caption_image, k=10).shape == (4, 3)  # at most the other images
    with pytest.raises(CorpusError, match="transcripts"):
        similar_images(["", "", ""], [0, 1, 2])
    with pytest.raises(ValueError, match="texts for"):
        similar_images(texts[:2], caption_image)


def test_hard_negative_batches_pair_captions_of_similar_images():
    rng = np.random.default_rng(0)
    n_images, per_image = 400, 5
    caption_image = np.repeat(np.arange(n_images), per_image)
    lengths = _lengths(n_images * per_image)
    neighbours = np.stack([rng.choice(np.delete(np.arange(n_images), i), 3, replace=False) for i in range(n_images)])
    nbsets = [set(row) for row in neighbours]

    def near(u, v):
        return caption_image[v] in nbsets[caption_image[u]] or caption_image[u] in nbsets[caption_image[v]]

    def with_neighbour(batches):  # share of utterances whose batch holds a caption of a neighbour (either way)
        return sum(any(near(u, v) for v in b) for b in batches for u in b) / len(lengths)

    plain = list(BucketBatchSampler(lengths, 16, seed=2, caption_image=caption_image))
    random_batches = RandomBatchSampler(lengths, 16, seed=2, caption_image=caption_image)
    assert list(BucketBatchSampler(lengths, 16, seed=2, caption_image=caption_image, neighbours=neighbours,
                                   hard_fraction=0.0)) == plain
    shares = []
    for fraction in (0.5, 1.0):
        sampler = BucketBatchSampler(lengths, 16, seed=2, caption_image=caption_image, neighbours=neighbours,
                                     hard_fraction=fraction)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each once per epoch
            assert all(len(set(caption_image[b])) == len(b) for b in batches)  # still one caption per image
            assert sum(len(b) < 16 for b in batches) <= 3
        shares.append(with_neighbour(batches))
        # still length-bucketed (each pair by its longer caption; these neighbours' lengths are unrelated)
        assert padding_fraction(batches, lengths) < 0.75 * padding_fraction(list(random_batches), lengths)
    assert with_neighbour(plain) < 0.3 < 0.5 < shares[0] < shares[1]  # random: 1 - (1 - 6/399) ** 15 = 0.2
    with pytest.raises(ValueError, match="caption_image"):
        BucketBatchSampler(lengths, 16, neighbours=neighbours)
    with pytest.raises(ValueError, match="a row for each"):
        BucketBatchSampler(lengths, 16, caption_image=caption_image, neighbours=neighbours[:10])
    with pytest.raises(ValueError, match="hard_fraction"):
        BucketBatchSampler(lengths, 16, caption_image=caption_image, neighbours=neighbours, hard_fraction=2)


# ---------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------
def test_cache_equals_on_the_fly(corpus):
    live = PairedDataset(corpus, "train", features="fbank", image_size=24)
    assert live.audio_cache is None and live.image_cache is None
    reports = cache.build_caches(corpus, features=["fbank", "mfcc"], image_features=["pixels"], image_size=24,
                                 progress=False)
    assert all(not r.failed for r in reports) and {r.kind for r in reports} == {"audio-fbank", "audio-mfcc", "pixels-24"}
    for feats in ("fbank", "mfcc"):
        cached = PairedDataset(corpus, "train", features=feats, image_size=24)
        live = PairedDataset(corpus, "train", features=feats, image_size=24)
        live.audio_cache = live.image_cache = None
        assert cached.audio_cache is not None and cached.image_cache is not None
        assert torch.equal(cached.lengths, live.lengths)
        for i in range(len(cached)):
            a, b = cached[i], live[i]
            assert a["audio"].shape == b["audio"].shape
            torch.testing.assert_close(a["audio"], b["audio"], atol=2e-2, rtol=2e-3)  # float16 storage
            assert torch.equal(a["image"], b["image"])  # the pixel cache is exact
    info = json.loads((corpus / "corpus.json").read_text())
    assert info["report"]["caches"]["audio-fbank/val"]["failed"] == 0


def test_cache_of_an_older_feature_version_is_not_read(corpus, monkeypatch):
    # a feature type whose values change gets a new version: its caches are rebuilt, never read
    from s2i import audio

    cache.build_caches(corpus, splits=["val"], features=["mfcc"], image_features=[], progress=False)
    assert PairedDataset(corpus, "val", features="mfcc").audio_cache is not None
    monkeypatch.setitem(audio.FEATURE_VERSIONS, "mfcc", audio.FEATURE_VERSIONS["mfcc"] + 1)
    assert PairedDataset(corpus, "val", features="mfcc").audio_cache is None
    cache.build_caches(corpus, splits=["val"], features=["mfcc"], image_features=[], progress=False)
    assert PairedDataset(corpus, "val", features="mfcc").audio_cache is not None


def test_dataloader_with_workers_reads_memory_mapped_cache(corpus):
    cache.build_caches(corpus, splits=["val"], features=["fbank"], image_features=["pixels"], image_size=24,
                       progress=False)
    ds = PairedDataset(corpus, "val", features="fbank", image_size=24)
    assert ds.audio_cache is not None
    sampler = BucketBatchSampler(ds.lengths, 4, caption_image=ds.caption_image, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["audio"].shape[0] == len(batch["utt_id"]) == batch["image"].shape[0]
        assert int(batch["audio_lengths"].max()) == batch["audio"].shape[1]
        assert len(set(batch["image_index"].tolist())) == len(batch["utt_id"])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))


def test_cache_resumes_after_interruption(tmp_path, corpus, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("cache"))
    calls = {"n": 0}
    real_save = cache._save_npy

    def dying_save(path, array):  # the process "dies" while writing the 4th shard's second array
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated kill")
        real_save(path, array)

    monkeypatch.setattr(cache, "_save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.build_audio_cache(copy, "train", "mfcc", shard_size=3, progress=False)
    out = cache.audio_cache_dir(read_corpus(copy), "train", "mfcc")
    assert len(list(out.glob("shard-*.json"))) == 3 and not (out / "meta.json").exists()
    monkeypatch.setattr(cache, "_save_npy", real_save)
    report = cache.build_audio_cache(copy, "train", "mfcc", shard_size=3, progress=False)
    assert report.shards_skipped == 3 and report.shards_built == 3 and not report.failed
    assert not list(out.glob("*.tmp"))
    clean = cache.build_audio_cache(corpus, "train", "mfcc", shard_size=3, progress=False)
    for k in range(6):
        for name in ("frames", "offsets"):
            a = np.load(out / f"{name}-{k:05d}.npy")
            b = np.load(Path(clean.path) / f"{name}-{k:05d}.npy")
            assert np.array_equal(a, b)
    again = cache.build_audio_cache(copy, "train", "mfcc", shard_size=3, progress=False)
    assert again.shards_built == 0 and again.shards_skipped == 6


def test_stale_cache_is_ignored_and_rebuilt(tmp_path, corpus):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("cache"))
    cache.build_audio_cache(copy, "val", "fbank", progress=False)
    assert PairedDataset(copy, "val", image_size=16).audio_cache is not None
    records = read_split(copy, "val")[:-2]  # the manifest changes: the cache no longer matches
    (copy / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = PairedDataset(copy, "val", image_size=16)
    assert ds.audio_cache is None and len(ds) == len(records)
    report = cache.build_audio_cache(copy, "val", "fbank", progress=False)
    assert report.items == len(records) and report.shards_skipped == 0
    assert PairedDataset(copy, "val", image_size=16).audio_cache is not None


def test_broken_files_are_reported_not_fatal(tmp_path, corpus):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("cache"))
    records = read_split(copy, "val")
    info = read_corpus(copy)
    bad_audio, bad_image = info.audio_path(records[0]), info.image_path(records[1])
    bad_audio.write_bytes(b"this is not audio")
    bad_image.write_bytes(b"\xff\xd8 not a picture")
    reports = cache.build_caches(copy, splits=["val"], features=["fbank"], image_features=["pixels"], image_size=16,
                                 progress=False)
    by_kind = {r.kind: r for r in reports}
    assert [f["file"] for f in by_kind["audio-fbank"].failed] == [str(bad_audio)]
    assert [f["file"] for f in by_kind["pixels-16"].failed] == [str(bad_image)]
    saved = json.loads((Path(by_kind["audio-fbank"].path) / "report.json").read_text())
    assert saved["failed"][0]["item"] == records[0]["utt_id"] and "not a readable audio file" in saved["failed"][0]["error"]
    ds = PairedDataset(copy, "val", features="fbank", image_size=16)
    assert ds.audio_cache is not None and ds.lengths[0] == 0
    with pytest.raises(ValueError, match=bad_audio.name):
        ds[0]
    with pytest.raises(CorpusError, match=bad_image.name):
        ds.image(int(ds.caption_image[1]))
    assert ds[2]["audio"].shape[0] > 0


class _Louder:
    """A picklable waveform augmentation that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([wave, wave.flip(0)]) * 0.5


def test_augment_reads_the_waveform(corpus):
    cache.build_caches(corpus, splits=["val"], features=["fbank"], image_features=[], progress=False)
    augment = _Louder()
    ds = PairedDataset(corpus, "val", features="fbank", augment=augment, image_size=16)
    plain = PairedDataset(corpus, "val", features="fbank", image_size=16)
    assert ds.audio_cache is None and plain.audio_cache is not None
    item = ds[0]
    assert augment.calls == 1 and item["audio"].shape[0] > plain[0]["audio"].shape[0]


def test_image_feature_cache_with_user_weights(tmp_path, corpus):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    pt, st = tmp_path / "resnet18.pt", tmp_path / "resnet18.safetensors"
    torch.save(model.state_dict(), pt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    with pytest.raises(CorpusError, match="need weights"):
        cache.build_image_feature_cache(corpus, "val", "resnet18-center", progress=False)
    with pytest.raises(CorpusError, match="does not fit"):
        cache.build_image_feature_cache(corpus, "val", "resnet34-center", weights=pt, progress=False)
    with pytest.raises(CorpusError, match="no cached image features 'resnet18-center'"):
        PairedDataset(corpus, "val", image_input="resnet18-center")

    report = cache.build_image_feature_cache(corpus, "val", "resnet18-center", weights=st, shard_size=4, progress=False)
    assert not report.failed
    ds = PairedDataset(corpus, "val", image_input="resnet18-center")
    vec = ds[0]["image"]
    assert vec.shape == (512,) and vec.dtype == torch.float32
    # the cached vector is the backbone's pooled output on the normalised 256-resize + centre 224 crop
    from torchvision.transforms import functional as F

    with Image.open(ds.info.image_path(ds.utterances[0])) as im:
        crop = F.center_crop(F.resize(im.convert("RGB"), 256, interpolation=F.InterpolationMode.LANCZOS), 224)
    x = F.normalize(F.to_tensor(crop), cache.IMAGENET_MEAN, cache.IMAGENET_STD)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(vec, model(x[None])[0], atol=1e-4, rtol=1e-4)
    # the seed's ten-crop mean, weights from a torch.save file
    ten = cache.build_image_feature_cache(corpus, "val", "resnet18", weights=pt, progress=False)
    assert not ten.failed
    tds = PairedDataset(corpus, "val", image_input="resnet18")
    assert tds[0]["image"].shape == (512,) and not torch.allclose(tds[0]["image"], vec)
    assert collate([tds[0], tds[1]])["image"].shape == (2, 512)


def test_cache_is_found_through_relative_and_absolute_corpus_paths(tmp_path, monkeypatch):
    from s2i.datasets import cache
    from s2i.datasets.corpus import read_corpus, read_split

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "audio").mkdir()
    (corpus / "images").mkdir()
    record = {"utt_id": "u0", "image_id": "i0", "image": "i0.png", "audio": "u0.wav", "text": "x", "speaker": "s"}
    write_corpus(corpus, Manifest("toy", {"train": [record]}, "images", "audio"))
    monkeypatch.chdir(tmp_path)
    by_rel, by_abs = read_corpus("corpus"), read_corpus(corpus.resolve())
    records = read_split(corpus, "train")
    assert cache._audio_fingerprint(by_rel, records, "mfcc") == cache._audio_fingerprint(by_abs, records, "mfcc")
    images = cache.unique_image_records(records)
    assert (cache._image_fingerprint(by_rel, images, "pixels", {"image_size": 8})
            == cache._image_fingerprint(by_abs, images, "pixels", {"image_size": 8}))
