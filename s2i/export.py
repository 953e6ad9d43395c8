"""Package a checkpoint with everything the app shows: the ``export`` CLI.

    python -m s2i export checkpoints/default --data data/synthetic-default --split test

embeds one split of a prepared corpus with the checkpoint (its unique images, all its spoken captions,
and their texts when the model has a text encoder), records each caption's VQ codes, fits a 2-D UMAP
layout of images and captions once, and writes the result beside the weights (``s2i/gallery.py``
describes the files). The app then needs no corpus, no embedding pass and no UMAP at click time.

Size matters (a Space ships the checkpoint folder): images are stored as one JPEG grid of small
thumbnails, and only ``max_clips`` captions (the first of each image first) as small Ogg/Opus clips.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from s2i.datasets.corpus import read_corpus, read_split
from s2i.gallery import AUDIO_DIR, THUMBS_FILE, Gallery

log = logging.getLogger(__name__)

LAYOUT_METHODS = ("umap", "pca")


class ExportError(ValueError):
    """The corpus or split cannot be exported (missing files, unknown split, ...)."""


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------
def _batches(n: int, size: int, desc: str):
    for start in tqdm(range(0, n, size), desc=desc, unit="batch", leave=False):
        yield start, min(n, start + size)


@torch.no_grad()
def embed_images(model, files: list[Path], batch_size: int = 64,
                 features: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Image embeddings ``(N, D)``, from the files or, for feature-input models, ``features(i)``."""
    out = []
    for a, b in _batches(len(files), batch_size, "images"):
        if features is not None:
            batch = torch.stack([features(i) for i in range(a, b)])
        else:
            batch = []
            for path in files[a:b]:
                with Image.open(path) as im:
                    batch.append(im.convert("RGB"))
        out.append(model.encode_image(batch).float().cpu())
    return torch.cat(out)


def read_caption(path: str | Path) -> torch.Tensor:
    """A corpus caption as 16 kHz mono; silent or cut files are embedded as they are, without warnings."""
    from s2i.audio import load_audio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_audio(path, max_seconds=None)


@torch.no_grad()
def embed_captions(model, files: list[Path], batch_size: int = 32
                   ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]], dict[str, float], list[float]]:
    """Speech embeddings ``(N, D)``, each caption's VQ codes per layer, each layer's frame shift, and each
    caption's duration in seconds. Files are read a batch at a time (a split's audio need not fit in memory)."""
    codes: dict[str, list[torch.Tensor | None]] = {}
    shifts: dict[str, float] = {}
    seconds = [0.0] * len(files)
    has_vq = "1" in (model.config.speech.vq_positions or "")
    # similar lengths together (file size as the proxy): less padding, which never changes a result
    order = sorted(range(len(files)), key=lambda i: os.path.getsize(files[i]))
    by_index: dict[int, torch.Tensor] = {}
    for a, b in _batches(len(order), batch_size, "captions"):
        idx = order[a:b]
        batch = [read_caption(files[i]) for i in idx]
        for i, wave in zip(idx, batch):
            seconds[i] = len(wave) / 16000
        by_index.update(zip(idx, model.encode_speech(batch, sample_rate=16000).float().cpu()))
        if has_vq:
            for i, units in zip(idx, model.units(batch, sample_rate=16000)):
                for name, seq in units.items():
                    codes.setdefault(name, [None] * len(files))[i] = seq.codes.long().flatten().cpu()
                    shifts[name] = float(seq.frame_shift_s)
    embeddings = torch.stack([by_index[i] for i in range(len(files))])
    return embeddings, codes, shifts, seconds


