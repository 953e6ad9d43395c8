"""Evaluation and embedding of a trained checkpoint: JSON keys, the table, ensembles, text retrieval,
augmented queries, and the embed CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import s2i
from s2i.cli import main as cli
from s2i.datasets.corpus import PairedDataset
from s2i.evaluate import breakdown, combine, embed_split, evaluate, format_table, group_key
from s2i.evaluate import scores as embedding_scores
from s2i.train import train
from tests.test_train import make_tone_corpus, tiny_model, tiny_train

KEYS = {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, run folder) of a tiny speech + text model trained for a few epochs."""
    from s2i.datasets.cache import build_caches

    corpus = make_tone_corpus(tmp_path_factory.mktemp("tones"))
    build_caches(corpus, features=("mfcc",), image_features=("pixels",), image_size=16, progress=False)
    run = tmp_path_factory.mktemp("run")
    train(tiny_train(corpus, run, epochs=4, text_loss_weight=1.0), tiny_model(text=True))
    return corpus, run


def test_evaluate_json_has_every_direction_and_key(trained, capsys):
    corpus, run = trained
    # a run folder stands for its best/ model, and the corpus comes from the checkpoint
    assert cli(["evaluate", str(run), "--split", "test", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    result = json.loads(out)
    assert set(result) == {"speech_to_image", "image_to_speech", "text_to_image", "image_to_text"}
    for scores in result.values():
        assert set(scores) == KEYS
        assert 0 <= scores["R@1"] <= scores["R@5"] <= scores["R@10"] <= 1
    # 25 test images: chance R@10 = 0.4; the spoken and the typed captions both retrieve their images
    assert result["speech_to_image"]["R@10"] > 0.8 and result["text_to_image"]["R@10"] > 0.8, result


def test_evaluate_matches_the_validation_scores_of_training(trained):
    corpus, run = trained
    logged = json.loads((run / "best" / "config.json").read_text())["extra"]["val"]
    result = evaluate(run / "best", split="val")
    for direction, scores in result.items():
        assert scores == pytest.approx(logged[direction]), direction


def test_table_and_explicit_data(trained, capsys):
    corpus, run = trained
    assert cli(["evaluate", str(run / "last"), "--data", str(corpus), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "speech -> image" in out and "image -> text" in out and "R@10" in out
    table = format_table(evaluate(run / "last", corpus, split="val"))
    assert table.splitlines()[0].split() == ["direction", "R@1", "R@5", "R@10", "median", "mean"]


def test_ensemble_ranks_by_the_mean_similarity_or_the_seeds_embedding_sum(trained):
    corpus, run = trained
    single = evaluate(run / "best", split="test")
    assert evaluate(run / "best", split="test", ensemble=[run / "best"]) == single  # 2x the same = same ranks
    model_a, model_b = s2i.load(run / "best"), s2i.load(run / "last")
    ds = PairedDataset(corpus, "test", features="mfcc")
    a, b = embed_split(model_a, ds), embed_split(model_b, ds)
    from s2i.metrics import retrieval_metrics

    mean_sim = retrieval_metrics((a[0] @ a[1].T + b[0] @ b[1].T) / 2, a[2])
    mean_sim.update(retrieval_metrics((a[3] @ a[1].T + b[3] @ b[1].T) / 2, a[2], names=("text", "image")))
    assert evaluate(model_a, corpus, split="test", ensemble=[model_b]) == mean_sim
    seeds = embedding_scores(a[0] + b[0], a[1] + b[1], a[2], a[3] + b[3])
    assert evaluate(model_a, corpus, split="test", ensemble=[model_b], ensemble_mode="embedding") == seeds
    with pytest.raises(ValueError, match="ensemble mode"):
        evaluate(model_a, corpus, split="test", ensemble=[model_b], ensemble_mode="vote")


def test_combine_ignores_how_each_model_orients_its_space():
    """A model whose space is the first's, rotated, adds nothing to the mean of similarities; summed
    embeddings (the seed's ensemble) mix one model's speech with the other's images and rank worse."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    caption_image = torch.arange(50).repeat_interleave(2)
    speech = torch.nn.functional.normalize(images[caption_image] + 0.35 * torch.randn(100, 16, generator=g), dim=1)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    a, b = [speech, images, None], [speech @ rotation, images @ rotation, None]
    alone = embedding_scores(speech, images, caption_image)
    by_similarity = combine([a, b], "similarity")
    assert by_similarity[2] is None
    assert torch.allclose(by_similarity[0] @ by_similarity[1].T, speech @ images.T, atol=1e-5)
    assert embedding_scores(*by_similarity[:2], caption_image) == alone
    summed = combine([a, b], "embedding")
    assert embedding_scores(*summed[:2], caption_image)["speech_to_image"]["R@1"] < alone["speech_to_image"]["R@1"]


def test_embed_split_limits_images_and_keeps_order(trained):
    corpus, run = trained
    model = s2i.load(run / "best")
    ds = PairedDataset(corpus, "test", features="mfcc")
    speech, images, caption_image, text = embed_split(model, ds, batch_size=7)
    assert speech.shape == (len(ds), 32) and images.shape == (ds.num_images, 32) and text.shape == speech.shape
    i = 5  # row i is utterance i, whatever batch it was embedded in
    item = ds[i]
    alone = model.encode_speech_features(item["audio"][None], torch.tensor([item["audio"].shape[0]])).embedding
    torch.testing.assert_close(speech[i], alone[0], atol=1e-5, rtol=1e-4)
    s, im, ci, _ = embed_split(model, ds, max_images=10)
    assert im.shape[0] == 10 and int(ci.max()) == 9 and len(s) == int((ds.caption_image < 10).sum())


def test_augmented_queries_score_lower_and_reproducibly(trained):
    corpus, run = trained
    clean = evaluate(run / "best", split="test")["speech_to_image"]
    noisy = evaluate(run / "best", split="test", augment="noise:-10")["speech_to_image"]
    again = evaluate(run / "best", split="test", augment="noise:-10")["speech_to_image"]
    assert noisy == again
    assert noisy["mean_rank"] > clean["mean_rank"]


def test_embed_cli_writes_vectors_with_their_inputs(trained, tmp_path):
    corpus, run = trained
    wavs = sorted((corpus / "audio").glob("test-0-0*.wav"))[:3]
    pngs = sorted((corpus / "images").glob("test-0-*.png"))[:4]
    model = s2i.load(run / "best")
    out = tmp_path / "speech.safetensors"
    assert cli(["embed", str(run), "--audio", *map(str, wavs), "--out", str(out)]) == 0
    vectors = load_file(str(out))["embeddings"]
    assert vectors.shape == (3, 32)
    torch.testing.assert_close(vectors, model.encode_speech([s2i.audio.load_audio(w) for w in wavs]), atol=1e-5, rtol=1e-4)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "audio" and json.loads(meta["inputs"]) == list(map(str, wavs))
    assert cli(["embed", str(run), "--images", *map(str, pngs), "--out", str(tmp_path / "img.safetensors")]) == 0
    assert load_file(str(tmp_path / "img.safetensors"))["embeddings"].shape == (4, 32)
    assert cli(["embed", str(run), "--text", "red and blue", "--out", str(tmp_path / "t.safetensors")]) == 0
    torch.testing.assert_close(load_file(str(tmp_path / "t.safetensors"))["embeddings"],
                               model.encode_text(["red and blue"]))
    assert cli(["embed", str(run), "--audio", str(tmp_path / "missing.wav"), "--out", str(out)]) == 1


def test_an_installed_model_name_evaluates_like_its_folder(trained, tmp_path, monkeypatch, capsys):
    import shutil

    import s2i.model

    corpus, run = trained
    shutil.copytree(run / "best", tmp_path / "mine")
    monkeypatch.setattr(s2i.model, "CHECKPOINTS", tmp_path)
    assert cli(["evaluate", "mine", "--split", "test", "--json"]) == 0  # the corpus comes from its config.json
    assert json.loads(capsys.readouterr().out) == evaluate(run / "best", corpus, split="test")


def test_group_key_reads_dotted_fields_lists_and_regex_groups():
    record = {"speaker": "en-029+m8", "num_samples": 16000,
              "scene": {"layout": "pair", "objects": [{"kind": "two"}, {"kind": "heart"}]}}
    assert group_key(record, "speaker") == "en-029+m8"
    assert group_key(record, "scene.layout") == "pair"
    assert group_key(record, "num_samples") == "16000"
    assert group_key(record, "scene.objects.kind") == "two,heart"  # through a list: every element's
    assert group_key(record, "speaker~^([^+]+)") == "en-029"  # the first group
    assert group_key(record, "speaker~m[0-9]") == "m8"  # no group: the whole match
    assert group_key(record, "speaker~^xx") == "(no match)"
    assert group_key(record, "scene.objects.kind~^(\\w+)$") == "(no match)"  # single-object scenes only
    with pytest.raises(ValueError, match="no field 'position' here \\(have: layout, objects\\)"):
        group_key(record, "scene.position")
    with pytest.raises(ValueError, match="names a dict"):
        group_key(record, "scene")
    with pytest.raises(ValueError, match="names a list"):
        group_key(record, "scene.objects")
    with pytest.raises(ValueError, match="bad regular expression"):
        group_key(record, "speaker~(")


def test_breakdown_ranks_against_the_whole_gallery_and_groups_the_queries():
    images = torch.eye(3)
    caption_image = torch.tensor([0, 1, 2, 0])
    # captions 0 and 1 point at their own images; 2 ranks its image 2nd, 3 ranks it 3rd
    speech = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0.9, 0.5], [0.2, 0.9, 0.5]])
    groups = breakdown(speech, images, caption_image, None, ["a", "a", "b", "b"])
    assert set(groups) == {"a", "b"} and set(groups["a"]) == {"captions", "speech_to_image"}
    assert groups["a"]["captions"] == 2 and groups["a"]["speech_to_image"]["R@1"] == 1.0
    assert groups["b"]["speech_to_image"]["R@1"] == 0.0 and groups["b"]["speech_to_image"]["mean_rank"] == 2.5
    with_text = breakdown(speech, images, caption_image, images[caption_image], ["x"] * 4)
    assert with_text["x"]["text_to_image"]["R@1"] == 1.0 and with_text["x"]["speech_to_image"]["R@1"] == 0.5
    with pytest.raises(ValueError, match="3 group keys for 4 captions"):
        breakdown(speech, images, caption_image, None, ["a", "b", "c"])


def test_evaluate_by_a_field_splits_the_queries_exactly(trained, capsys):
    corpus, run = trained
    assert cli(["evaluate", str(run), "--split", "test", "--json", "--by", "text~^(\\w+)"]) == 0
    result = json.loads(capsys.readouterr().out)
    by = result["by"]
    assert by["field"] == "text~^(\\w+)" and len(by["groups"]) > 1
    ds = PairedDataset(corpus, "test", features="mfcc")
    assert sum(g["captions"] for g in by["groups"].values()) == len(ds)
    for direction in ("speech_to_image", "text_to_image"):  # the groups' recalls average back to the whole
        weighted = sum(g["captions"] * g[direction]["R@1"] for g in by["groups"].values()) / len(ds)
        assert weighted == pytest.approx(result[direction]["R@1"])
    first_words = {r["text"].split()[0] for r in ds.utterances}
    assert set(by["groups"]) == first_words
    # the table names every group; with --max-images only those images' captions are grouped
    assert cli(["evaluate", str(run), "--split", "test", "--by", "speaker", "--max-images", "10"]) == 0
    out = capsys.readouterr().out
    assert "speech -> image R@1/R@10" in out and "\ntone " in out
    small = evaluate(run, split="test", by="speaker", max_images=10)["by"]["groups"]
    assert small["tone"]["captions"] == int((ds.caption_image < 10).sum())
    # a field the records lack fails before anything is embedded, saying which fields there are
    assert cli(["evaluate", str(run), "--split", "test", "--by", "scene.layout"]) != 0
    assert "no field 'scene'" in capsys.readouterr().err
