"""Readers of the real corpora's shipped layouts, on tiny trees made here in each exact layout.

Each tree holds a few spoken captions (eSpeak speech when available, else tone sweeps) and small
generated JPEGs, plus broken entries: a missing wav, an empty / truncated / corrupt wav, a metadata
line pointing nowhere and an image that does not decode. ``prepare`` must list every one of them
by name and reason, keep everything else, and give a corpus a DataLoader can run over.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from s2i.cli import main as cli
from s2i.datasets.corpus import BucketBatchSampler, CorpusError, PairedDataset, collate, read_corpus, read_split
from s2i.datasets.flickr8k import read_flickr8k
from s2i.datasets.places import read_places
from s2i.datasets.spokencoco import read_spokencoco

WORDS = ["a dog runs on the grass", "two people walk near a lake", "a red car on a street", "children play football",
         "a cat sleeps on a sofa", "a man rides a bike", "boats in a harbour", "a bird on a branch"]


def _speech(index: int) -> tuple[np.ndarray, int]:
    text = WORDS[index % len(WORDS)]
    try:
        from s2i.datasets.speech_synthesis import synthesize

        utt = synthesize(text, voice="en-us" if index % 2 else "en-gb-x-rp", rate=200 + 10 * (index % 5))
        return utt.audio, utt.sample_rate
    except ImportError:
        rate, seconds = 16000, 0.4 + 0.1 * (index % 5)
        t = np.arange(int(rate * seconds)) / rate
        return (0.3 * np.sin(2 * np.pi * (200 + 800 * t * (1 + index % 3)) * t)).astype(np.float32), rate


def _wav(path: Path, index: int, kind: str = "ok") -> None:
    """Write a wav, or a broken one: "empty" (0 bytes), "truncated" (data cut), "corrupt" (not audio)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "corrupt":
        path.write_bytes(b"RIFX this was never a wave file" * 10)
        return
    audio, rate = _speech(index)
    sf.write(path, audio, rate, subtype="PCM_16")
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: 44 + (len(data) - 44) // 2])


def _jpeg(path: Path, index: int, broken: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if broken:
        path.write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
        return
    rng = np.random.default_rng(index)
    h, w = 36 + 4 * (index % 3), 48
    pixels = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y:y + h // 2, x:x + w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _problems(out: Path) -> dict[str, str]:
    return {p["file"]: p["reason"] for p in json.loads((out / "problems.json").read_text())}


def _run_loader(out: Path, split: str, **kwargs) -> int:
    ds = PairedDataset(out, split, **kwargs)
    sampler = BucketBatchSampler(ds.lengths, 2, caption_image=ds.caption_image, seed=0)
    n = 0
    for batch in torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0):
        assert batch["audio"].shape[0] == batch["image"].shape[0] == len(batch["utt_id"])
        assert torch.isfinite(batch["audio"]).all() and (batch["audio_lengths"] > 0).all()
        n += len(batch["utt_id"])
    return n


# ---------------------------------------------------------------------------------------------
# Flickr8k Audio Caption Corpus
# ---------------------------------------------------------------------------------------------
FLICKR_SPLITS = {"1000268201_693b08cb0e": "train", "1001773457_577c3a7d70": "train", "1002674143_1b742ab4b8": "train",
                 "1003163366_44323f5815": "val", "1007129816_e794419615": "test", "1007320043_627395c3d8": "test"}
BROKEN_FLICKR_IMAGE = "1007320043_627395c3d8"
NO_SPLIT_IMAGE = "1009434119_febe49276a"


