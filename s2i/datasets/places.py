"""Places Audio Captions (Harwath et al.; the 400k release with its 2020 splits) → a :class:`Manifest`.

Expected under ``root`` (the JSONs may also sit one or two folders down):

    train_2020.json, dev_seen_2020.json, dev_unseen_2020.json, test_seen_2020.json, test_unseen_2020.json
        {"image_base_path": ..., "audio_base_path": ...,
         "data": [{"uttid", "image", "wav", "speaker"?, "asr_text"?}, ...]}
    (or the original release's train.json / val.json, same format)

One spoken caption per image. Split names: ``train``, ``val`` (dev_seen), ``val_unseen``,
``test`` (test_seen), ``test_unseen``; legacy ``train.json`` / ``val.json`` → ``train`` / ``val``.
The JSONs' base paths are those of the authors' machines, so images and wavs are looked for under
``image_root`` / ``audio_root`` when given, else the base path itself, else ``root`` joined with the
base path or its last folder name, else ``root``. Nothing is copied.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from s2i.datasets.corpus import CorpusError, Manifest, find_base, find_in_tree

logger = logging.getLogger(__name__)

SPLIT_FILES = {"train_2020.json": "train", "dev_seen_2020.json": "val", "dev_unseen_2020.json": "val_unseen",
               "test_seen_2020.json": "test", "test_unseen_2020.json": "test_unseen"}
LEGACY_FILES = {"train.json": "train", "val.json": "val"}


def _candidates(explicit, base: str, root: Path, json_dir: Path) -> list:
    base = base or ""
    tail = Path(base.rstrip("/")).name if base else ""
    return [explicit, base if os.path.isabs(base) else None, root / base, json_dir / base,
            root / tail if tail else None, json_dir / tail if tail else None, root, json_dir]


def read_places(root: str | os.PathLike, image_root: str | os.PathLike | None = None,
                audio_root: str | os.PathLike | None = None) -> Manifest:
    """Read the Places Audio Captions split JSONs under ``root`` into a manifest."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"Places folder {root} does not exist")
    files = {}
    for name, split in SPLIT_FILES.items():
        path = find_in_tree(root, [name])
        if path is not None:
            files[split] = path
    if not files:
        files = {split: p for name, split in LEGACY_FILES.items() if (p := find_in_tree(root, [name])) is not None}
    if not files:
        raise CorpusError(f"no Places split files under {root}: expected {sorted(SPLIT_FILES)} "
                          f"(or the original {sorted(LEGACY_FILES)})")
    if "train" not in files:
        logger.warning("no training split file under %s (found %s)", root, sorted(files))

    problems: list[dict] = []
    absolute: dict[str, list[tuple[dict, Path, Path]]] = {}
    image_bases, audio_bases = set(), set()
    for split, path in files.items():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            entries = doc["data"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"{path} is not a Places split file (expected {{'data': [...], 'image_base_path', "
                              f"'audio_base_path'}}; {e})") from None
        good = []
        for k, e in enumerate(entries):
            if not isinstance(e, dict) or not all(isinstance(e.get(key), str) for key in ("image", "wav")):
                problems.append({"file": f"{path}#data[{k}]", "reason": "entry without 'image' and 'wav' paths"})
                continue
            good.append(e)
        sample = good[:50]
        image_base = find_base(_candidates(image_root, doc.get("image_base_path", ""), root, path.parent),
                               [e["image"].lstrip("/") for e in sample], f"images of {path.name}",
                               "pass --image-root FOLDER (the folder the JSON's 'image' paths start from)")
        audio_base = find_base(_candidates(audio_root, doc.get("audio_base_path", ""), root, path.parent),
                               [e["wav"].lstrip("/") for e in sample], f"audio of {path.name}",
                               "pass --audio-root FOLDER (the folder the JSON's 'wav' paths start from)")
        image_bases.add(image_base)
        audio_bases.add(audio_base)
        absolute[split] = [(e, image_base / e["image"].lstrip("/"), audio_base / e["wav"].lstrip("/")) for e in good]

    # one image root and one audio root for the whole corpus (normally every split file shares them)
    image_top = Path(os.path.commonpath([str(b) for b in image_bases]))
    audio_top = Path(os.path.commonpath([str(b) for b in audio_bases]))
    splits: dict[str, list[dict]] = {}
    seen_utts: set[str] = set()
    for split, rows in absolute.items():
        records = []
        for e, image, wav in rows:
            utt_id = str(e.get("uttid") or Path(e["wav"]).stem)
            if utt_id in seen_utts:
                problems.append({"file": str(wav), "reason": f"utterance id {utt_id} appears twice (split {split})"})
                continue
            seen_utts.add(utt_id)
            rel_image = os.path.relpath(image, image_top)
            records.append({"utt_id": utt_id, "image_id": str(Path(rel_image).with_suffix("")),
                            "image": rel_image, "audio": os.path.relpath(wav, audio_top),
                            "text": str(e.get("asr_text") or ""), "speaker": str(e.get("speaker") or "")})
        splits[split] = records
    report = {"source": str(root), "split_files": {s: str(p) for s, p in files.items()}}
    return Manifest(name="places", splits=splits, image_root=image_top, audio_root=audio_top, problems=problems,
                    report=report)