@torch.no_grad()
def embed_texts(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.encode_text(texts[a:b]).float().cpu()
                      for a, b in _batches(len(texts), batch_size, "texts")])


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def fit_layout(points: torch.Tensor, method: str = "umap", n_neighbors: int = 15, min_dist: float = 0.1,
               max_fit: int = 6000, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """A 2-D layout ``(N, 2)`` of L2-normalised points, and its settings for the record.

    ``umap`` (cosine metric) fits on at most ``max_fit`` points (a random subset); the others, like a
    query in the app, are placed at the similarity-weighted mean of their nearest fitted neighbours.
    Under 10 points UMAP is not meaningful and PCA is used.
    """
    if method not in LAYOUT_METHODS:
        raise ExportError(f"unknown layout {method!r}; choose from {LAYOUT_METHODS}")
    x = torch.nn.functional.normalize(points.float(), dim=-1)
    n = len(x)
    if n < 10:
        method = "pca"
    if method == "pca":
        centred = x - x.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = centred @ v[:2].T if v.shape[0] >= 2 else torch.cat([centred @ v[:1].T, torch.zeros(n, 1)], 1)
        return xy, {"method": "pca", "points": n}
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "numba"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap/numba chatter (n_jobs with random_state, ...)
        import umap

        rng = np.random.default_rng(seed)
        fit_idx = np.sort(rng.choice(n, size=max_fit, replace=False)) if n > max_fit else np.arange(n)
        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(fit_idx) - 1), min_dist=min_dist,
                            metric="cosine", random_state=seed)
        fitted = torch.from_numpy(reducer.fit_transform(x[fit_idx].numpy())).float()
    xy = torch.zeros(n, 2)
    xy[fit_idx] = fitted
    rest = np.setdiff1d(np.arange(n), fit_idx)
    if len(rest):
        xy[rest] = place_points(x[rest], x[fit_idx], fitted)
    settings = {"method": "umap", "points": n, "fitted": int(len(fit_idx)), "n_neighbors": reducer.n_neighbors,
                "min_dist": min_dist, "metric": "cosine", "seed": seed}
    return xy, settings


