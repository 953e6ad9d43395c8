"""Feature caches of a prepared corpus: computed once, memory-mapped while training.

    CORPUS/cache/audio-<fbank|mfcc>/<split>/   frames-K.npy float16 (frames, F), offsets-K.npy int64 (n + 1,)
    CORPUS/cache/pixels-<size>/<split>/        pixels-K.npy uint8 (n, 3, size, size), valid-K.npy bool (n,)
    CORPUS/cache/image-<name>/<split>/         features-K.npy float32 (n, D), valid-K.npy bool (n,)

Audio caches hold one entry per utterance (the split's order); image caches one per unique image
(order of first appearance). Each folder is cut into shards of ``shard_size`` items. A shard is
written array by array through a temporary file and ``os.replace``, then marked done by its
``shard-K.json`` (which lists its failures), so a build that is interrupted resumes where it
stopped; ``meta.json`` appears when every shard is done, and only then is the cache used.
``build.json`` fingerprints what the cache was made from (the records, roots and options): a
changed manifest rebuilds the cache, a stale cache is never read.

A file that cannot be read never stops a build: it is logged and listed by name in ``report.json``
(``failed``); its audio entry has zero frames, its image entry ``valid = False``.

Image feature vectors come from a torchvision backbone (a ResNet by default) with weights the user
supplies (``weights=path``: a state dict saved with ``torch.save`` or as safetensors); s2i downloads
nothing. ``resnet152`` is the seed's recipe (seed-spec §4.2): shorter side resized to 256, ten 224
crops (corners, centre and their mirror images), ImageNet normalisation, mean of the ten pooled
vectors; ``resnet152-center`` uses the single centre crop.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from s2i.audio import FEATURE_VERSIONS
from s2i.files import replace_file, write_text
from s2i.datasets.corpus import (
    AUDIO_FEATURES,
    CorpusError,
    CorpusInfo,
    read_corpus,
    read_image,
    read_split,
    speech_features,
    update_report,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SHARD = "{:05d}"


# ---------------------------------------------------------------------------------------------
# Where caches live
# ---------------------------------------------------------------------------------------------
def audio_cache_dir(info: CorpusInfo, split: str, features: str) -> Path:
    return info.cache_root / f"audio-{features}" / split


def pixel_cache_dir(info: CorpusInfo, split: str, image_size: int) -> Path:
    return info.cache_root / f"pixels-{int(image_size)}" / split


def image_feature_cache_dir(info: CorpusInfo, split: str, name: str) -> Path:
    return info.cache_root / f"image-{name}" / split


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _root_key(info: CorpusInfo, root: Path) -> str:
    """A data root as the fingerprint sees it: relative to the corpus folder when inside it, so that
    ``data/x`` and ``/abs/path/data/x`` name the same cache."""
    root = Path(root).resolve()
    try:
        return root.relative_to(Path(info.root).resolve()).as_posix()
    except ValueError:
        return str(root)


def _audio_fingerprint(info: CorpusInfo, records: Sequence[dict], features: str) -> str:
    version = FEATURE_VERSIONS.get(features, 1)  # version 1 predates versions: not part of older fingerprints
    return _fingerprint("audio", features, *([version] if version > 1 else []), _root_key(info, info.audio_root),
                        [(r["utt_id"], r["audio"]) for r in records])


def _image_fingerprint(info: CorpusInfo, image_records: Sequence[dict], kind: str, params: dict) -> str:
    return _fingerprint(kind, params, _root_key(info, info.image_root),
                        [(r["image_id"], r["image"]) for r in image_records])


def unique_image_records(records: Sequence[dict]) -> list[dict]:
    """The first record of each image, in order of first appearance (the split's image order)."""
    seen: dict[str, dict] = {}
    for r in records:
        seen.setdefault(r["image_id"], r)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Reading a finished cache
# ---------------------------------------------------------------------------------------------
def _finished_meta(path: Path, fingerprint: str) -> dict | None:
    """``meta.json`` of a complete cache made from exactly this fingerprint, else None."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, OSError):
        logger.warning("ignoring cache %s: unreadable meta.json", path)
        return None
    if meta.get("fingerprint") != fingerprint:
        logger.warning("ignoring cache %s: it was built from a different manifest or options; rebuild it with "
                       "`python -m s2i prepare ...`", path)
        return None
    return meta


class _Shards:
    """Arrays split over shard files, memory-mapped lazily (also after pickling into a worker)."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.shard_size = int(meta["shard_size"])
        self.num_shards = int(meta["num_shards"])
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def _array(self, name: str, shard: int) -> np.ndarray:
        key = (name, shard)
        if key not in self._maps:
            self._maps[key] = np.load(self.path / f"{name}-{_SHARD.format(shard)}.npy", mmap_mode="r")
        return self._maps[key]

    def _eager(self, name: str) -> list[np.ndarray]:
        return [np.load(self.path / f"{name}-{_SHARD.format(k)}.npy") for k in range(self.num_shards)]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


class AudioCache(_Shards):
    """Speech features of a split: ``cache[i]`` is utterance i's ``(T, F)`` float16 (memory-mapped)."""

    def __init__(self, path: Path, meta: dict):
        super().__init__(path, meta)
        self.dim = int(meta["dim"])
        self._offsets = self._eager("offsets")
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        k, j = divmod(int(i), self.shard_size)
        o = self._offsets[k]
        return self._array("frames", k)[o[j]:o[j + 1]]


class ArrayCache(_Shards):
    """One array per unique image (pixels or a feature vector); ``valid(i)`` is False where it failed."""

    def __init__(self, path: Path, meta: dict):
        super().__init__(path, meta)
        self.array_name = meta["array"]
        self._valid = self._eager("valid")

    def __len__(self) -> int:
        return sum(len(v) for v in self._valid)

    def valid(self, i: int) -> bool:
        k, j = divmod(int(i), self.shard_size)
        return bool(self._valid[k][j])

    def __getitem__(self, i: int) -> np.ndarray:
        k, j = divmod(int(i), self.shard_size)
        return self._array(self.array_name, k)[j]


def open_audio_cache(info: CorpusInfo, split: str, features: str, records: Sequence[dict]) -> AudioCache | None:
    """The finished audio cache of this split made from exactly these records, else None."""
    path = audio_cache_dir(info, split, features)
    meta = _finished_meta(path, _audio_fingerprint(info, records, features))
    return AudioCache(path, meta) if meta is not None else None


def open_pixel_cache(info: CorpusInfo, split: str, image_size: int | None,
                     image_records: Sequence[dict]) -> ArrayCache | None:
    """The finished pixel cache of this split at ``image_size`` (None: the only one there is)."""
    if image_size is None:
        sizes = sorted(int(p.name.split("-", 1)[1]) for p in info.cache_root.glob("pixels-*")
                       if (p / split / "meta.json").is_file() and p.name.split("-", 1)[1].isdigit())
        if len(sizes) != 1:
            if len(sizes) > 1:
                logger.warning("pixel caches of sizes %s exist for split %r; pass image_size to use one", sizes, split)
            return None
        image_size = sizes[0]
    path = pixel_cache_dir(info, split, image_size)
    meta = _finished_meta(path, _image_fingerprint(info, image_records, "pixels", {"image_size": int(image_size)}))
    return ArrayCache(path, meta) if meta is not None else None


def open_image_feature_cache(info: CorpusInfo, split: str, name: str, image_records: Sequence[dict]) -> ArrayCache:
    """The finished image-feature cache ``name`` of this split; raises :class:`CorpusError` if absent."""
    path = image_feature_cache_dir(info, split, name)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        have = sorted(p.name[len("image-"):] for p in info.cache_root.glob("image-*") if (p / split / "meta.json").is_file())
        raise CorpusError(f"no cached image features {name!r} for split {split!r} of {info.root} "
                          f"(available: {have or 'none'}; 'pixels' reads the images); build them with "
                          f"`python -m s2i prepare ... --image-features {name} --image-weights PATH`")
    meta = json.loads(meta_file.read_text())
    expected = _image_fingerprint(info, image_records, "image-features", meta.get("params", {}))
    if meta.get("fingerprint") != expected:
        raise CorpusError(f"cached image features {path} were built from a different manifest; rebuild them")
    return ArrayCache(path, meta)


# ---------------------------------------------------------------------------------------------
# Building: one resumable, sharded engine for every kind of cache
# ---------------------------------------------------------------------------------------------
@dataclass
class CacheReport:
    """What one cache build did. ``failed`` lists every item that could not be made, by file."""

    path: str
    kind: str
    split: str
    items: int
    failed: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    shards_built: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Items(Dataset):
    """Runs ``load`` on items in the DataLoader's workers; a failure becomes a message, never an exception."""

    def __init__(self, load: Callable[[int], Any], indices: Sequence[int]):
        self.load = load
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        # Each worker process runs one item at a time, so catching warnings here is safe
        # (``warnings.catch_warnings`` is process-global: it must never run in threads).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                payload, ok = self.load(i), True
            except Exception as e:  # noqa: BLE001 - any broken file is reported by name, not fatal
                payload, ok = f"{type(e).__name__}: {e}", False
        return i, ok, payload, [str(w.message) for w in caught]


def _as_is(item):
    return item


def parallel_map(load: Callable[[int], Any], indices: Sequence[int], workers: int = 0) -> Iterable[tuple[int, bool, Any, list[str]]]:
    """``load(i)`` for each index on ``workers`` processes (0: here), in order, as
    ``(i, ok, result or error message, warnings raised)``; ``load`` must be picklable."""
    return DataLoader(_Items(load, indices), batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a path ending in ".tmp"
        np.save(f, array)


def _write_shard(out: Path, shard: int, arrays: dict[str, np.ndarray], record: dict) -> None:
    """Write a shard's arrays, then its marker: the shard counts as done only once the marker exists."""
    for name, array in arrays.items():
        replace_file(out / f"{name}-{_SHARD.format(shard)}.npy", lambda p: _save_npy(p, array))
    write_text(out / f"shard-{_SHARD.format(shard)}.json", json.dumps(record))


def _clear(out: Path) -> None:
    for p in out.iterdir():
        if p.is_file() and re.fullmatch(r"[a-z]+(-\d+)?\.(npy|json)(\.tmp)?", p.name):
            p.unlink()


def _build(out: Path, *, kind: str, split: str, fingerprint: str, params: dict, names: Sequence[tuple[str, str]],
           load: Callable[[int], Any], assemble: Callable[[list], dict[str, np.ndarray]], shard_size: int,
           workers: int, progress: bool, finish: Callable[[list], list] | None = None, finish_batch: int = 16,
           meta_extra: dict | None = None) -> CacheReport:
    """Make every missing shard of a cache of ``len(names)`` items.

    ``names[i]`` = (item name, file) for messages. ``load(i)`` runs in the DataLoader workers;
    ``finish`` (optional) runs in this process on batches of loaded payloads (e.g. a CNN on the
    GPU); ``assemble`` turns one shard's results (None where an item failed) into its arrays.
    """
    start = time.time()
    n = len(names)
    if shard_size < 1:
        raise CorpusError(f"shard_size must be at least 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    build = {"kind": kind, "fingerprint": fingerprint, "items": n, "shard_size": int(shard_size), "params": params}
    build_file = out / "build.json"
    if build_file.is_file():
        try:
            previous = json.loads(build_file.read_text())
        except (json.JSONDecodeError, OSError):
            previous = None
        if previous != build:
            logger.warning("cache %s was made from other data or options: rebuilding it", out)
            _clear(out)
    write_text(build_file, json.dumps(build))

    num_shards = math.ceil(n / shard_size)
    done = [k for k in range(num_shards) if (out / f"shard-{_SHARD.format(k)}.json").is_file()]
    todo = [k for k in range(num_shards) if k not in set(done)]
    report = CacheReport(path=str(out), kind=kind, split=split, items=n, shards_skipped=len(done))
    if done:
        logger.info("%s: %d of %d shards already done, resuming", out, len(done), num_shards)
    indices = [i for k in todo for i in range(k * shard_size, min(n, (k + 1) * shard_size))]
    bar = tqdm(total=n, initial=n - len(indices), desc=f"{kind} {split}", unit="item", disable=not progress,
               dynamic_ncols=True)

    shard, results, failed, notes, waiting = None, [], [], [], []

    def run_finish() -> None:
        if waiting:
            outputs = finish([payload for _, payload in waiting])
            for (pos, _), value in zip(waiting, outputs):
                results[pos] = value
            waiting.clear()

    def flush() -> None:
        if finish is not None:
            run_finish()
        _write_shard(out, shard, assemble(results), {"items": len(results), "failed": failed, "warnings": notes})
        report.shards_built += 1
        bar.update(len(results))

    for i, ok, payload, caught in parallel_map(load, indices, workers):
        k = i // shard_size
        if k != shard:
            if shard is not None:
                flush()
            shard, failed, notes = k, [], []
            results = [None] * (min(n, (k + 1) * shard_size) - k * shard_size)
        pos = i - k * shard_size
        name, file = names[i]
        if caught:
            notes.append({"item": name, "file": file, "warning": "; ".join(caught)})
        if not ok:
            failed.append({"item": name, "file": file, "error": payload})
            logger.warning("%s: cannot use %s (%s)", kind, file, payload)
        elif finish is None:
            results[pos] = payload
        else:
            waiting.append((pos, payload))
            if len(waiting) >= finish_batch:
                run_finish()
    if shard is not None:
        flush()
    bar.close()

    for k in range(num_shards):
        record = json.loads((out / f"shard-{_SHARD.format(k)}.json").read_text())
        report.failed.extend(record["failed"])
        report.warnings.extend(record.get("warnings", []))
    report.seconds = round(time.time() - start, 3)
    write_text(out / "report.json", json.dumps(report.to_dict(), indent=1))
    meta = {"kind": kind, "fingerprint": fingerprint, "items": n, "shard_size": int(shard_size),
            "num_shards": num_shards, "failed": len(report.failed), "params": params, **(meta_extra or {})}
    write_text(out / "meta.json", json.dumps(meta, indent=1))
    if report.failed:
        logger.warning("%s %s: %d of %d items failed (listed in %s): %s", kind, split, len(report.failed), n,
                       out / "report.json", ", ".join(f["file"] for f in report.failed[:10]))
    return report


# ---------------------------------------------------------------------------------------------
# Audio features
# ---------------------------------------------------------------------------------------------
class _LoadFeatures:
    """Utterance i → its speech features as float16 ``(T, F)`` (picklable; one extractor per process)."""

    def __init__(self, paths: list[str], features: str):
        self.paths, self.features = paths, features
        self._extractor = None

    def __call__(self, i: int) -> np.ndarray:
        from s2i.audio import feature_extractor, load_audio

        if self._extractor is None:
            self._extractor = feature_extractor(self.features).eval()
        feats = speech_features(self._extractor, load_audio(self.paths[i])).numpy()
        if not np.isfinite(feats).all():
            raise CorpusError("features contain NaN or inf")
        return feats.astype(np.float16)


def build_audio_cache(corpus_dir: str | os.PathLike | CorpusInfo, split: str, features: str = "fbank", *,
                      workers: int = 0, shard_size: int = 1000, progress: bool = True) -> CacheReport:
    """Cache the speech features of every utterance of ``split`` (float16, memory-mappable)."""
    from s2i.audio import feature_extractor

    if features not in AUDIO_FEATURES:
        raise CorpusError(f"unknown speech features {features!r}; choose from {list(AUDIO_FEATURES)}")
    info = corpus_dir if isinstance(corpus_dir, CorpusInfo) else read_corpus(corpus_dir)
    records = read_split(info, split)
    dim = int(feature_extractor(features).dim)

    def assemble(results: list) -> dict[str, np.ndarray]:
        frames = [r if r is not None else np.zeros((0, dim), np.float16) for r in results]
        offsets = np.zeros(len(frames) + 1, dtype=np.int64)
        np.cumsum([f.shape[0] for f in frames], out=offsets[1:])
        return {"frames": np.concatenate(frames) if frames else np.zeros((0, dim), np.float16), "offsets": offsets}

    return _build(audio_cache_dir(info, split, features), kind=f"audio-{features}", split=split,
                  fingerprint=_audio_fingerprint(info, records, features), params={"features": features, "dim": dim},
                  names=[(r["utt_id"], str(info.audio_path(r))) for r in records],
                  load=_LoadFeatures([str(info.audio_path(r)) for r in records], features), assemble=assemble,
                  shard_size=shard_size, workers=workers, progress=progress,
                  meta_extra={"dim": dim, "dtype": "float16"})


# ---------------------------------------------------------------------------------------------
# Image pixels
# ---------------------------------------------------------------------------------------------
class _LoadPixels:
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __call__(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.size).transpose(2, 0, 1).copy()


def _stack_valid(name: str, shape: tuple[int, ...], dtype) -> Callable[[list], dict[str, np.ndarray]]:
    def assemble(results: list) -> dict[str, np.ndarray]:
        array = np.zeros((len(results), *shape), dtype=dtype)
        for j, r in enumerate(results):
            if r is not None:
                array[j] = r
        return {name: array, "valid": np.array([r is not None for r in results], dtype=bool)}

    return assemble


def build_pixel_cache(corpus_dir: str | os.PathLike | CorpusInfo, split: str, image_size: int = 224, *,
                      workers: int = 0, shard_size: int = 500, progress: bool = True) -> CacheReport:
    """Cache every unique image of ``split`` as uint8 pixels ``(3, size, size)`` (shorter side resized,
    centre crop), the exact pixels :class:`PairedDataset` would read on the fly at that size."""
    info = corpus_dir if isinstance(corpus_dir, CorpusInfo) else read_corpus(corpus_dir)
    images = unique_image_records(read_split(info, split))
    size = int(image_size)
    params = {"image_size": size}
    return _build(pixel_cache_dir(info, split, size), kind=f"pixels-{size}", split=split,
                  fingerprint=_image_fingerprint(info, images, "pixels", params), params=params,
                  names=[(r["image_id"], str(info.image_path(r))) for r in images],
                  load=_LoadPixels([str(info.image_path(r)) for r in images], size),
                  assemble=_stack_valid("pixels", (3, size, size), np.uint8), shard_size=shard_size,
                  workers=workers, progress=progress, meta_extra={"array": "pixels", "image_size": size})


# ---------------------------------------------------------------------------------------------
# Image feature vectors from a CNN backbone
# ---------------------------------------------------------------------------------------------
def parse_image_feature_name(name: str) -> tuple[str, str]:
    """``"resnet152"`` → ("resnet152", "ten"); ``"resnet50-center"`` → ("resnet50", "center")."""
    m = re.fullmatch(r"([a-z0-9_]+?)(-center|-tencrop)?", name)
    if not m:
        raise CorpusError(f"image feature name {name!r} should be a torchvision backbone, optionally with "
                          "'-center' (single centre crop), e.g. 'resnet152' or 'resnet50-center'")
    return m.group(1), "center" if m.group(2) == "-center" else "ten"


def image_backbone(arch: str, weights: str | os.PathLike | None = None, random_init: bool = False) -> tuple[torch.nn.Module, int]:
    """A torchvision classifier without its last layer → (module giving pooled vectors, their size).

    ``weights``: a local state-dict file of that architecture. Random weights only with ``random_init``
    (tests): features of an untrained CNN are useless for training.
    """
    import torchvision

    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise CorpusError(f"unknown torchvision model {arch!r} for image features (e.g. resnet152, resnet50)") from None
    if not isinstance(getattr(model, "fc", None), torch.nn.Linear):
        raise CorpusError(f"{arch!r} has no final 'fc' layer; use a ResNet-family backbone")
    if weights is not None:
        from s2i.encoders.image import read_state_dict  # the image encoder reads its backbone weights the same way

        state = read_state_dict(weights)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CorpusError(f"{weights} does not hold a state dict of tensors")
        try:
            result = model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise CorpusError(f"{weights} does not fit torchvision's {arch}: {str(e).splitlines()[0]} ...") from None
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise CorpusError(f"{weights} does not fit torchvision's {arch}: {len(missing)} missing keys "
                              f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected "
                              f"(e.g. {result.unexpected_keys[:3]})")
    elif not random_init:
        raise CorpusError(f"image features {arch!r} need weights: pass --image-weights PATH (a state dict of "
                          f"torchvision's {arch}, e.g. ImageNet weights you downloaded); s2i downloads nothing")
    dim = model.fc.in_features
    model.fc = torch.nn.Identity()
    return model.eval(), dim


class _LoadCrops:
    """Image i → uint8 crops ``(C, 3, 224, 224)``: the seed's resize-256 then ten-crop, or the centre crop."""

    def __init__(self, paths: list[str], crop: str):
        self.paths, self.crop = paths, crop

    def __call__(self, i: int) -> np.ndarray:
        from torchvision.transforms import functional as F

        from s2i.encoders.image import ImageError, open_image

        try:
            im = F.resize(open_image(self.paths[i]), 256, interpolation=F.InterpolationMode.LANCZOS)
        except ImageError as e:
            raise CorpusError(str(e)) from None
        crops = F.ten_crop(im, 224) if self.crop == "ten" else (F.center_crop(im, 224),)
        return np.stack([np.asarray(c, dtype=np.uint8).transpose(2, 0, 1) for c in crops])


class _EmbedCrops:
    """Batches of crops → mean pooled backbone vector per image (runs in the main process, on ``device``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, payloads: list[np.ndarray]) -> list[np.ndarray]:
        crops = torch.from_numpy(np.concatenate(payloads)).to(self.device).float().div_(255.0)
        vectors = self.model((crops - self.mean) / self.std).float()
        out, start = [], 0
        for p in payloads:
            out.append(vectors[start:start + len(p)].mean(0).cpu().numpy())
            start += len(p)
        return out


def build_image_feature_cache(corpus_dir: str | os.PathLike | CorpusInfo, split: str, name: str = "resnet152", *,
                              weights: str | os.PathLike | None = None, random_init: bool = False,
                              device: str | torch.device = "cpu", batch_size: int | None = None, workers: int = 0,
                              shard_size: int = 256, progress: bool = True) -> CacheReport:
    """Cache a backbone feature vector per unique image of ``split`` (see the module doc for the crops)."""
    arch, crop = parse_image_feature_name(name)
    info = corpus_dir if isinstance(corpus_dir, CorpusInfo) else read_corpus(corpus_dir)
    images = unique_image_records(read_split(info, split))
    if random_init and weights is None:
        torch.manual_seed(0)  # random features, but the same ones on every run (resumable)
    model, dim = image_backbone(arch, weights, random_init)
    device = torch.device(device)
    if batch_size is None:
        batch_size = 32 if device.type == "cuda" else 4
    source = "random-init" if weights is None else {"file": Path(weights).expanduser().resolve().name,
                                                    "bytes": Path(weights).expanduser().stat().st_size}
    params = {"arch": arch, "crop": crop, "weights": source}
    return _build(image_feature_cache_dir(info, split, name), kind=f"image-{name}", split=split,
                  fingerprint=_image_fingerprint(info, images, "image-features", params), params=params,
                  names=[(r["image_id"], str(info.image_path(r))) for r in images],
                  load=_LoadCrops([str(info.image_path(r)) for r in images], crop),
                  finish=_EmbedCrops(model, device), finish_batch=max(1, int(batch_size)),
                  assemble=_stack_valid("features", (dim,), np.float32), shard_size=shard_size, workers=workers,
                  progress=progress, meta_extra={"array": "features", "dim": dim})


# ---------------------------------------------------------------------------------------------
# Everything a corpus needs
# ---------------------------------------------------------------------------------------------
def build_caches(corpus_dir: str | os.PathLike, splits: Iterable[str] | None = None,
                 features: Iterable[str] = ("mfcc", "fbank"), image_features: Iterable[str] = ("pixels",), *,
                 image_size: int = 224, image_weights: str | os.PathLike | None = None, random_init: bool = False,
                 workers: int = 0, device: str = "cpu", progress: bool = True) -> list[CacheReport]:
    """Build (or finish) every requested cache of every split, and record the outcome in corpus.json.

    ``image_features``: "pixels" and/or backbone names such as "resnet152" / "resnet152-center".
    """
    info = read_corpus(corpus_dir)
    splits = list(info.splits) if splits is None else list(splits)
    reports: list[CacheReport] = []
    for split in splits:
        for feat in features:
            reports.append(build_audio_cache(info, split, feat, workers=workers, progress=progress))
        for name in image_features:
            if name == "pixels":
                reports.append(build_pixel_cache(info, split, image_size, workers=workers, progress=progress))
            else:
                reports.append(build_image_feature_cache(info, split, name, weights=image_weights,
                                                         random_init=random_init, device=device, workers=workers,
                                                         progress=progress))
    summary = {f"{r.kind}/{r.split}": {"items": r.items, "failed": len(r.failed), "seconds": r.seconds,
                                       "failed_files": [f["file"] for f in r.failed[:100]]} for r in reports}
    caches = dict(info.report.get("caches", {}))
    caches.update(summary)
    update_report(info.root, caches=caches)
    return reports