def _flickr_tree(root: Path, karpathy: bool = True) -> dict[str, Path]:
    wavs = root / "flickr_audio" / "wavs"
    capt, spk = [], []
    broken = {"1001773457_577c3a7d70_1.wav": "missing", "1002674143_1b742ab4b8_0.wav": "empty",
              "1003163366_44323f5815_1.wav": "truncated"}
    k = 0
    for image in list(FLICKR_SPLITS) + [NO_SPLIT_IMAGE]:
        _jpeg(root / "Flicker8k_Dataset" / f"{image}.jpg", k, broken=image == BROKEN_FLICKR_IMAGE)
        for n in range(2):
            wav = f"{image}_{n}.wav"
            kind = broken.get(wav, "ok")
            if kind != "missing":
                _wav(wavs / wav, k, kind)
            capt.append(f"{wav} {image}.jpg #{n}")
            spk.append(f"{wav} {k % 3 + 1}")
            k += 1
    capt.insert(3, "this line is not a wav2capt line")
    _wav(wavs / "1234_unlisted_0.wav", 0)  # on disk but in no metadata: counted, not used
    (root / "flickr_audio" / "wav2capt.txt").write_text("\n".join(capt) + "\n")
    (root / "flickr_audio" / "wav2spk.txt").write_text("\n".join(spk) + "\n")
    texts = {image: [f"{WORDS[i % 8]} ({image} #{n})" for n in range(5)] for i, image in enumerate(FLICKR_SPLITS)}
    if karpathy:
        images = [{"filename": f"{im}.jpg", "imgid": i, "split": s,
                   "sentences": [{"raw": t, "tokens": t.split(), "sentid": 5 * i + n} for n, t in enumerate(texts[im])]}
                  for i, (im, s) in enumerate(FLICKR_SPLITS.items())]
        (root / "dataset.json").write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    else:
        text_dir = root / "Flickr8k_text"
        text_dir.mkdir()
        for split, name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
            (text_dir / f"Flickr_8k.{name}.txt").write_text(
                "".join(f"{im}.jpg\n" for im, s in FLICKR_SPLITS.items() if s == split))
        (text_dir / "Flickr8k.token.txt").write_text(
            "".join(f"{im}.jpg#{n}\t{t}\n" for im, ts in texts.items() for n, t in enumerate(ts)))
    return {"missing": wavs / "1001773457_577c3a7d70_1.wav", "empty": wavs / "1002674143_1b742ab4b8_0.wav",
            "truncated": wavs / "1003163366_44323f5815_1.wav",
            "image": root / "Flicker8k_Dataset" / f"{BROKEN_FLICKR_IMAGE}.jpg", "no_split": wavs / f"{NO_SPLIT_IMAGE}_0.wav"}


def test_flickr8k_prepare_reports_broken_files_and_loads(tmp_path, caplog):
    root, out = tmp_path / "flickr8k", tmp_path / "prepared"
    bad = _flickr_tree(root)
    with caplog.at_level(logging.WARNING):
        code = cli(["prepare", "flickr8k", "--root", str(root), "--out", str(out), "--features", "mfcc",
                    "--image-features", "pixels", "--image-size", "32", "--workers", "2"])
    assert code == 0
    problems = _problems(out)
    assert "not found" in problems[str(bad["missing"])]
    assert "empty" in problems[str(bad["empty"])]
    assert problems[str(bad["truncated"])].startswith("truncated")
    assert "cannot be decoded" in problems[str(bad["image"])]
    other = bad["no_split"].with_name(f"{NO_SPLIT_IMAGE}_1.wav")
    assert "in no split" in problems[str(bad["no_split"])] and "in no split" in problems[str(other)]
    assert any("malformed line" in r for r in problems.values())
    assert len(problems) == 7
    for path in (bad["missing"], bad["empty"], bad["truncated"], bad["image"]):
        assert path.name in caplog.text  # named in the log too
    info = read_corpus(out)
    assert info.report["problems"]["count"] == 7 and info.report["wavs_not_in_wav2capt"] == 1
    assert {s: v["utterances"] for s, v in info.splits.items()} == {"train": 4, "val": 1, "test": 2}
    assert info.audio_root == (root / "flickr_audio" / "wavs").resolve()  # points into the user's tree
    assert not list(out.rglob("*.wav"))  # no audio copied
    train = read_split(out, "train")
    first = train[0]
    assert first["utt_id"] == "1000268201_693b08cb0e_0" and first["image"] == "1000268201_693b08cb0e.jpg"
    assert first["text"].startswith(WORDS[0]) and first["speaker"] == "1" and first["num_samples"] > 0
    assert info.report["caches"]["audio-mfcc/train"]["failed"] == 0
    ds = PairedDataset(out, "train", features="mfcc")
    assert ds.audio_cache is not None and ds.image_cache is not None and ds.image_size == 32
    assert _run_loader(out, "train", features="mfcc") == 4
    assert _run_loader(out, "test", features="mfcc") == 2


