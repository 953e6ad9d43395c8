"""The prepared-corpus format, and the one dataset + batching layer every corpus goes through.

A prepared corpus is a folder (see docs/DESIGN.md):

    CORPUS/corpus.json     what the corpus is: name, splits with their sizes, where images and audio live
    CORPUS/<split>.jsonl   one utterance per line: utt_id, image_id, image, audio, text, speaker, ...
    CORPUS/cache/          feature caches (``s2i.datasets.cache``), optional

:class:`PairedDataset` turns a split into (spoken caption, image) items. Speech features come from
the memory-mapped cache when one matches the split, else are computed on the fly from the audio
file (always on the fly when a waveform ``augment`` is given, in the DataLoader worker). Images are
pixels (from the pixel cache or decoded with PIL) or a cached feature vector.

:class:`BucketBatchSampler` makes batches of similar length (little padding), optionally with at
most one caption per image per batch, split evenly over DDP ranks, and optionally with hard
negatives: captions of similar images (:func:`similar_images`) put into the same batch;
:class:`RandomBatchSampler` is the seed's unsorted batching, kept to measure what bucketing buys
(:func:`padding_fraction`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from s2i.files import read_header, write_text

logger = logging.getLogger(__name__)

FORMAT = "s2i-corpus"
VERSION = 1
SAMPLE_RATE = 16000
#: keys every utterance record must have (``words``, ``phones``, ``scene``, ``num_samples`` are optional)
RECORD_KEYS = ("utt_id", "image_id", "image", "audio", "text", "speaker")
AUDIO_FEATURES = ("fbank", "mfcc")


class CorpusError(ValueError):
    """A corpus folder, manifest or file that cannot be used; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The format: reading and writing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusInfo:
    """``corpus.json`` of a prepared corpus, with its roots resolved to absolute paths."""

    root: Path
    name: str
    sample_rate: int
    splits: dict[str, dict[str, int]]
    image_root: Path
    audio_root: Path
    report: dict[str, Any] = field(default_factory=dict)

    def split_file(self, split: str) -> Path:
        if split not in self.splits:
            raise CorpusError(f"unknown split {split!r} in corpus {self.root}; known splits: "
                              f"{', '.join(sorted(self.splits)) or '(none)'}")
        return self.root / f"{split}.jsonl"

    def audio_path(self, record: dict) -> Path:
        return self.audio_root / record["audio"]

    def image_path(self, record: dict) -> Path:
        return self.image_root / record["image"]

    @property
    def cache_root(self) -> Path:
        return self.root / "cache"