def place_points(queries: torch.Tensor, points: torch.Tensor, positions: torch.Tensor, k: int = 10,
                 temperature: float = 0.05) -> torch.Tensor:
    """2-D positions of new points: softmax(similarity / T)-weighted mean of their k nearest points'."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    sim = q @ torch.nn.functional.normalize(points.float(), dim=-1).T
    top, idx = sim.topk(min(k, points.shape[0]), dim=1)
    w = torch.softmax(top / temperature, dim=1)
    return (w[..., None] * positions[idx]).sum(1)


# ---------------------------------------------------------------------------------------------
# thumbnails and clips
# ---------------------------------------------------------------------------------------------
def write_thumbnails(files: list[Path], out: Path, cell: int = 96, quality: int = 85) -> list[list[int]]:
    """All images, shrunk to fit ``cell`` px, packed in one JPEG grid; returns each one's [x, y, w, h]."""
    cols = max(1, math.ceil(math.sqrt(len(files))))
    rows = math.ceil(len(files) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    boxes = []
    for i, path in enumerate(tqdm(files, desc="thumbnails", unit="img", leave=False)):
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        x, y = (i % cols) * cell, (i // cols) * cell
        sheet.paste(im, (x, y))
        boxes.append([x, y, im.width, im.height])
    sheet.save(out, "JPEG", quality=quality, optimize=True)
    return boxes


def clip_choice(caption_image: torch.Tensor, max_clips: int) -> list[int]:
    """Which captions get an audio clip: the first caption of each image, then second ones, ... ."""
    rank = torch.zeros_like(caption_image)
    seen: dict[int, int] = {}
    for j, i in enumerate(caption_image.tolist()):
        rank[j] = seen.get(i, 0)
        seen[i] = rank[j].item() + 1
    order = sorted(range(len(caption_image)), key=lambda j: (rank[j].item(), j))
    return sorted(order[:max(0, max_clips)])


def write_clip(waveform: torch.Tensor, path: Path) -> None:
    """A 16 kHz waveform as a small Ogg/Opus file: about 16 kbit/s, 6 kB per 3 s of speech."""
    import soundfile

    soundfile.write(str(path), waveform.numpy().astype(np.float32), 16000, format="OGG", subtype="OPUS",
                    compression_level=0.97)


# ---------------------------------------------------------------------------------------------
# the whole export
# ---------------------------------------------------------------------------------------------
def export(model, corpus_dir: str | Path, out_dir: str | Path, split: str = "test", *, max_images: int = 0,
           max_clips: int = 1000, thumb_size: int = 96, layout: str = "umap", image_input: str = "pixels",
           checkpoint: str = "", seed: int = 0, half: bool = True) -> dict[str, Any]:
    """Embed ``split`` of ``corpus_dir`` with ``model`` and write the gallery into ``out_dir``.

    ``max_images`` > 0 keeps only the first images of the split (and their captions). Returns a report
    (counts, seconds, bytes per file).
    """
    started = time.perf_counter()
    corpus_dir, out_dir = Path(corpus_dir).resolve(), Path(out_dir)
    info = read_corpus(corpus_dir)
    records = read_split(info, split)
    if not records:
        raise ExportError(f"split {split!r} of {corpus_dir} is empty")
    image_ids: list[str] = []
    index_of: dict[str, int] = {}
    images: list[dict[str, Any]] = []
    caption_image = []
    for r in records:
        if r["image_id"] not in index_of:
            if max_images and len(image_ids) >= max_images:
                continue
            index_of[r["image_id"]] = len(image_ids)
            image_ids.append(r["image_id"])
            images.append({"image_id": r["image_id"], "path": r["image"], "scene": r.get("scene", {})})
        caption_image.append(index_of[r["image_id"]])
    records = [r for r in records if r["image_id"] in index_of]
    caption_image = torch.tensor(caption_image, dtype=torch.long)
    image_files = [info.image_root / im["path"] for im in images]
    missing = [str(p) for p in image_files if not p.is_file()]
    if missing:
        raise ExportError(f"{len(missing)} image file(s) of split {split!r} are missing, e.g. {missing[0]}")
    log.info("exporting %s/%s: %d images, %d captions", corpus_dir.name, split, len(images), len(records))

    features = None
    if image_input != "pixels":
        from s2i.datasets.corpus import PairedDataset

        dataset = PairedDataset(corpus_dir, split, image_input=image_input)
        position = {image_id: k for k, image_id in enumerate(dataset.image_ids)}
        features = lambda i: dataset.image(position[image_ids[i]])  # noqa: E731
    image_emb = embed_images(model, image_files, features=features)

    audio_files = [info.audio_path(r) for r in records]
    speech_emb, codes, shifts, seconds = embed_captions(model, audio_files)
    texts = [r.get("text", "") for r in records]
    text_emb = embed_texts(model, texts) if getattr(model, "text", None) is not None else None

    blocks = [image_emb, speech_emb] + ([text_emb] if text_emb is not None else [])
    xy, layout_meta = fit_layout(torch.cat(blocks), method=layout, seed=seed)
    sizes = [len(b) for b in blocks]
    parts = dict(zip(("image", "speech", "text"), torch.split(xy, sizes)))

    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = write_thumbnails(image_files, out_dir / THUMBS_FILE, cell=thumb_size)
    for im, box in zip(images, boxes):
        im["thumb"] = box
    clips = set(clip_choice(caption_image, max_clips))
    (out_dir / AUDIO_DIR).mkdir(exist_ok=True)
    for old in (out_dir / AUDIO_DIR).glob("*.ogg"):
        old.unlink()
    captions = []
    for j, r in enumerate(records):
        clip = None
        if j in clips:
            clip = f"{AUDIO_DIR}/{j:06d}.ogg"
            write_clip(read_caption(audio_files[j]), out_dir / clip)
        captions.append({"utt_id": r["utt_id"], "image_index": int(caption_image[j]), "text": r.get("text", ""),
                         "speaker": r.get("speaker", ""), "audio": r["audio"], "clip": clip,
                         "seconds": round(seconds[j], 3), "words": r.get("words", [])})

    packed = {}
    for name, seqs in codes.items():
        offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        packed[name] = (torch.cat(seqs), offsets)
    gallery = Gallery(
        root=out_dir, image_embeddings=image_emb, speech_embeddings=speech_emb, text_embeddings=text_emb,
        caption_image=caption_image, images=images, captions=captions, layout=parts, codes=packed,
        meta={"corpus": str(corpus_dir), "corpus_relative": os.path.relpath(corpus_dir, out_dir.resolve()),
              "corpus_name": info.name, "split": split, "checkpoint": checkpoint,
              "image_root": _relative_root(info.image_root, corpus_dir),
              "audio_root": _relative_root(info.audio_root, corpus_dir),
              "thumbnails": {"file": THUMBS_FILE, "cell": thumb_size}, "layout": layout_meta,
              "code_frame_shift_s": shifts, "embed_dim": int(image_emb.shape[1])},
    )
    gallery.save(out_dir, half=half)
    files = [out_dir / n for n in ("gallery.safetensors", "gallery.json", THUMBS_FILE)]
    clip_bytes = sum(p.stat().st_size for p in (out_dir / AUDIO_DIR).glob("*.ogg"))
    report = {"images": len(images), "captions": len(records), "clips": len(clips),
              "text": text_emb is not None, "vq_layers": sorted(codes), "layout": layout_meta,
              "bytes": {**{p.name: p.stat().st_size for p in files}, AUDIO_DIR: clip_bytes},
              "seconds": round(time.perf_counter() - started, 1)}
    report["bytes"]["total"] = sum(report["bytes"].values())
    return report


def _relative_root(root: Path, corpus_dir: Path) -> str:
    """A corpus root as the corpus states it: relative when inside the corpus, else absolute."""
    root = root.resolve()
    return os.path.relpath(root, corpus_dir) if root.is_relative_to(corpus_dir) else str(root)


def folder_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (model.safetensors + config.json) or 'default'")
    parser.add_argument("--data", required=True, help="prepared corpus folder (python -m s2i prepare ...)")
    parser.add_argument("--split", default="test", help="split to export as the app's gallery (default: test)")
    parser.add_argument("--out", default=None, help="where to write the gallery (default: the checkpoint folder)")
    parser.add_argument("--max-images", type=int, default=0, help="keep only the split's first N images (0 = all)")
    parser.add_argument("--max-clips", type=int, default=1000,
                        help="captions stored as Ogg/Opus clips (~6 kB each), one per image first (default: 1000)")
    parser.add_argument("--float32", action="store_true", help="store embeddings as float32 (default: float16)")
    parser.add_argument("--thumb-size", type=int, default=96, help="thumbnail size in pixels (default: 96)")
    parser.add_argument("--layout", choices=LAYOUT_METHODS, default="umap", help="2-D layout method (default: umap)")
    parser.add_argument("--image-input", default="pixels",
                        help="'pixels', or the cached image-feature set a linear image encoder reads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    import s2i

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = s2i.load(args.checkpoint, device=args.device)
    checkpoint_dir = _checkpoint_dir(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint_dir
    if args.max_clips < 0 or args.max_images < 0 or args.thumb_size < 8:
        raise ExportError("--max-images and --max-clips must be >= 0 and --thumb-size >= 8")
    report = export(model, args.data, out, args.split, max_images=args.max_images, max_clips=args.max_clips,
                    thumb_size=args.thumb_size, layout=args.layout, image_input=args.image_input,
                    checkpoint=str(args.checkpoint), seed=args.seed, half=not args.float32)
    total = folder_bytes(out)
    log.info("gallery: %d images, %d captions (%d clips), layout %s, %.1f s", report["images"],
             report["captions"], report["clips"], report["layout"]["method"], report["seconds"])
    for name, size in report["bytes"].items():
        log.info("  %-20s %8.2f MB", name, size / 1e6)
    log.info("%s now holds %.1f MB", out, total / 1e6)
    return 0


def _checkpoint_dir(name: str) -> Path:
    """The folder of a checkpoint given as 'default' or a path."""
    path = Path(name)
    if path.is_dir():
        return path
    return Path(__file__).resolve().parent.parent / "checkpoints" / name