def test_flickr8k_official_text_files(tmp_path):
    root = tmp_path / "flickr8k"
    _flickr_tree(root, karpathy=False)
    manifest = read_flickr8k(root)
    sizes = {s: len(r) for s, r in manifest.splits.items()}
    assert sizes == {"train": 6, "val": 2, "test": 4}  # files are only checked by prepare
    val = manifest.splits["val"]
    assert [r["utt_id"] for r in val] == ["1003163366_44323f5815_0", "1003163366_44323f5815_1"]
    assert val[1]["text"] == f"{WORDS[3]} (1003163366_44323f5815 #1)"
    with pytest.raises(CorpusError, match="no split definition"):
        read_flickr8k(tmp_path / "flickr8k" / "flickr_audio")


# ---------------------------------------------------------------------------------------------
# Places Audio Captions (2020 splits)
# ---------------------------------------------------------------------------------------------
PLACES_FILES = {"train_2020.json": 5, "dev_seen_2020.json": 2, "dev_unseen_2020.json": 1, "test_seen_2020.json": 2,
                "test_unseen_2020.json": 1}


def _places_tree(root: Path) -> dict[str, Path]:
    scenes = ["a/abbey", "b/beach", "k/kitchen", "f/forest_path"]
    k = 0
    bad = {}
    for name, count in PLACES_FILES.items():
        data = []
        for j in range(count):
            image = f"{scenes[k % 4]}/gsun_{k:04x}e3b1c0.jpg"
            wav = f"wavs/{k // 4}/utterance_{1000 + k}.wav"
            kind = "ok"
            if name == "train_2020.json" and j == 1:
                kind = "missing"
            elif name == "train_2020.json" and j == 3:
                kind = "corrupt"
            broken_image = name == "test_seen_2020.json" and j == 0
            _jpeg(root / "images" / image, k, broken=broken_image)
            if kind != "missing":
                _wav(root / "PlacesAudio_400k_distro" / wav, k, kind)
            if kind != "ok":
                bad[kind] = root / "PlacesAudio_400k_distro" / wav
            if broken_image:
                bad["image"] = root / "images" / image
            entry = {"uttid": f"A{k:04d}-GSUN_{k:04X}", "image": image, "wav": wav, "speaker": f"A{k % 3}"}
            if k % 2:
                entry["asr_text"] = WORDS[k % 8]
            data.append(entry)
            k += 1
        doc = {"image_base_path": "/data/sls/scratch/places/images/",
               "audio_base_path": "/data/sls/PlacesAudio_400k_distro/", "data": data}
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        (root / "metadata" / name).write_text(json.dumps(doc))
    return bad


