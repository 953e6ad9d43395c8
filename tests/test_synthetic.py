import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from s2i.datasets import synthetic as syn
from s2i.datasets.corpus import read_corpus, read_split

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.mktemp("syn") / "small", size="small", seed=0, workers=2)


def _records(corpus: Path) -> dict[str, list[dict]]:
    return {split: read_split(corpus, split) for split in syn.SPLITS}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".jsonl", ".png", ".flac")}


def test_layout_and_files(corpus):
    info = read_corpus(corpus)
    assert info.sample_rate == 16000 and info.name == "synthetic"
    for split, n_images in syn.SIZES_PRESETS["small"].items():
        assert info.splits[split] == {"images": n_images, "utterances": 5 * n_images}
    for split, recs in _records(corpus).items():
        assert [r["image_id"] for r in recs[::5]] == [f"{split}_{i:05d}" for i in range(len(recs) // 5)]
        for rec in recs[:7]:
            img = Image.open(info.image_root / rec["image"])
            assert img.size == (128, 128) and img.mode == "RGB"
            wave, rate = soundfile.read(info.audio_root / rec["audio"], dtype="float32")
            assert rate == 16000 and wave.ndim == 1 and len(wave) == rec["num_samples"]
            assert 1.0 < len(wave) / rate < 8.0 and np.abs(wave).max() > 0.05
    assert (corpus / "complete").is_file()


def test_alignments_are_monotone_inside_the_audio_and_spell_the_caption(corpus):
    for recs in _records(corpus).values():
        for rec in recs:
            duration = rec["num_samples"] / 16000
            for key in ("words", "phones"):
                spans = rec[key]
                assert spans
                for (_, s, e), nxt in zip(spans, spans[1:] + [None]):
                    assert 0 <= s < e <= duration + 1e-3
                    if nxt:
                        assert e <= nxt[1] + 1e-4
            spoken = " ".join(w for w, _, _ in rec["words"]).split()
            assert spoken == rec["text"].replace(",", "").split()


def test_same_seed_same_bytes_in_another_process_and_order(corpus, tmp_path):
    """Remake a few images of the (worker-made) corpus here, in another order: same records, same bytes."""
    tasks = syn._plan(syn.SIZES_PRESETS["small"], seed=0)
    picked = [t for t in tasks if t.split == "test"][3:0:-1] + [t for t in tasks if t.split == "train"][:2]
    remade = syn._make_chunk(str(tmp_path), picked)
    made = {r["utt_id"]: r for recs in _records(corpus).values() for r in recs}
    assert len(remade) == 5 * len(picked)
    for rec in remade:
        assert rec == made[rec["utt_id"]]
        for root, key in (("audio", "audio"), ("images", "image")):
            assert (tmp_path / root / rec[key]).read_bytes() == (corpus / root / rec[key]).read_bytes()


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_workers(corpus, tmp_path):
    again = syn.generate(tmp_path / "again", size="small", seed=0, workers=0)
    a, b = _tree_bytes(corpus), _tree_bytes(again)
    assert a.keys() == b.keys() and len(a) > 100
    assert all(a[k] == b[k] for k in a)


def test_test_voices_never_speak_in_training(corpus):
    recs = _records(corpus)
    train_voices = {r["speaker"] for s in ("train", "val") for r in recs[s]}
    test_voices = {r["speaker"] for s in ("test", "test_compositional") for r in recs[s]}
    assert train_voices and test_voices and not train_voices & test_voices
    accents = lambda voices: {v.split("+")[0] for v in voices}  # noqa: E731
    variants = lambda voices: {v.split("+")[1] for v in voices}  # noqa: E731
    assert not accents(train_voices) & accents(test_voices)
    assert not variants(train_voices) & variants(test_voices)
    report = read_corpus(corpus).report
    assert set(report["voices"]["train"]) >= train_voices and set(report["voices"]["test"]) >= test_voices
    assert not set(report["voices"]["train"]) & set(report["voices"]["test"])


def test_oracle_ceiling(corpus):
    recs = _records(corpus)
    report = read_corpus(corpus).report
    assert report["oracle_r1"]["test"] >= 0.99
    assert syn.oracle_recall(recs["test"]) == pytest.approx(report["oracle_r1"]["test"])
    assert syn.oracle_recall(recs["test_compositional"]) >= 0.99


def test_oracle_counts_shared_descriptions_as_one_over_n(corpus):
    recs = [dict(r) for r in _records(corpus)["test"][:10]]  # two images, five captions each
    recs[5:] = [dict(r, scene=recs[0]["scene"], text=recs[i % 5]["text"]) for i, r in enumerate(recs[5:])]
    assert syn.oracle_recall(recs) == pytest.approx(0.5)
    garbled = [dict(r, text="something else") for r in recs]
    assert syn.oracle_recall(garbled) == 0.0


def test_every_caption_parses_back_to_its_scene():
    rng = np.random.default_rng(1)
    for _ in range(600):
        scene = syn.sample_scene(rng, compositional=bool(rng.integers(2)))
        for text in syn.captions(scene, rng):
            assert syn.parse_caption(text) == scene, text


def test_descriptions_unique_and_compositional_pairs_held_out(corpus):
    recs = _records(corpus)
    scenes = {s: [syn._scene_from_dict(r["scene"]) for r in rs[::5]] for s, rs in recs.items()}
    for split, ss in scenes.items():
        assert len(set(ss)) == len(ss), split
    assert not set(scenes["test"]) & set(scenes["train"])
    pairs = lambda scene: {(t.colour, t.kind) for t in scene.things}  # noqa: E731
    held = set(syn.HELD_OUT_PAIRS)
    for split in ("train", "val", "test"):
        assert not any(pairs(s) & held for s in scenes[split]), split
    assert all(pairs(s) & held for s in scenes["test_compositional"])
    # a bigger draw, without the cost of synthesis
    big = syn.sample_scenes({"train": 3000, "test_compositional": 200}, seed=3)
    assert not any(pairs(s) & held for s in big["train"])
    assert all(pairs(s) & held for s in big["test_compositional"])


def test_test_digits_are_other_handwriting_than_train():
    for kind in syn.DIGITS:
        train, test = syn.digit_pool(kind, held_out=False), syn.digit_pool(kind, held_out=True)
        assert len(train) > 100 and len(test) > 20 and not set(train) & set(test)


def test_rendering_puts_colour_where_the_scene_says():
    scene = syn.Scene("h", (syn.Thing("square", "red", "large"), syn.Thing("circle", "blue", "large")))
    img = np.asarray(syn.render(scene, np.random.default_rng(0), [0, 0]), np.float32)
    red = (img[..., 0] > 150) & (img[..., 1] < 90) & (img[..., 2] < 90)
    blue = (img[..., 2] > 150) & (img[..., 0] < 90)
    assert red.sum() > 500 and blue.sum() > 500
    assert np.nonzero(red)[1].mean() < 64 < np.nonzero(blue)[1].mean()
    small = syn.Scene("single", (syn.Thing("square", "red", "small"),), position="centre")
    small_red = (np.asarray(syn.render(small, np.random.default_rng(0), [0]))[..., 1] < 90).sum()
    assert small_red < 0.6 * red.sum()


def test_cache_reuse_and_guard(corpus):
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*.jsonl")}
    start = time.perf_counter()
    assert syn.generate(corpus, size="small", seed=0) == corpus
    assert time.perf_counter() - start < 1.0
    assert before == {p: p.stat().st_mtime_ns for p in corpus.rglob("*.jsonl")}
    with pytest.raises(syn.SyntheticCorpusError, match="--force"):
        syn.generate(corpus, size="small", seed=1)
    with pytest.raises(ValueError, match="unknown size"):
        syn.generate(corpus, size="huge")


def test_report(corpus):
    report = read_corpus(corpus).report
    assert report["disk_bytes"] > 100_000 and report["generation_seconds"] > 0
    assert report["size"] == "small" and report["seed"] == 0
    assert 1.0 < report["mean_duration_s"]["train"] < 5.0


def test_contact_sheet(corpus, tmp_path):
    out = syn.contact_sheet(corpus, tmp_path / "sheet.png", n=6)
    img = Image.open(out)
    assert img.size[0] > 600 and img.size[1] > 300


def test_cli_reuses_a_complete_corpus(corpus, capsys):
    from s2i.cli import main

    assert main(["prepare", "synthetic", "--out", str(corpus), "--size", "small"]) == 0
    assert main(["prepare", "synthetic", "--out", str(corpus), "--size", "small", "--seed", "5"]) == 1
    err = capsys.readouterr().err
    assert "--force" in err and "Traceback" not in err
    assert json.loads((corpus / "complete").read_text())["seed"] == 0


def test_refuses_a_folder_that_is_not_a_synthetic_corpus(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(syn.SyntheticCorpusError, match="not empty"):
        syn.generate(tmp_path, size="small")
    assert (tmp_path / "images" / "mine.png").exists()


def test_test_split_alone_is_the_whole_corpus_s_test_split(corpus, tmp_path):
    part = syn.generate(tmp_path / "part", size="small", seed=0, workers=0, splits=("test",))
    assert (part / "test.jsonl").read_bytes() == (corpus / "test.jsonl").read_bytes()
    assert not (part / "train.jsonl").exists()
    made = _tree_bytes(part)
    whole = _tree_bytes(corpus)
    media = [k for k in made if k.startswith(("audio", "images"))]
    assert media and all(made[k] == whole[k] for k in media)
    assert json.loads((part / "complete").read_text())["splits"] == ["test"]
    # the whole corpus serves a request for its test split; a part is completed without --force
    assert syn.generate(corpus, size="small", seed=0, splits=("test",)) == corpus
    syn.generate(part, size="small", seed=0, workers=0, splits=("test", "val"))
    assert (part / "val.jsonl").exists() and (part / "test.jsonl").read_bytes() == (corpus / "test.jsonl").read_bytes()
    with pytest.raises(syn.SyntheticCorpusError, match="unknown splits"):
        syn.generate(part, size="small", splits=("dev",))


def test_foreign_accents_join_the_training_voices_only(corpus, tmp_path):
    plain, foreign = (syn._plan(syn.SIZES_PRESETS["default"], seed=0, foreign_accents=f) for f in (False, True))
    assert [t for t in foreign if t.split.startswith("test")] == [t for t in plain if t.split.startswith("test")]
    heard = {v.split("+")[0] for t in foreign if not t.split.startswith("test") for v in t.voices}
    assert heard == set(syn.TRAIN_ACCENTS) | {"af", "de", "nl"}
    assert not heard & set(syn.TEST_ACCENTS)
    # the option is part of the corpus's identity: a folder made without it is not reused with it
    out = syn.generate(tmp_path / "c", size="small", workers=0, splits=("test_compositional",), foreign_accents=True)
    assert json.loads((out / "complete").read_text())["foreign_accents"] is True
    assert read_split(out, "test_compositional") == read_split(corpus, "test_compositional")
    with pytest.raises(syn.SyntheticCorpusError, match="another size, seed or voices"):
        syn.generate(out, size="small", workers=0, splits=("test_compositional",))
