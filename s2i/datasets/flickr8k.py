"""The Flickr8k Audio Caption Corpus (Harwath & Glass, ASRU 2015) as shipped → a :class:`Manifest`.

Expected under ``root`` (the folders as the downloads unpack; metadata files may also sit one or
two folders down):

    flickr_audio/wavs/<imgid>_<n>.wav     40,000 spoken captions (5 per image)
    flickr_audio/wav2capt.txt             one line per wav: ``<wav> <image file> #<n>``
    flickr_audio/wav2spk.txt              one line per wav: ``<wav> <speaker id>``
    Flicker8k_Dataset/<imgid>.jpg         the images (the folder name is misspelled in the release)
    dataset.json | dataset_flickr8k.json  Karpathy's split with the caption text, or else
    Flickr_8k.{train,dev,test}Images.txt + Flickr8k.token.txt   the official split and text

Wavs are matched to images and caption numbers through ``wav2capt.txt`` (one pass; the seed
scanned every image name against every wav name). Splits: Karpathy's ``train`` (+ ``restval``),
``val``, ``test`` (6,000 / 1,000 / 1,000 images), or the official train/dev/test lists (dev → val).
The manifest points into ``root``; nothing is copied. Lines that point nowhere and captions of
images in no split are listed as problems; the files themselves are checked by ``prepare``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from s2i.datasets.corpus import CorpusError, Manifest, find_in_tree

logger = logging.getLogger(__name__)

KARPATHY_NAMES = ("dataset.json", "dataset_flickr8k.json")
SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
TOKEN_FILE = "Flickr8k.token.txt"


def _image_splits(root: Path, karpathy: str | os.PathLike | None) -> tuple[dict[str, str], dict[str, list[str]], str]:
    """→ (image file → split, image file → caption texts, where it came from)."""
    path = Path(karpathy).expanduser() if karpathy else find_in_tree(root, KARPATHY_NAMES)
    if path is not None:
        if not path.is_file():
            raise CorpusError(f"Karpathy split file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            images = data["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"{path} is not Karpathy's dataset.json (expected {{'images': [...]}}; {e})") from None
        split_of, texts = {}, {}
        for im in images:
            split = {"restval": "train"}.get(im.get("split"), im.get("split"))
            split_of[im["filename"]] = split
            texts[im["filename"]] = [s.get("raw", " ".join(s.get("tokens", []))).strip() for s in im.get("sentences", [])]
        return split_of, texts, str(path)
    lists = {split: find_in_tree(root, [name]) for split, name in SPLIT_LISTS.items()}
    if not all(lists.values()):
        raise CorpusError(f"no split definition under {root}: expected Karpathy's dataset.json (or pass --karpathy "
                          f"PATH), or the Flickr8k text files {sorted(SPLIT_LISTS.values())}")
    split_of = {}
    for split, file in lists.items():
        for line in file.read_text(encoding="utf-8").split():
            split_of[line.strip()] = split
    texts: dict[str, list[str]] = {}
    token_file = find_in_tree(root, [TOKEN_FILE])
    if token_file is None:
        logger.warning("no %s under %s: captions will have no text", TOKEN_FILE, root)
    else:
        for line in token_file.read_text(encoding="utf-8").splitlines():
            key, _, text = line.partition("\t")
            image, _, n = key.partition("#")
            if text and n.isdigit():
                caps = texts.setdefault(image, [])
                caps.extend([""] * (int(n) + 1 - len(caps)))
                caps[int(n)] = text.strip()
    return split_of, texts, str(lists["train"].parent)


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty whitespace-separated lines → [(line number, fields)]."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [(no, line.split()) for no, line in enumerate(lines, 1) if line.strip()]


def read_flickr8k(root: str | os.PathLike, karpathy: str | os.PathLike | None = None) -> Manifest:
    """Read the shipped Flickr8k audio + image layout under ``root`` into a manifest."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"Flickr8k folder {root} does not exist")
    wav2capt = find_in_tree(root, ["wav2capt.txt"])
    if wav2capt is None:
        raise CorpusError(f"no flickr_audio/wav2capt.txt under {root}: is this the Flickr8k Audio Caption Corpus?")
    audio_dir = wav2capt.parent / "wavs"
    image_dir = next((p for p in (root / "Flicker8k_Dataset", root / "Flickr8k_Dataset", root / "Images")
                      if p.is_dir()), root / "Flicker8k_Dataset")
    split_of, texts, split_source = _image_splits(root, karpathy)

    speakers: dict[str, str] = {}
    wav2spk = wav2capt.parent / "wav2spk.txt"
    if wav2spk.is_file():
        for _, fields in _read_rows(wav2spk):
            if len(fields) >= 2:
                speakers[fields[0]] = fields[1]
    else:
        logger.warning("no %s: speakers unknown", wav2spk)

    problems: list[dict] = []
    by_image: dict[str, list[tuple[int, str, str]]] = {}
    seen: set[str] = set()
    for no, fields in _read_rows(wav2capt):
        where = f"{wav2capt}:{no}"
        if len(fields) < 3 or not fields[2].startswith("#") or not fields[2][1:].isdigit():
            problems.append({"file": where, "reason": "malformed line: expected '<wav> <image> #<n>'",
                             "line": " ".join(fields)})
            continue
        wav, image, n = fields[0], fields[1], int(fields[2][1:])
        if wav in seen:
            problems.append({"file": str(audio_dir / wav), "reason": f"listed twice in wav2capt.txt (line {no})"})
            continue
        seen.add(wav)
        if image not in split_of:
            problems.append({"file": str(audio_dir / wav), "reason": f"image {image} is in no split ({where})"})
            continue
        by_image.setdefault(image, []).append((n, wav, where))

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    no_text = 0
    for image, split in split_of.items():  # the split file's image order
        if split not in splits:
            continue
        for n, wav, where in sorted(by_image.get(image, [])):
            caps = texts.get(image, [])
            text = caps[n] if n < len(caps) else ""
            no_text += not text
            splits[split].append({"utt_id": Path(wav).stem, "image_id": Path(image).stem, "image": image,
                                  "audio": wav, "text": text, "speaker": speakers.get(wav, ""), "caption": n})
    without_audio = sum(1 for im, s in split_of.items() if s in splits and im not in by_image)
    unlisted = 0
    if audio_dir.is_dir():
        with os.scandir(audio_dir) as it:
            unlisted = sum(1 for e in it if e.name.endswith(".wav") and e.name not in seen)
    if no_text:
        logger.warning("%d captions have no text in %s", no_text, split_source)
    report = {"source": str(root), "splits_from": split_source, "wav2capt": str(wav2capt),
              "images_without_captions": without_audio, "wavs_not_in_wav2capt": unlisted,
              "captions_without_text": no_text}
    return Manifest(name="flickr8k", splits=splits, image_root=image_dir.resolve(), audio_root=audio_dir.resolve(),
                    problems=problems, report=report)