def test_places_prepare_with_backbone_features(tmp_path):
    root, out = tmp_path / "places", tmp_path / "prepared"
    bad = _places_tree(root)
    code = cli(["prepare", "places", "--root", str(root), "--out", str(out), "--features", "fbank",
                "--image-features", "resnet18-center", "--image-weights", "random", "--workers", "0", "--device", "cpu"])
    assert code == 0
    problems = _problems(out)
    assert set(problems) == {str(bad["missing"]), str(bad["corrupt"]), str(bad["image"])}
    assert "not found" in problems[str(bad["missing"])] and "not a readable audio file" in problems[str(bad["corrupt"])]
    info = read_corpus(out)
    assert {s: v["utterances"] for s, v in info.splits.items()} == {"train": 3, "val": 2, "val_unseen": 1, "test": 1,
                                                                     "test_unseen": 1}
    assert info.image_root == (root / "images").resolve()
    rec = read_split(out, "val")[1]
    assert rec["image"] == "k/kitchen/gsun_0006e3b1c0.jpg" and rec["image_id"] == "k/kitchen/gsun_0006e3b1c0"
    assert rec["audio"] == "wavs/1/utterance_1006.wav" and rec["text"] == "" and rec["speaker"] == "A0"
    assert read_split(out, "val")[0]["text"] == WORDS[5]  # asr_text kept
    assert _run_loader(out, "train", features="fbank", image_input="resnet18-center") == 3
    ds = PairedDataset(out, "val_unseen", features="fbank", image_input="resnet18-center")
    assert ds[0]["image"].shape == (512,)


def test_places_roots_can_be_given(tmp_path):
    root = tmp_path / "places"
    _places_tree(root)
    (root / "images").rename(tmp_path / "elsewhere")
    with pytest.raises(CorpusError, match="--image-root"):
        read_places(root)
    manifest = read_places(root, image_root=tmp_path / "elsewhere")
    assert Path(manifest.image_root) == (tmp_path / "elsewhere").resolve()
    assert sum(len(r) for r in manifest.splits.values()) == sum(PLACES_FILES.values())


# ---------------------------------------------------------------------------------------------
# SpokenCOCO
# ---------------------------------------------------------------------------------------------
COCO_KARPATHY = {"val2014/COCO_val2014_000000000101.jpg": "val", "val2014/COCO_val2014_000000000102.jpg": "test",
                 "val2014/COCO_val2014_000000000103.jpg": "test", "val2014/COCO_val2014_000000000104.jpg": "restval"}


