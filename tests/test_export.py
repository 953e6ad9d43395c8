"""``python -m s2i export``: a checkpoint + a corpus split -> the gallery the app reads (s2i/gallery.py).

The tests make their own data: a small prepared corpus (shapes drawn with PIL, captions spoken by the
offline synthesiser) and an untrained model saved as a checkpoint.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

import s2i
from s2i.cli import main as cli
from s2i.config import preset
from s2i.export import clip_choice, fit_layout, place_points
from s2i.gallery import AUDIO_DIR, Gallery, GalleryError, find_gallery

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
VOICES = (("en-us", None), ("en-gb-x-rp", "f2"), ("en", "m3"))


def _draw(colour: str, shape: str, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    box = (12, 12, size - 12, size - 12)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(size // 2, 10), (size - 10, size - 10), (10, size - 10)], fill=COLOURS[colour])
    return im


def make_corpus(root: Path, n_images: int = 8, captions_per_image: int = 2,
                splits: tuple[str, ...] = ("test",)) -> Path:
    """A prepared corpus (docs/DESIGN.md format) of coloured shapes with spoken, word-aligned captions."""
    from s2i.audio import to_mono_16k
    from s2i.datasets.speech_synthesis import synthesize

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    combos = [(c, s) for s in SHAPES for c in COLOURS][:n_images]
    lines = []
    for i, (colour, shape) in enumerate(combos):
        image = f"img{i:03d}.png"
        _draw(colour, shape).save(root / "images" / image)
        for k in range(captions_per_image):
            text = f"a {colour} {shape}" if k % 2 == 0 else f"there is a {shape} and it is {colour}"
            voice, variant = VOICES[(i + k) % len(VOICES)]
            utt = synthesize(text, voice=voice, variant=variant)
            audio = f"utt{i:03d}_{k}.wav"
            soundfile.write(root / "audio" / audio, to_mono_16k(utt.audio, utt.sample_rate).numpy(), 16000)
            lines.append({"utt_id": f"utt{i:03d}_{k}", "image_id": f"img{i:03d}", "image": image, "audio": audio,
                          "text": text, "speaker": f"{voice}+{variant}",
                          "words": [[w, round(a, 3), round(b, 3)] for w, a, b in utt.words],
                          "scene": {"colour": colour, "shape": shape}})
    for split in splits:  # (the same utterances in every split: enough to exercise training in the app)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "corpus.json").write_text(json.dumps({
        "format": "s2i-corpus", "version": 1, "name": "shapes", "sample_rate": 16000,
        "splits": {split: {"utterances": len(lines), "images": len(combos)} for split in splits},
        "image_root": "images", "audio_root": "audio", "report": {}}))
    return root


def make_checkpoint(root: Path, corpus: Path, name: str = "rnn_vq_small", text: bool = True) -> Path:
    """An untrained model of a small preset, saved as a checkpoint folder (text vocab from the corpus)."""
    from s2i.encoders.text import Tokenizer

    torch.manual_seed(0)
    cfg, _ = preset(name)
    texts = [json.loads(line)["text"] for line in (corpus / "test.jsonl").read_text().splitlines()]
    if text and cfg.text is not None:
        cfg.text.vocab = list(Tokenizer.from_texts(texts, level=cfg.text.arch).vocab)
    else:
        cfg.text = None
    model = s2i.build_model(cfg)
    return s2i.save(model.eval(), root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus) -> Path:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", corpus)
    assert cli(["export", str(ckpt), "--data", str(corpus), "--split", "test", "--layout", "pca",
                "--max-clips", "5", "--thumb-size", "48"]) == 0
    return ckpt


def test_export_writes_a_gallery_that_matches_the_model(exported, corpus):
    model = s2i.load(exported)
    g = Gallery.load(exported)
    records = [json.loads(line) for line in (corpus / "test.jsonl").read_text().splitlines()]
    assert find_gallery(exported) == exported
    assert g.num_images == 8 and g.num_captions == 16
    assert g.caption_image.tolist() == [i for i in range(8) for _ in range(2)]
    assert [c["utt_id"] for c in g.captions] == [r["utt_id"] for r in records]
    # the stored embeddings are what the model computes for the corpus files
    images = [Image.open(corpus / "images" / r["image"]).convert("RGB") for r in records[::2]]
    # (stored as float16: within its rounding)
    torch.testing.assert_close(g.image_embeddings, model.encode_image(images), atol=1e-3, rtol=1e-3)
    waves = [soundfile.read(corpus / "audio" / r["audio"], dtype="float32")[0] for r in records]
    torch.testing.assert_close(g.speech_embeddings, model.encode_speech(waves), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(g.text_embeddings, model.encode_text([r["text"] for r in records]), atol=1e-3, rtol=1e-3)
    # VQ codes of every caption, per layer, with the layer's frame shift
    units = model.units(waves[3])
    assert sorted(g.codes) == sorted(units) == ["vq1", "vq2"]
    for name, seq in units.items():
        assert g.caption_codes(name, 3).tolist() == seq.codes.tolist()
        assert g.frame_shift(name) == pytest.approx(seq.frame_shift_s)
    # words and scene attributes travel with the captions / images
    assert g.captions[5]["words"] == records[5]["words"] and g.captions[5]["words"][0][0] == "there"
    assert g.images[0]["scene"] == {"colour": "red", "shape": "circle"}


def test_layout_and_placing_a_query(exported):
    g = Gallery.load(exported)
    assert set(g.layout) == {"image", "speech", "text"}
    assert g.layout["image"].shape == (8, 2) and g.layout["speech"].shape == (16, 2)
    assert g.meta["layout"]["method"] == "pca"
    # a stored point's own embedding lands on (or right beside) its stored position
    spread = torch.cat(list(g.layout.values())).std(0).norm()
    for m, row in (("image", 3), ("speech", 7)):
        x, y = g.place(g.embeddings(m)[row])
        assert torch.dist(torch.tensor([x, y]), g.layout[m][row]) < 0.25 * spread


def test_thumbnails_clips_and_the_corpus_fallback(exported, corpus, tmp_path):
    g = Gallery.load(exported)
    assert g.meta["corpus_dir"] == str(corpus.resolve())
    thumb = g.thumbnail(2)
    assert max(thumb.size) == 48
    original = Image.open(corpus / "images" / "img002.png").convert("RGB").resize(thumb.size)
    assert np.abs(np.asarray(thumb, float) - np.asarray(original, float)).mean() < 12  # JPEG of the same picture
    assert g.image_path(2) == corpus / "images" / "img002.png"
    # clips: the first caption of each of the first 5 images, as Ogg/Opus
    clips = [j for j, c in enumerate(g.captions) if c["clip"]]
    assert clips == [0, 2, 4, 6, 8]
    assert len(list((exported / AUDIO_DIR).glob("*.ogg"))) == 5
    from s2i.audio import load_audio

    original_audio = load_audio(corpus / "audio" / g.captions[2]["audio"])
    clip_audio = load_audio(exported / g.captions[2]["clip"])
    assert abs(len(clip_audio) - len(original_audio)) < 0.02 * 16000
    # without the corpus: thumbnails and clips only
    moved = tmp_path / "elsewhere"
    shutil.copytree(exported, moved)
    alone = Gallery.load(moved, corpus=tmp_path / "no-corpus")
    assert alone.image_path(2) is None and alone.image(2).size == thumb.size
    assert alone.audio_path(2) == moved / g.captions[2]["clip"] and alone.audio_path(3) is None


def test_export_into_another_folder_and_limits(tmp_path, corpus, exported):
    out = tmp_path / "gallery"
    assert cli(["export", str(exported), "--data", str(corpus), "--out", str(out), "--layout", "pca",
                "--max-images", "3", "--max-clips", "0", "--float32"]) == 0
    g = Gallery.load(out)
    assert g.num_images == 3 and g.num_captions == 6 and not any(c["clip"] for c in g.captions)
    full = Gallery.load(exported)
    torch.testing.assert_close(g.image_embeddings, full.image_embeddings[:3], atol=1e-3, rtol=1e-3)
    from safetensors import safe_open

    for folder, dtype in ((out, "F32"), (exported, "F16")):
        with safe_open(str(folder / "gallery.safetensors"), framework="pt") as f:
            assert f.get_slice("speech_embeddings").get_dtype() == dtype
    assert not (out / "model.safetensors").exists()


def test_export_of_a_model_without_text_or_vq(tmp_path, corpus):
    ckpt = make_checkpoint(tmp_path / "rnn", corpus, name="rnn_small", text=False)
    assert cli(["export", str(ckpt), "--data", str(corpus), "--layout", "pca", "--max-images", "2"]) == 0
    g = Gallery.load(ckpt)
    assert g.text_embeddings is None and g.codes == {} and set(g.layout) == {"image", "speech"}


def test_bad_input_gives_one_line_errors(tmp_path, corpus, exported, capsys):
    assert cli(["export", str(exported), "--data", str(corpus), "--split", "train"]) == 1
    assert "unknown split 'train'" in capsys.readouterr().err
    assert cli(["export", str(exported), "--data", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "no-model"), "--data", str(corpus)]) == 1
    assert "no checkpoint folder" in capsys.readouterr().err
    with pytest.raises(GalleryError, match="no exported gallery"):
        Gallery.load(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "gallery.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(GalleryError, match="not an s2i gallery"):
        Gallery.load(bad)


def test_scene_attributes_are_flattened_for_colouring():
    from s2i.gallery import flatten_scene

    scene = {"layout": "h", "position": "", "objects": [{"kind": "star", "colour": "red", "size": "small"},
                                                         {"kind": "two", "colour": "blue", "size": "large"}]}
    assert flatten_scene(scene) == {"layout": "h", "objects.count": "2", "objects.0.kind": "star",
                                    "objects.0.colour": "red", "objects.0.size": "small"}
    assert flatten_scene({"tags": ["a", "b"], "light": {"hour": 3}}) == {"tags.count": "2", "tags.0": "a",
                                                                          "light.hour": "3"}


def test_clip_choice_spreads_clips_over_images():
    caption_image = torch.tensor([0, 0, 0, 1, 1, 2])
    assert clip_choice(caption_image, 3) == [0, 3, 5]
    assert clip_choice(caption_image, 5) == [0, 1, 3, 4, 5]
    assert clip_choice(caption_image, 0) == []


def test_place_points_is_a_weighted_mean_of_neighbours():
    points = torch.eye(4)
    positions = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    out = place_points(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]), points, positions, k=2)
    torch.testing.assert_close(out[0], positions[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], torch.tensor([5.0, 5.0]), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_umap_layout_separates_clusters():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    points = torch.cat([c + 0.05 * torch.randn(40, 32) for c in centres])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xy, meta = fit_layout(points, method="umap", max_fit=90)
    assert meta["method"] == "umap" and meta["fitted"] == 90 and xy.shape == (120, 2)
    labels = torch.arange(3).repeat_interleave(40)
    means = torch.stack([xy[labels == c].mean(0) for c in range(3)])
    within = torch.stack([(xy[labels == c] - means[c]).norm(dim=1).mean() for c in range(3)]).mean()
    between = torch.cdist(means, means)[~torch.eye(3, dtype=torch.bool)].min()
    assert between > 3 * within