def read_corpus(corpus_dir: str | os.PathLike) -> CorpusInfo:
    """Read and check ``corpus_dir/corpus.json``."""
    root = Path(corpus_dir).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus folder {root} does not exist; make one with `python -m s2i prepare ...`")
    if not root.is_dir():
        raise CorpusError(f"{root} is a file; a prepared corpus is a folder holding corpus.json")
    meta_file = root / "corpus.json"
    if not meta_file.is_file():
        raise CorpusError(f"{root} is not a prepared corpus: it has no corpus.json "
                          "(make one with `python -m s2i prepare ...`)")
    meta = read_header(meta_file, FORMAT, VERSION, CorpusError, "corpus description",
                       "re-run `python -m s2i prepare`", oldest=VERSION)
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise CorpusError(f"{meta_file}: 'splits' must map split names to {{'utterances': n, 'images': n}}")
    rate = meta.get("sample_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise CorpusError(f"{meta_file}: sample_rate {rate!r}; s2i corpora are {SAMPLE_RATE} Hz")
    for key in ("image_root", "audio_root"):
        if not isinstance(meta.get(key), str):
            raise CorpusError(f"{meta_file}: {key!r} must be a folder path (relative to the corpus or absolute)")

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else root / path

    return CorpusInfo(root=root, name=str(meta.get("name", root.name)), sample_rate=SAMPLE_RATE,
                      splits={k: dict(v) for k, v in splits.items()}, image_root=resolve(meta["image_root"]),
                      audio_root=resolve(meta["audio_root"]), report=dict(meta.get("report") or {}))


def read_split(corpus_dir: str | os.PathLike | CorpusInfo, split: str) -> list[dict]:
    """The utterance records of one split, in file order (checked for the required keys)."""
    info = corpus_dir if isinstance(corpus_dir, CorpusInfo) else read_corpus(corpus_dir)
    path = info.split_file(split)
    if not path.is_file():
        raise CorpusError(f"split {split!r} is listed in {info.root / 'corpus.json'} but {path} is missing; "
                          "re-run `python -m s2i prepare`")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            missing = [k for k in RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(RECORD_KEYS)
            if missing:
                raise CorpusError(f"{path}:{line_no}: utterance record lacks {missing}")
            records.append(rec)
    return records


@dataclass
class Manifest:
    """A corpus before it is written: what a reader of a shipped layout produces.

    ``splits`` maps split name → utterance records; ``image_root`` / ``audio_root`` are the folders
    the records' ``image`` / ``audio`` paths are relative to (absolute, or relative to the corpus
    folder); ``problems`` lists files that were left out, as ``{"file", "reason", ...}`` dicts.
    """

    name: str
    splits: dict[str, list[dict]]
    image_root: str | Path
    audio_root: str | Path
    problems: list[dict] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def problem_summary(problems: list[dict], keep: int = 100) -> dict[str, Any]:
    """Counts per reason plus the first ``keep`` problems, for ``corpus.json``'s report."""
    by_reason: dict[str, int] = {}
    for p in problems:
        key = str(p.get("reason", "")).split(":")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
    return {"count": len(problems), "by_reason": by_reason, "first": problems[:keep]}


def write_corpus(out_dir: str | os.PathLike, manifest: Manifest) -> CorpusInfo:
    """Write ``corpus.json`` and one ``<split>.jsonl`` per split (each file replaced atomically).

    The full list of problems goes to ``out_dir/problems.json``; ``corpus.json`` keeps a summary.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, records in manifest.splits.items():
        for rec in records:
            missing = [k for k in RECORD_KEYS if k not in rec]
            if missing:
                raise CorpusError(f"utterance {rec.get('utt_id', rec)!r} of split {split!r} lacks {missing}")
        write_text(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        splits[split] = {"utterances": len(records), "images": len({r["image_id"] for r in records})}
    write_text(out / "problems.json", json.dumps(manifest.problems, indent=1, ensure_ascii=False))
    report = dict(manifest.report)
    report["problems"] = problem_summary(manifest.problems)
    meta = {"format": FORMAT, "version": VERSION, "name": manifest.name, "sample_rate": SAMPLE_RATE,
            "splits": splits, "image_root": str(manifest.image_root), "audio_root": str(manifest.audio_root),
            "report": report}
    write_text(out / "corpus.json", json.dumps(meta, indent=1, ensure_ascii=False))
    return read_corpus(out)


def find_in_tree(root: str | os.PathLike, names: Sequence[str], depth: int = 2) -> Path | None:
    """The first file called one of ``names`` in ``root`` or its sub-folders (``depth`` levels),
    shallowest first: where a shipped corpus keeps its metadata files varies between downloads."""
    level = [Path(root)]
    for _ in range(depth + 1):
        for folder in level:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        level = [p for folder in level for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")
                 and p.name not in ("wavs", "cache")]
    return None


def find_base(candidates: Sequence[str | os.PathLike | None], relative_paths: Sequence[str], what: str,
              hint: str) -> Path:
    """The first candidate folder under which some of ``relative_paths`` exist (a corpus JSON names
    files relative to a base folder that is rarely where the user unpacked them)."""
    tried = []
    for c in candidates:
        if c is None or str(c) == "":
            continue
        folder = Path(c).expanduser()
        if folder in tried:
            continue
        tried.append(folder)
        if folder.is_dir() and any((folder / p).exists() for p in relative_paths):
            return folder.resolve()
    raise CorpusError(f"cannot find the {what}: none of {[str(t) for t in tried]} holds "
                      f"{relative_paths[0] if relative_paths else 'them'}; {hint}")


def update_report(corpus_dir: str | os.PathLike, **entries: Any) -> None:
    """Merge ``entries`` into ``corpus.json``'s free-form ``report`` (e.g. cache timings and errors)."""
    info = read_corpus(corpus_dir)
    path = info.root / "corpus.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.setdefault("report", {}).update(entries)
    write_text(path, json.dumps(meta, indent=1, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# Reading one utterance / one image
# ---------------------------------------------------------------------------------------------
def speech_features(extractor: torch.nn.Module, waveform: torch.Tensor) -> torch.Tensor:
    """Features ``(T, F)`` of one 1-D 16 kHz waveform."""
    with torch.no_grad():
        feats, frames = extractor(waveform[None].float(), torch.tensor([waveform.shape[0]]))
    return feats[0, : int(frames[0])]


def read_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)``; with ``size``: shorter side resized to ``size``
    (bilinear, antialiased) then centre-cropped to ``size x size``."""
    from PIL import Image

    from s2i.encoders.image import ImageError, open_image

    try:
        im = open_image(path)
    except ImageError as e:
        raise CorpusError(str(e)) from None
    if size is not None:
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).copy()


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(3, H, W)`` → float32 ``(3, H, W)`` in [0, 1]."""
    t = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # a copy: cache arrays are read-only maps
    if t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    return t.float().div_(255.0)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
class PairedDataset(Dataset):
    """(spoken caption, image) pairs of one split of a prepared corpus.

    ``features``: "fbank" | "mfcc". ``image_input``: "pixels" or the name of a cached image-feature
    set (e.g. "resnet152"). ``augment``: a callable on a 1-D 16 kHz waveform, or a spec string for
    ``s2i.datasets.augment.from_spec`` (e.g. "noise,speed"); with it the waveform is always read,
    augmented and turned into features here (in the DataLoader worker).
    ``max_frames``: longer utterances are cut to their first ``max_frames`` frames.
    ``image_size``: pixels resized (shorter side) and centre-cropped to this size; None = as stored
    (the pixel cache's size when there is exactly one pixel cache, else the file's own size).

    An item is a dict: ``audio (T, F)`` float32, ``image`` tensor, ``image_index`` int (index of the
    unique image in this split), ``utt_id``, ``text``, and ``index`` (the item's own index).
    """

    def __init__(self, corpus_dir: str | os.PathLike, split: str, features: str = "fbank",
                 image_input: str = "pixels", augment: Callable[[torch.Tensor], torch.Tensor] | str | None = None,
                 max_frames: int = 2048, image_size: int | None = None):
        from s2i.datasets import cache

        if isinstance(augment, str):
            augment = _augmentation(augment) if augment.strip() else None

        if features not in AUDIO_FEATURES:
            raise CorpusError(f"unknown speech features {features!r}; choose one of {list(AUDIO_FEATURES)}")
        if max_frames < 1:
            raise CorpusError(f"max_frames must be at least 1, got {max_frames}")
        self.info = read_corpus(corpus_dir)
        self.split = split
        self.features = features
        self.image_input = image_input
        self.augment = augment
        self.max_frames = int(max_frames)
        self.utterances = read_split(self.info, split)
        if not self.utterances:
            raise CorpusError(f"split {split!r} of {self.info.root} has no utterances")

        first: dict[str, int] = {}
        caption_image = []
        for rec in self.utterances:
            caption_image.append(first.setdefault(rec["image_id"], len(first)))
        self.image_ids: list[str] = list(first)
        self.caption_image = torch.tensor(caption_image, dtype=torch.long)
        self._image_records = cache.unique_image_records(self.utterances)

        self._extractor: torch.nn.Module | None = None
        self.audio_cache = None if augment is not None else cache.open_audio_cache(self.info, split, features,
                                                                                    self.utterances)
        self.image_cache = None
        self.image_size = image_size
        if image_input == "pixels":
            self.image_cache = cache.open_pixel_cache(self.info, split, image_size, self._image_records)
            if self.image_cache is not None:
                self.image_size = self.image_cache.meta["image_size"]
        else:
            self.image_cache = cache.open_image_feature_cache(self.info, split, image_input, self._image_records)
        self._lengths: torch.Tensor | None = None

    # -- sizes -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def extractor(self) -> torch.nn.Module:
        if self._extractor is None:
            from s2i.audio import feature_extractor

            self._extractor = feature_extractor(self.features).eval()
        return self._extractor

    @property
    def feature_dim(self) -> int:
        return int(self.audio_cache.dim) if self.audio_cache is not None else int(self.extractor.dim)

    @property
    def lengths(self) -> torch.Tensor:
        """Frames per utterance after ``max_frames`` (LongTensor), for bucketing: from the cache,
        else from the records' ``num_samples``, else from the audio files' headers."""
        if self._lengths is None:
            if self.audio_cache is not None:
                frames = self.audio_cache.lengths
            else:
                frames = np.array([self.extractor.num_frames(self._num_samples(r)) for r in self.utterances])
            self._lengths = torch.from_numpy(np.minimum(np.asarray(frames, dtype=np.int64), self.max_frames))
        return self._lengths

    def _num_samples(self, rec: dict) -> int:
        if "num_samples" in rec:
            return int(rec["num_samples"])
        import soundfile

        path = self.info.audio_path(rec)
        try:
            header = soundfile.info(str(path))
        except (RuntimeError, OSError) as e:  # LibsndfileError is a RuntimeError
            raise CorpusError(f"audio file {path} of utterance {rec['utt_id']!r} cannot be read ({e})") from None
        return int(math.ceil(header.frames * SAMPLE_RATE / header.samplerate))

    # -- items -----------------------------------------------------------------------------------
    def audio(self, index: int) -> torch.Tensor:
        """Speech features ``(T, F)`` of utterance ``index`` (float32, at most ``max_frames``)."""
        if self.audio_cache is not None:
            feats = self.audio_cache[index]
            if feats.shape[0] > 0:
                return torch.from_numpy(np.asarray(feats[: self.max_frames], dtype=np.float32))
            # an utterance the cache could not make: read the file, so the error names it
        wave = self.waveform(index)
        if self.augment is not None:
            wave = self.augment(wave)
        return speech_features(self.extractor, wave)[: self.max_frames].contiguous()

    def waveform(self, index: int) -> torch.Tensor:
        """The utterance's audio as a 1-D 16 kHz float32 tensor."""
        from s2i.audio import load_audio

        return load_audio(self.info.audio_path(self.utterances[index]))

    def image(self, i: int) -> torch.Tensor:
        """Unique image ``i`` of this split: pixels ``(3, H, W)`` in [0, 1] or a feature vector ``(D,)``."""
        rec = self._image_records[i]
        if self.image_cache is not None:
            if self.image_cache.valid(i):
                value = self.image_cache[i]
                if self.image_input == "pixels":
                    return pixels_to_tensor(value)
                return torch.from_numpy(np.array(value, dtype=np.float32))  # a copy of the read-only map
            if self.image_input != "pixels":
                raise CorpusError(f"image {self.info.image_path(rec)} has no cached {self.image_input!r} features "
                                  f"(it failed when the cache was built; see {self.image_cache.path / 'report.json'})")
        return pixels_to_tensor(read_image(self.info.image_path(rec), self.image_size))

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.utterances[index]
        image_index = int(self.caption_image[index])
        return {"audio": self.audio(index), "image": self.image(image_index), "image_index": image_index,
                "utt_id": rec["utt_id"], "text": rec["text"], "index": int(index)}

    def image_dataset(self) -> "ImageSet":
        """The split's unique images as a Dataset (for embedding a gallery)."""
        return ImageSet(self)


def _augmentation(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from s2i.datasets import augment
    except ModuleNotFoundError as e:
        if e.name != "s2i.datasets.augment":
            raise
        raise CorpusError(f"augmentation {spec!r} needs s2i.datasets.augment, which is not installed") from None
    return augment.from_spec(spec)


class ImageSet(Dataset):
    """The unique images of a :class:`PairedDataset`, in ``image_ids`` order."""

    def __init__(self, paired: PairedDataset):
        self.paired = paired

    def __len__(self) -> int:
        return self.paired.num_images

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.paired.image(i)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items of :class:`PairedDataset` → a batch: ``audio (B, T, F)`` zero-padded on the right,
    ``audio_lengths (B,)``, ``image`` stacked, ``image_index (B,)``, ``text``, ``utt_id``, ``index (B,)``."""
    if not items:
        raise CorpusError("cannot collate an empty batch")
    lengths = torch.tensor([it["audio"].shape[0] for it in items], dtype=torch.long)
    dim = items[0]["audio"].shape[1]
    audio = torch.zeros(len(items), int(lengths.max()), dim, dtype=torch.float32)
    for b, it in enumerate(items):
        audio[b, : it["audio"].shape[0]] = it["audio"]
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise CorpusError(f"images in one batch have different sizes {sorted(shapes)}; "
                          "give PairedDataset an image_size (or build a pixel cache)")
    batch = {"audio": audio, "audio_lengths": lengths, "image": torch.stack([it["image"] for it in items]),
             "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
             "text": [it["text"] for it in items], "utt_id": [it["utt_id"] for it in items]}
    if all("index" in it for it in items):
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
def _int_array(values: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Indices or frame counts, from a tensor (on any device), an array or a list, as int64 numpy."""
    return np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.int64)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar length.

    Each epoch the indices are shuffled (seeded by ``seed`` and :meth:`set_epoch`), cut into pools
    of ``pool_batches * batch_size``, each pool sorted by length and cut into batches (an incomplete
    last batch carries over into the next pool), and the batches are shuffled. With
    ``caption_image`` (image index per utterance) a batch never holds two captions of one image:
    a caption whose image is already in the batch waits for the next batch.

    Hard negatives: with ``neighbours`` (``(num_images, k)``, each image's most similar images, as
    :func:`similar_images` gives) and ``caption_image``, a share ``hard_fraction`` of the utterances
    each bring one caption of one of their image's neighbours (drawn at random among the ``k``) into
    their batch: a contrastive loss then has to tell near-identical scenes apart, which random
    batches of a few dozen seldom ask of it. The pair stays together through the length sorting
    (both sort by the longer one's length).

    DDP: with ``num_replicas > 1`` every rank gets the same number of batches and no utterance is
    seen by two ranks: when the batch count does not divide, the largest batches are halved
    (``drop_last=True`` drops the surplus instead). Every rank must use the same ``seed``.
    With ``caption_image`` the batch count can differ by a few batches from one epoch to the next;
    ``len()`` is exact for the current epoch.
    """

    sort_by_length = True

    def __init__(self, lengths: Sequence[int] | torch.Tensor | np.ndarray, batch_size: int, shuffle: bool = True,
                 seed: int = 0, caption_image: Sequence[int] | torch.Tensor | None = None, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False, pool_batches: int = 50,
                 neighbours: np.ndarray | None = None, hard_fraction: float = 1.0):
        self.lengths = _int_array(lengths)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence of frame counts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..num_replicas-1, got rank={rank}, num_replicas={num_replicas}")
        if caption_image is not None:
            caption_image = _int_array(caption_image)
            if caption_image.shape != self.lengths.shape:
                raise ValueError(f"caption_image has {len(caption_image)} entries for {len(self.lengths)} lengths")
        self.caption_image = caption_image
        if neighbours is not None:
            if caption_image is None:
                raise ValueError("neighbours (hard negatives) need caption_image")
            neighbours = np.asarray(neighbours, dtype=np.int64)
            if neighbours.ndim != 2 or len(neighbours) <= caption_image.max():
                raise ValueError(f"neighbours must be (num_images, k) with a row for each of the "
                                 f"{caption_image.max() + 1} images; got shape {neighbours.shape}")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
        self.neighbours = neighbours
        self.hard_fraction = float(hard_fraction)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.pool_size = max(1, int(pool_batches)) * self.batch_size
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())

    # -- construction ----------------------------------------------------------------------------
    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._distribute(self.global_batches()))
        return self._cache[1]

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches over all ranks, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        key = self.lengths
        if self.neighbours is not None and self.hard_fraction > 0:
            order, key = self._pair_with_neighbours(order, rng)
        pool = n if not self.sort_by_length else self.pool_size
        batches: list[list[int]] = []
        carry = np.empty(0, dtype=np.int64)
        for start in range(0, n, pool):
            idx = np.concatenate([carry, order[start:start + pool]])
            if self.sort_by_length:
                idx = idx[np.argsort(key[idx], kind="stable")]
            full, carry = self._fill(idx)
            batches.extend(full)
        pending = deque(carry.tolist())
        while pending:  # the remainder: incomplete batches
            batch, skipped = self._take(pending)
            pending.extendleft(reversed(skipped))
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _pair_with_neighbours(self, order: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``order`` with a share of its utterances each followed by a caption of a neighbour of its
        image (taken out of its own place), and the sort key of each utterance: its pair's longest length."""
        images = self.caption_image
        waiting: list[list[int]] = [[] for _ in range(len(self.neighbours))]
        for u in order[::-1]:  # each image's captions, popped in the order's order
            waiting[images[u]].append(int(u))
        used = np.zeros(len(order), dtype=bool)
        key = self.lengths.copy()
        out: list[int] = []
        draws = rng.random(len(order))
        for u, draw in zip(order.tolist(), draws):
            if used[u]:
                continue
            used[u] = True
            out.append(u)
            if draw >= self.hard_fraction:
                continue
            for image in rng.permutation(self.neighbours[images[u]]):
                queue = waiting[image]
                while queue and used[queue[-1]]:
                    queue.pop()
                if queue:
                    v = queue.pop()
                    used[v] = True
                    out.append(v)
                    key[u] = key[v] = max(key[u], key[v])
                    break
        return np.asarray(out, dtype=np.int64), key

    def _take(self, pending: deque) -> tuple[list[int], list[int]]:
        """Take one batch from the front of ``pending``; → (batch, skipped captions whose image
        was already in the batch, in order)."""
        batch: list[int] = []
        skipped: list[int] = []
        seen: set[int] = set()
        while pending and len(batch) < self.batch_size:
            i = pending.popleft()
            if self.caption_image is not None:
                image = int(self.caption_image[i])
                if image in seen:
                    skipped.append(i)
                    continue
                seen.add(image)
            batch.append(i)
        return batch, skipped

    def _fill(self, idx: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
        """Full batches from ``idx`` in order, and the indices left over."""
        pending, batches = deque(idx.tolist()), []
        while pending:
            batch, skipped = self._take(pending)
            if len(batch) < self.batch_size:
                return batches, np.asarray(batch + skipped, dtype=np.int64)
            batches.append(batch)
            pending.extendleft(reversed(skipped))
        return batches, np.empty(0, dtype=np.int64)

    def _distribute(self, batches: list[list[int]]) -> list[list[int]]:
        replicas = self.num_replicas
        if replicas == 1:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) // replicas * replicas]
        else:
            while len(batches) % replicas:
                j = max(range(len(batches)), key=lambda b: len(batches[b]), default=None)
                if j is None or len(batches[j]) < 2:
                    # fewer utterances than ranks: some must be repeated
                    batches = batches + batches[: replicas - len(batches) % replicas]
                    break
                half = len(batches[j]) // 2
                batches[j: j + 1] = [batches[j][:half], batches[j][half:]]
        return batches[self.rank::replicas]


class RandomBatchSampler(BucketBatchSampler):
    """The seed's batching: consecutive slices of a random permutation, no length sorting.

    Same options as :class:`BucketBatchSampler`; kept to measure what bucketing saves.
    """

    sort_by_length = False


def similar_images(texts: Sequence[str], caption_image: Sequence[int] | torch.Tensor | np.ndarray,
                   k: int = 5, chunk: int = 512) -> np.ndarray:
    """``(num_images, k)``: for each image, the ``k`` other images whose captions are most alike,
    nearest first: cosine similarity of TF-IDF word vectors, each image's captions taken together
    (so that one caption's synonyms are covered by another's). The hard negatives of
    :class:`BucketBatchSampler`; needs transcripts."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    caption_image = _int_array(caption_image)
    if len(texts) != len(caption_image):
        raise ValueError(f"{len(texts)} texts for {len(caption_image)} captions")
    num_images = int(caption_image.max()) + 1
    if num_images < 2:
        raise ValueError("similar images need at least two images")
    docs: list[list[str]] = [[] for _ in range(num_images)]
    for text, image in zip(texts, caption_image):
        docs[image].append(text or "")
    try:
        vectors = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", sublinear_tf=True).fit_transform(
            " ".join(d) for d in docs)
    except ValueError:  # empty vocabulary
        raise CorpusError("hard negatives need transcripts: this split's captions have no text") from None
    k = min(int(k), num_images - 1)
    out = np.empty((num_images, k), dtype=np.int64)
    for start in range(0, num_images, chunk):
        sim = (vectors[start:start + chunk] @ vectors.T).toarray()
        rows = np.arange(len(sim))
        sim[rows, start + rows] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[start:start + len(sim)] = np.take_along_axis(
            top, np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable"), axis=1)
    return out


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int] | torch.Tensor | np.ndarray) -> float:
    """Share of the padded ``(B, T_max)`` frames that are padding, over all ``batches``."""
    lengths = _int_array(lengths)
    total = padded = 0
    for batch in batches:
        ls = lengths[np.asarray(batch, dtype=np.int64)]
        total += int(ls.sum())
        padded += int(ls.max()) * len(ls)
    return 1.0 - total / padded if padded else 0.0