def _coco_tree(root: Path, karpathy: bool = True) -> dict[str, Path]:
    spoken = root / "SpokenCOCO"
    bad = {}
    k = 0
    for source, images in (("train", [f"train2014/COCO_train2014_00000000000{i}.jpg" for i in (1, 2, 3)]),
                           ("val", list(COCO_KARPATHY) + ["val2014/COCO_val2014_000000000105.jpg"])):
        data = []
        for image in images:
            broken_image = image.endswith("000000000103.jpg")
            _jpeg(root / "coco" / image, k, broken=broken_image)
            if broken_image:
                bad["image"] = root / "coco" / image
            captions = []
            for n in range(2):
                wav = f"wavs/{source}/{k % 2}/m{k:03d}x-{Path(image).stem}_{n}.wav"
                kind = "missing" if (source, k, n) == ("train", 1, 0) else "truncated" if (source, k, n) == ("val", 3, 1) else "ok"
                if kind != "missing":
                    _wav(spoken / wav, 2 * k + n, kind)
                if kind != "ok":
                    bad[kind] = spoken / wav
                captions.append({"wav": wav, "text": WORDS[(2 * k + n) % 8].upper(), "speaker": f"m{k:03d}x",
                                 "uttid": f"m{k:03d}x-{Path(image).stem}_{n}"})
            data.append({"image": image, "captions": captions})
            k += 1
        (spoken / f"SpokenCOCO_{source}.json").write_text(json.dumps({"data": data}))
    if karpathy:
        entries = [{"filepath": "train2014", "filename": f"COCO_train2014_00000000000{i}.jpg", "split": "train"}
                   for i in (1, 2, 3)]
        entries += [{"filepath": p.split("/")[0], "filename": p.split("/")[1], "split": s} for p, s in COCO_KARPATHY.items()]
        (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    bad["no_split"] = root / "coco" / "val2014" / "COCO_val2014_000000000105.jpg"
    return bad


def test_spokencoco_prepare_karpathy_split(tmp_path):
    root, out = tmp_path / "data", tmp_path / "prepared"
    bad = _coco_tree(root)
    code = cli(["prepare", "spokencoco", "--root", str(root / "SpokenCOCO"), "--out", str(out),
                "--karpathy", str(root / "dataset_coco.json"), "--features", "fbank", "--image-features", "pixels",
                "--image-size", "32", "--workers", "1"])
    assert code == 0
    problems = _problems(out)
    assert set(problems) == {str(bad["missing"]), str(bad["truncated"]), str(bad["image"]), str(bad["no_split"])}
    assert problems[str(bad["truncated"])].startswith("truncated") and "in no split" in problems[str(bad["no_split"])]
    info = read_corpus(out)
    # train: 3 train2014 images (one caption missing) + the restval image; val: 1 image (one caption truncated);
    # test: 2 images, one broken
    assert {s: v["utterances"] for s, v in info.splits.items()} == {"train": 7, "val": 1, "test": 2}
    assert {s: v["images"] for s, v in info.splits.items()} == {"train": 4, "val": 1, "test": 1}
    assert info.image_root == (root / "coco").resolve() and info.audio_root == (root / "SpokenCOCO").resolve()
    rec = read_split(out, "test")[0]
    assert rec["image"] == "val2014/COCO_val2014_000000000102.jpg" and rec["image_id"] == "COCO_val2014_000000000102"
    assert rec["audio"].startswith("wavs/val/") and rec["text"].isupper() and rec["speaker"] == "m004x"
    assert _run_loader(out, "train", features="fbank") == 7
    assert _run_loader(out, "test", features="fbank", image_size=32) == 2


def test_spokencoco_without_karpathy_holds_out_val_images(tmp_path, caplog):
    root = tmp_path / "data"
    _coco_tree(root, karpathy=False)
    with caplog.at_level(logging.WARNING):
        manifest = read_spokencoco(root / "SpokenCOCO", held_out_images=2)
    assert "not comparable" in caplog.text
    images = {s: list(dict.fromkeys(r["image"] for r in rs)) for s, rs in manifest.splits.items()}
    assert images["val"] == list(COCO_KARPATHY)[:2] and images["test"] == list(COCO_KARPATHY)[2:4]
    assert images["train"][-1] == "val2014/COCO_val2014_000000000105.jpg" and len(images["train"]) == 4


def test_prepare_errors_are_one_line(tmp_path, capsys):
    assert cli(["prepare", "flickr8k", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert cli(["prepare", "places", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no Places split files" in capsys.readouterr().err
    assert cli(["prepare"]) == 1
    assert "choose what to prepare" in capsys.readouterr().err


def test_prepare_synthetic_then_builds_its_caches(tmp_path, monkeypatch):
    synthetic = pytest.importorskip("s2i.datasets.synthetic")
    from s2i.datasets.corpus import Manifest, write_corpus

    def tiny_generator(args) -> int:  # stands in for the (slow) TTS corpus generator
        out = Path(args.out)
        records = []
        for i in range(3):
            _jpeg(out / "images" / f"s{i}.png", i)
            _wav(out / "audio" / f"s{i}.wav", i)
            records.append({"utt_id": f"s{i}", "image_id": f"s{i}", "image": f"s{i}.png", "audio": f"s{i}.wav",
                            "text": WORDS[i], "speaker": "espeak"})
        write_corpus(out, Manifest("synthetic", {"train": records}, "images", "audio"))
        return 0

    monkeypatch.setattr(synthetic, "run", tiny_generator)
    out = tmp_path / "syn"
    assert cli(["prepare", "synthetic", "--out", str(out), "--features", "mfcc", "--image-size", "24"]) == 0
    info = read_corpus(out)
    assert set(info.report["caches"]) == {"audio-mfcc/train", "pixels-24/train"}
    ds = PairedDataset(out, "train", features="mfcc")
    assert ds.audio_cache is not None and ds.image_size == 24 and ds[0]["image"].shape == (3, 24, 24)
