"""SpokenCOCO (Hsu et al., ACL 2021) as shipped → a :class:`Manifest`.

Expected under ``root`` (the JSONs may also sit one or two folders down):

    SpokenCOCO_train.json, SpokenCOCO_val.json
        {"data": [{"image": "val2014/COCO_val2014_....jpg",
                   "captions": [{"wav": "wavs/val/0/....wav", "text", "speaker", "uttid"}, ...]}, ...]}
    wavs/...                              the audio (``audio_root`` if elsewhere)
    train2014/, val2014/                  MSCOCO 2014 images (``image_root`` if elsewhere)
    dataset_coco.json                     Karpathy's split (optional; ``karpathy`` if elsewhere)

Splits: with Karpathy's ``dataset_coco.json`` the standard ones: ``test`` = its 5,000 test
images (25k captions, the protocol of SpeechCLIP, FaST-VGS, VG-HuBERT), ``val`` = its 5,000 val
images, ``train`` = train + restval. Without it: ``train`` = SpokenCOCO_train, and the images of
SpokenCOCO_val in file order give ``val`` (first 5,000), ``test`` (next 5,000) and the rest goes to
``train`` — the same sizes as Karpathy's split but *not the same images*, so the numbers are not
comparable with papers (a warning says so). Nothing is copied.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from s2i.datasets.corpus import CorpusError, Manifest, find_base, find_in_tree

logger = logging.getLogger(__name__)

SPLIT_FILES = {"SpokenCOCO_train.json": "train", "SpokenCOCO_val.json": "val"}
KARPATHY_NAMES = ("dataset_coco.json",)
HELD_OUT_IMAGES = 5000  # val and test sizes when no Karpathy split is given


def _karpathy_splits(path: Path) -> dict[str, str]:
    """Karpathy's ``dataset_coco.json`` → {"val2014/COCO_val2014_...jpg": split}."""
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        return {f"{im.get('filepath', '')}/{im['filename']}".lstrip("/"): {"restval": "train"}.get(im["split"], im["split"])
                for im in images}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"{path} is not Karpathy's dataset_coco.json (expected images with filepath, filename, "
                          f"split; {e})") from None


def read_spokencoco(root: str | os.PathLike, karpathy: str | os.PathLike | None = None,
                    image_root: str | os.PathLike | None = None, audio_root: str | os.PathLike | None = None,
                    held_out_images: int = HELD_OUT_IMAGES) -> Manifest:
    """Read SpokenCOCO's JSONs under ``root`` into a manifest with train / val / test splits."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"SpokenCOCO folder {root} does not exist")
    files = {source: p for name, source in SPLIT_FILES.items() if (p := find_in_tree(root, [name])) is not None}
    if not files:
        raise CorpusError(f"no SpokenCOCO_train.json / SpokenCOCO_val.json under {root}")
    karpathy_file = Path(karpathy).expanduser() if karpathy else find_in_tree(root, KARPATHY_NAMES)
    if karpathy_file is not None and not karpathy_file.is_file():
        raise CorpusError(f"Karpathy split file not found: {karpathy_file}")
    split_of = _karpathy_splits(karpathy_file) if karpathy_file else None
    if split_of is None:
        logger.warning("no Karpathy dataset_coco.json: val/test are the first %d / next %d images of SpokenCOCO_val, "
                       "not Karpathy's; results are not comparable with published ones (pass --karpathy PATH)",
                       held_out_images, held_out_images)

    problems: list[dict] = []
    docs = {}
    for source, path in files.items():
        try:
            docs[source] = (path, json.loads(path.read_text(encoding="utf-8"))["data"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"{path} is not a SpokenCOCO file (expected {{'data': [{{'image', 'captions'}}]}}; {e})") from None
    any_path, any_doc = next(iter(docs.values()))
    images_sample = [d["image"] for d in any_doc[:50] if isinstance(d, dict) and isinstance(d.get("image"), str)]
    wavs_sample = [c["wav"] for d in any_doc[:20] if isinstance(d, dict)
                   for c in d.get("captions", []) if isinstance(c, dict) and isinstance(c.get("wav"), str)]
    base = any_path.parent
    image_top = find_base([image_root, root, base, root / "images", root / "coco", root / "mscoco", root.parent,
                           root.parent / "coco", root.parent / "mscoco"], images_sample, "COCO images",
                          "pass --image-root FOLDER (the folder holding train2014/ and val2014/)")
    audio_top = find_base([audio_root, base, root, root / "SpokenCOCO"], wavs_sample, "SpokenCOCO audio",
                          "pass --audio-root FOLDER (the folder holding wavs/)")

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    seen_utts: set[str] = set()
    held_out = 0
    for source, (path, data) in docs.items():
        for k, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                problems.append({"file": f"{path}#data[{k}]", "reason": "entry without an 'image' path"})
                continue
            image = entry["image"].lstrip("/")
            if split_of is not None:
                split = split_of.get(image) or split_of.get(f"{Path(image).parent.name}/{Path(image).name}")
                if split not in splits:
                    problems.append({"file": str(image_top / image), "reason": "image is in no split of "
                                     f"{karpathy_file.name}; its captions are left out"})
                    continue
            elif source == "train":
                split = "train"
            else:
                split = "val" if held_out < held_out_images else "test" if held_out < 2 * held_out_images else "train"
                held_out += 1
            for j, cap in enumerate(entry.get("captions") or []):
                if not isinstance(cap, dict) or not isinstance(cap.get("wav"), str):
                    problems.append({"file": f"{path}#data[{k}].captions[{j}]", "reason": "caption without a 'wav' path"})
                    continue
                utt_id = str(cap.get("uttid") or Path(cap["wav"]).stem)
                if utt_id in seen_utts:
                    problems.append({"file": str(audio_top / cap["wav"]), "reason": f"utterance id {utt_id} appears twice"})
                    continue
                seen_utts.add(utt_id)
                splits[split].append({"utt_id": utt_id, "image_id": Path(image).stem, "image": image,
                                      "audio": cap["wav"].lstrip("/"), "text": str(cap.get("text") or ""),
                                      "speaker": str(cap.get("speaker") or "")})
    report = {"source": str(root), "split_files": {s: str(p) for s, (p, _) in docs.items()},
              "splits_from": str(karpathy_file) if karpathy_file else
              f"SpokenCOCO_val file order ({held_out_images} val + {held_out_images} test images; not Karpathy's)"}
    return Manifest(name="spokencoco", splits=splits, image_root=image_top, audio_root=audio_top, problems=problems,
                    report=report)
